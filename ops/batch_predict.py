"""`make batch-predict`: a whole CSV file through the SavedModel the server serves.

    python -m ops.batch_predict --model taxi --input data.csv --output build/batch_predictions/
        [--version N | --label stable]   (default: the latest pushed version)
        [--model_repository DIR] [--spec configs/taxi.yaml] [--env configs/local.yaml]
        [--batch_size 1000] [--max_errors 0] [Beam args: --runner DirectRunner ...]

Each CSV row becomes a raw tf.Example the way CsvExampleGen writes one: records split as its
reader splits them, cells from tfx_bsl's ParseCSVLine (its parser), an empty cell a feature
with no value, and goes through Beam's RunInference to the model's `serving_default`
signature, the one REST `:predict` calls, converted by the same `raw_inputs` that `make
parity` uses. So the numbers are the online ones: the tests compare them with the local
server's REST answers row for row.

Writes into --output:

    predictions-SSSSS-of-NNNNN.jsonl  {"row": 0, "class_ids": 1, "classes": "yes", "probabilities": [...],
                                       "score": 0.83} (regression: {"row": 0, "value": ...})
    errors-SSSSS-of-NNNNN.jsonl       {"row": 7, "line": 9, "problems": [{"column": "fare", "value": "abc",
                                       "reason": "declared float: 'abc' is not a number"}]}
    summary.json                      model, version, rows read / predicted / with errors, seconds

`row` is the 0-based data row (header and blank lines not counted) and the join key: lines
come in no particular order. `line` is the file line where the row starts. Every row read
lands in exactly one of the two outputs (checked after the run). A row is refused for what
the online path would refuse or could not express, by the rules of components/values.coerce
that the data check and the monitor share: a cell that does not parse as its column's type,
infinity, an int beyond 2**53 (the signature carries ints as float64), a float beyond
float32, an empty (or "nan") required feature, a wrong number of cells, text that is not
UTF-8; and a row whose answer REST could not send (an output that is NaN or infinite).
A "nan" cell is a missing value, as CsvExampleGen's NaN is to the model. Predictions are
written by serving/json_tensor.py, the REST server's writer, so a line equals the REST answer. The job still writes every good
row, then exits with status 1 when more than --max_errors rows were refused (status 2: the
job could not start, and the message says why).

Column types come from the model's own signature and the required features from its
`assets.extra/serving_spec.json`, as the server reads them; --spec only cross-checks that the
YAML spec agrees with the model. A column the model takes that is missing from the CSV
header stops the job before it starts.
"""

import argparse
import csv
import dataclasses
import gc
import io
import json
import os
import sys
import time
from typing import Any, Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from tfx_bsl.coders import csv_decoder

from components import feature_spec
from components.values import coerce
from serving import json_tensor, model_config
from serving.wire import ServingError

SIGNATURE = "serving_default"  # what REST :predict calls
METRICS_NAMESPACE = "skewless_batch_predict"
DEFAULT_ENV = "configs/local.yaml"
PREDICTIONS, ERRORS, SUMMARY = "predictions", "errors", "summary.json"
# serving_default's input dtypes (components/export.py SERVING_DTYPES) back to spec types.
_SIGNATURE_TYPES = {"DT_STRING": "string", "DT_FLOAT": "float", "DT_DOUBLE": "int"}


class BatchPredictError(ValueError):
    """A job that cannot start: the message names the model, file or column at fault."""


@dataclasses.dataclass(frozen=True)
class ModelContract:
    """What the served version takes, read from the version itself, as the server reads it."""

    model: str
    version: int
    path: str
    types: Dict[str, str]  # feature -> int | float | string
    required: FrozenSet[str]


# --- the model and the file, checked before anything runs --------------------------------

def resolve_version(repository: str, model: str, version: Optional[int] = None,
                    label: Optional[str] = None) -> int:
    """The version asked for, the one a label points at, or the latest pushed one."""
    import tensorflow as tf

    base = os.path.join(repository, model)
    if not tf.io.gfile.isdir(base):
        raise BatchPredictError(f"model '{model}': no folder {base} in the model repository")
    pushed = model_config.complete_versions(base, tf.io.gfile)
    if label is not None:
        try:
            version = model_config.label_version(repository, model, label)
        except model_config.ConfigError as e:
            raise BatchPredictError(str(e)) from None
    if version is None:
        if not pushed:
            raise BatchPredictError(f"model '{model}': no pushed version (a numeric folder with "
                                    f"saved_model.pb) under {base}")
        return pushed[-1]
    if version not in pushed:
        raise BatchPredictError(f"model '{model}': version {version} is not pushed under {base} "
                                f"(pushed: {', '.join(map(str, pushed)) or 'none'})")
    return version


def load_contract(repository: str, model: str, version: int) -> ModelContract:
    """Input names and types from the signature, required features from serving_spec.json."""
    import tensorflow as tf
    from tensorflow.core.framework import types_pb2
    from tensorflow.core.protobuf import saved_model_pb2

    path = model_config.version_path(os.path.join(repository, model), version)
    with tf.io.gfile.GFile(os.path.join(path, model_config.SAVED_MODEL_FILE), "rb") as f:
        graphs = saved_model_pb2.SavedModel.FromString(f.read()).meta_graphs
    signature = next((g.signature_def[SIGNATURE] for g in graphs if SIGNATURE in g.signature_def), None)
    if signature is None:
        raise BatchPredictError(f"{path}: the SavedModel has no '{SIGNATURE}' signature")
    types = {}
    for name, tensor in signature.inputs.items():
        dtype = types_pb2.DataType.Name(tensor.dtype)
        if dtype not in _SIGNATURE_TYPES:
            raise BatchPredictError(f"{path}: {SIGNATURE} input '{name}' has dtype {dtype}; batch prediction "
                                    f"reads {', '.join(_SIGNATURE_TYPES)} (string, float, int as float64)")
        types[name] = _SIGNATURE_TYPES[dtype]
    try:
        served = model_config.read_serving_spec(path, tf.io.gfile)
    except model_config.ConfigError as e:
        raise BatchPredictError(str(e)) from None
    required = frozenset(n for n, f in served.get("features", {}).items() if f.get("required") and n in types)
    return ModelContract(model, version, path, types, required)


def check_spec(spec: feature_spec.FeatureSpec, contract: ModelContract) -> None:
    """Fails when the YAML spec and the model disagree on a feature's presence or type."""
    where = f"{spec.source} vs {contract.path}"
    for name, feature in spec.features.items():
        if name not in contract.types:
            raise BatchPredictError(f"{where}: features.{name}: the model version {contract.version} "
                                    f"does not take this feature")
        if feature.type != contract.types[name]:
            raise BatchPredictError(f"{where}: features.{name}.type: the spec declares {feature.type}, "
                                    f"the model takes {contract.types[name]}")
    extra = sorted(set(contract.types) - set(spec.features))
    if extra:
        raise BatchPredictError(f"{where}: features.{extra[0]}: the model takes it, the spec does not declare it")


def read_header(path: str) -> List[str]:
    if not FileSystems.exists(path):
        raise BatchPredictError(f"input: no file at '{path}'")
    with FileSystems.open(path, compression_type="uncompressed") as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="")
        header = next(csv.reader(text), None)
    if not header:
        raise BatchPredictError(f"{path}: the file is empty (a CSV with a header line is expected)")
    return header


def column_index(header: Sequence[str], contract: ModelContract, path: str) -> Dict[str, int]:
    """Where each feature the model takes sits in the header; every one must be there once."""
    index = {}
    for name in contract.types:
        positions = [i for i, column in enumerate(header) if column == name]
        if not positions:
            raise BatchPredictError(
                f"{path}: column '{name}' is not in the header, and model '{contract.model}' version "
                f"{contract.version} takes it (header: {', '.join(header)})")
        if len(positions) > 1:
            raise BatchPredictError(f"{path}: column '{name}' appears {len(positions)} times in the header")
        index[name] = positions[0]
    return index


# --- one row: cells -> raw tf.Example, or the reasons it cannot be one ---------------------

def _shown(cell: bytes) -> str:
    text = cell.decode("utf-8", "backslashreplace")
    return text if len(text) <= 80 else text[:77] + "..."


def parse_row(cells: Sequence[bytes], header_size: int, index: Dict[str, int], types: Dict[str, str],
              required: FrozenSet[str]) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """({feature: value, None where missing}, problems) for one row's raw (UTF-8) cells.

    The row is good when problems is empty; each problem names the column, the cell and why.
    """
    if len(cells) != header_size:
        return {}, [{"column": None, "value": None,
                     "reason": f"the row has {len(cells)} cells, the header has {header_size}"}]
    values, problems = {}, []
    for name in sorted(types, key=index.__getitem__):  # problems read left to right, as the file does
        cell = cells[index[name]]
        try:
            values[name] = coerce(cell, types[name])  # the data check's and the monitor's rules too
        except ValueError as e:
            problems.append({"column": name, "value": _shown(cell), "reason": str(e)})
            continue
        if values[name] is None and name in required:
            problems.append({"column": name, "value": _shown(cell), "reason": "required feature is empty"})
    return values, problems


def to_example(values: Dict[str, Any], types: Dict[str, str]) -> bytes:
    """A raw tf.Example as CsvExampleGen writes one: a missing value is a feature with an empty list."""
    from tensorflow.core.example import example_pb2

    example = example_pb2.Example()
    for name, value in values.items():
        feature = example.features.feature[name]
        kind = {"int": feature.int64_list, "float": feature.float_list, "string": feature.bytes_list}[types[name]]
        kind.SetInParent()
        if value is not None:
            kind.value.append(value)
    return example.SerializeToString()


# --- the Beam pieces ---------------------------------------------------------------------

class _ReadRecords(beam.DoFn):
    """(row, line, record bytes) for each CSV record after the header, split as CsvExampleGen
    splits them: physical lines are joined until their double quotes balance (a quoted cell may
    span lines). `line` is the file line where the record starts; `row` counts the records that
    are not blank (CsvExampleGen skips blank lines too). One reader per file keeps the numbers; the records are reshuffled afterwards so parsing spreads out.
    """

    def __init__(self):
        self.rows_read = Metrics.counter(METRICS_NAMESPACE, "rows_read")

    def process(self, path: str) -> Iterable[Tuple[int, int, bytes]]:
        with FileSystems.open(path, compression_type="uncompressed") as raw:
            raw.readline()  # the header, read by read_header
            row, line, start, pending, quotes = 0, 1, 0, [], 0
            for physical in raw:
                line += 1
                if not pending:
                    start = line
                pending.append(physical)
                quotes += physical.count(b'"')
                if quotes % 2 == 0:
                    record, pending, quotes = b"".join(pending), [], 0
                    if record.strip(b"\r\n"):
                        self.rows_read.inc()
                        yield row, start, record
                        row += 1
            if pending:
                raise ValueError(f"{path}: line {start}: a quoted cell is never closed (unbalanced double "
                                 "quotes to the end of the file); close the quote or escape it as \"\"")


class _ParseRows(beam.DoFn):
    """(row, serialized raw tf.Example), or to ERRORS the row's problems.

    Cells come from tfx_bsl's ParseCSVLine, the parser CsvExampleGen runs, so a record splits
    into the same cells in training and in batch prediction.
    """

    def __init__(self, header_size: int, index: Dict[str, int], types: Dict[str, str], required: FrozenSet[str]):
        self.header_size, self.index, self.types, self.required = header_size, index, types, required
        self.refused = Metrics.counter(METRICS_NAMESPACE, "rows_with_errors")
        self._parser = None

    def setup(self):
        self._parser = csv_decoder.ParseCSVLine(delimiter=",")
        self._parser.setup()

    def process(self, element: Tuple[int, int, bytes]):
        row, line, record = element
        cells, problems = record_cells(self._parser, record, self.index)
        if not problems:
            values, problems = parse_row(cells, self.header_size, self.index, self.types, self.required)
        if problems:
            self.refused.inc()
            yield beam.pvalue.TaggedOutput(ERRORS, {"row": row, "line": line, "problems": problems})
        else:
            yield (row, line), to_example(values, self.types)


def record_cells(parser: "csv_decoder.ParseCSVLine", record: bytes,
                 index: Dict[str, int]) -> Tuple[List[bytes], List[Dict[str, Any]]]:
    """(cells, problems) of one record. CsvExampleGen reads text as strict UTF-8 (and stops the
    whole run on a bad byte); here only the row is refused, naming the first column whose cell
    holds the bad bytes."""
    try:
        text = record.decode("utf-8")
    except UnicodeDecodeError as e:
        (cells, _), = parser.process(record.decode("utf-8", "replace"))
        names = {i: name for name, i in index.items()}
        at = next((i for i, c in enumerate(cells) if "\ufffd".encode() in c), None)
        bad = record[e.start:e.end]
        return [], [{"column": names.get(at), "value": _shown(cells[at]) if at is not None else None,
                     "reason": f"not valid UTF-8 (byte {bad.hex(' ')} at offset {e.start} of the row)"}]
    (cells, _), = parser.process(text)
    return cells, []


class ServingSignatureHandler(ModelHandler):
    """Beam RunInference over a SavedModel signature, called as the server calls it.

    Batches of serialized raw tf.Examples become the signature's named inputs through
    components.export.raw_inputs (an absent value -> "" or NaN, the REST server's missing
    value); each example's PredictionResult holds {output name: numpy value}.
    """

    def __init__(self, model_path: str, signature: str = SIGNATURE, max_batch_size: int = 1000):
        super().__init__()
        self.model_path, self.signature, self.max_batch_size = model_path, signature, max_batch_size

    def load_model(self):
        import tensorflow as tf

        return tf.saved_model.load(self.model_path)  # the module keeps the signature's variables alive

    def run_inference(self, batch: Sequence[bytes], model, inference_args=None) -> List[PredictionResult]:
        from components.export import raw_inputs

        fn = model.signatures[self.signature]
        _, input_specs = fn.structured_input_signature
        outputs = {name: tensor.numpy() for name, tensor in fn(**raw_inputs(list(batch), input_specs)).items()}
        return [PredictionResult(example, {name: values[i] for name, values in outputs.items()}, self.model_path)
                for i, example in enumerate(batch)]

    def get_num_bytes(self, batch: Sequence[bytes]) -> int:
        return sum(len(example) for example in batch)

    def get_metrics_namespace(self) -> str:
        return METRICS_NAMESPACE

    def batch_elements_kwargs(self) -> Dict[str, Any]:
        return {"max_batch_size": self.max_batch_size}


class _FormatPrediction(beam.DoFn):
    """A row's outputs as REST :predict writes them (serving/json_tensor.py), or to ERRORS the
    reason REST would refuse them (an output that is NaN or infinite)."""

    def __init__(self):
        self.predicted = Metrics.counter(METRICS_NAMESPACE, "rows_predicted")
        self.refused = Metrics.counter(METRICS_NAMESPACE, "rows_with_errors")

    def process(self, keyed):
        (row, line), result = keyed
        try:
            outputs = json_tensor.prediction_row(dict(sorted(result.inference.items())))
        except ServingError as e:
            self.refused.inc()
            yield beam.pvalue.TaggedOutput(ERRORS, {"row": row, "line": line, "problems": [
                {"column": None, "value": None, "reason": f"the model's answer cannot be sent: {e.message}"}]})
            return
        self.predicted.inc()
        yield '{"row": %d, %s' % (row, outputs[1:])


def build(pipeline: beam.Pipeline, input_path: str, output_dir: str, contract: ModelContract,
          index: Dict[str, int], header_size: int, max_batch_size: int) -> None:
    examples, errors = (
        pipeline
        | "InputFile" >> beam.Create([input_path])
        | "ReadRecords" >> beam.ParDo(_ReadRecords())
        | "Spread" >> beam.Reshuffle()
        | "ParseRows" >> beam.ParDo(_ParseRows(header_size, index, contract.types, contract.required))
        .with_outputs(ERRORS, main="examples"))
    handler = KeyedModelHandler(ServingSignatureHandler(contract.path, SIGNATURE, max_batch_size))
    predictions, unsendable = (
        examples
        | "RunInference" >> RunInference(handler)
        | "FormatPredictions" >> beam.ParDo(_FormatPrediction()).with_outputs(ERRORS, main="predictions"))
    _ = predictions | "WritePredictions" >> beam.io.WriteToText(os.path.join(output_dir, PREDICTIONS),
                                                                file_name_suffix=".jsonl")
    _ = ((errors, unsendable)
         | "AllErrors" >> beam.Flatten()
         | "FormatErrors" >> beam.Map(json.dumps)
         | "WriteErrors" >> beam.io.WriteToText(os.path.join(output_dir, ERRORS), file_name_suffix=".jsonl"))


# --- the job -----------------------------------------------------------------------------

def _release_model() -> None:
    """Frees the SavedModel that Beam's shared-model cache keeps alive for a next stage.

    Held until interpreter exit, it is torn down after TensorFlow's modules and every function
    prints an "Exception ignored in AtomicFunction.__del__" traceback. Beam has no public call
    for this; the guard keeps a future Beam without the attribute working.
    """
    from apache_beam.utils import shared

    cache = getattr(shared, "_shared_map", None)
    if cache is not None and hasattr(cache, "_keepalive"):
        cache._keepalive = (None, None)
    gc.collect()


def pipeline_options(beam_args: Sequence[str]) -> PipelineOptions:
    """Beam's options; an argument neither this job nor Beam knows is an error, not a warning."""
    options = PipelineOptions(list(beam_args))
    unknown = sorted(set(options.get_all_options(retain_unknown_options=True)) - set(options.get_all_options()))
    if unknown:
        raise BatchPredictError(f"unknown argument --{unknown[0]}: neither a batch_predict option (see --help) "
                                f"nor a Beam pipeline option")
    return options


def _counters(result) -> Dict[str, int]:
    counts = {"rows_read": 0, "rows_predicted": 0, "rows_with_errors": 0}
    for counter in result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))["counters"]:
        if counter.key.metric.name in counts:
            value = counter.committed if counter.committed is not None else counter.attempted
            counts[counter.key.metric.name] += int(value or 0)
    return counts


def _clear_previous_output(output_dir: str) -> None:
    """Shards of an earlier run would mix with this one's (a different shard count leaves them)."""
    patterns = [os.path.join(output_dir, f"{name}-*-of-*.jsonl") for name in (PREDICTIONS, ERRORS)]
    stale = [m.path for result in FileSystems.match(patterns) for m in result.metadata_list]
    stale += [p for p in [os.path.join(output_dir, SUMMARY)] if FileSystems.exists(p)]
    if stale:
        FileSystems.delete(stale)


def first_errors(output_dir: str, limit: int = 3) -> List[Dict[str, Any]]:
    found = []
    for result in FileSystems.match([os.path.join(output_dir, f"{ERRORS}-*-of-*.jsonl")]):
        for metadata in sorted(result.metadata_list, key=lambda m: m.path):
            with FileSystems.open(metadata.path, compression_type="uncompressed") as f:
                for line in io.TextIOWrapper(f, encoding="utf-8"):
                    found.append(json.loads(line))
                    if len(found) >= limit:
                        return sorted(found, key=lambda e: e["row"])
    return sorted(found, key=lambda e: e["row"])


def describe(error: Dict[str, Any]) -> str:
    problems = "; ".join((f"column '{p['column']}': " if p["column"] else "") + p["reason"]
                         for p in error["problems"])
    return f"row {error['row']} (line {error['line']}): {problems}"


def environment_defaults(env_path: Optional[str]) -> Tuple[Optional[str], List[str]]:
    """(model_repository, beam_args) from the environment file, the local runner's settings."""
    if not env_path:
        return None, []
    from pipelines import beam_profiles  # the environment's Beam profile, as the pipeline runs it
    from pipelines.environment import load_environment

    try:
        env = load_environment(env_path)
        args = beam_profiles.beam_args(env, env["source"], pipeline_root=env["pipeline_root"], name="batch_predict")
    except feature_spec.SpecError as e:  # the environment file's or the Beam profile's mistake, named
        raise BatchPredictError(str(e)) from e
    return env["model_repository"], args


def run(model: str, input_path: str, output_dir: str, model_repository: str, version: Optional[int] = None,
        label: Optional[str] = None, spec_path: Optional[str] = None, beam_args: Sequence[str] = (),
        max_batch_size: int = 1000) -> Dict[str, Any]:
    """Runs the job and returns its summary (also written to <output_dir>/summary.json)."""
    started = time.perf_counter()
    options = pipeline_options(beam_args)
    version = resolve_version(model_repository, model, version, label)
    contract = load_contract(model_repository, model, version)
    if spec_path:
        check_spec(feature_spec.load(spec_path), contract)
    header = read_header(input_path)
    index = column_index(header, contract, input_path)
    if not FileSystems.exists(output_dir):
        FileSystems.mkdirs(output_dir)
    _clear_previous_output(output_dir)

    pipeline = beam.Pipeline(options=options)
    build(pipeline, input_path, output_dir, contract, index, len(header), max_batch_size)
    result = pipeline.run()
    result.wait_until_finish()
    counts = _counters(result)
    del pipeline, result
    _release_model()
    summary = {"model": model, "version": version, "model_path": contract.path, "signature": SIGNATURE,
               "input": input_path, "output": output_dir, **counts,
               "seconds": round(time.perf_counter() - started, 2)}
    if counts["rows_read"] != counts["rows_predicted"] + counts["rows_with_errors"]:
        raise RuntimeError(f"{input_path}: {counts['rows_read']} rows read but {counts['rows_predicted']} predicted "
                           f"and {counts['rows_with_errors']} refused: rows were lost in the pipeline")
    with FileSystems.create(os.path.join(output_dir, SUMMARY)) as f:
        f.write(json.dumps(summary, indent=2).encode())
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,  # a prefix of ours must not swallow a Beam argument
        description="Predictions for every row of a CSV file through a pushed SavedModel's serving_default "
                    "signature. Arguments not listed here are passed to Beam (e.g. --runner).")
    parser.add_argument("--model", required=True, help="model name in the repository (e.g. taxi)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--version", type=int, help="a pushed version (default: the latest pushed)")
    which.add_argument("--label", help="the version a label points at (models.config's version_labels, e.g. stable)")
    parser.add_argument("--input", required=True, help="the CSV file (header line first)")
    parser.add_argument("--output", required=True, help="folder for predictions-*.jsonl, errors-*.jsonl, summary.json")
    parser.add_argument("--model_repository", help="default: model_repository of --env")
    parser.add_argument("--spec", help="feature spec YAML to cross-check against the model")
    parser.add_argument("--env", default=DEFAULT_ENV, help="environment file for the repository and Beam args "
                                                           "(default: %(default)s); '' for none")
    parser.add_argument("--batch_size", type=int, default=1000, help="largest batch per signature call")
    parser.add_argument("--max_errors", type=int, default=0,
                        help="exit with status 1 when more rows than this are refused (default: %(default)s)")
    args, beam_args = parser.parse_known_args(argv)
    if args.batch_size < 1 or args.max_errors < 0:
        parser.error("--batch_size must be positive and --max_errors not negative")
    try:
        env_repository, env_beam_args = environment_defaults(args.env)
        repository = args.model_repository or env_repository
        if not repository:
            raise BatchPredictError("no model repository: pass --model_repository or an --env file that sets one")
        summary = run(args.model, args.input, args.output, repository, args.version, args.label, args.spec,
                      env_beam_args + beam_args, args.batch_size)
    except (BatchPredictError, feature_spec.SpecError) as e:
        print(f"batch-predict: {e}", file=sys.stderr)
        return 2
    print(f"model {summary['model']} version {summary['version']} ({summary['signature']}): "
          f"{summary['rows_read']} rows read, {summary['rows_predicted']} predicted, "
          f"{summary['rows_with_errors']} refused, {summary['seconds']:.1f} s -> {summary['output']}")
    if summary["rows_with_errors"]:
        shown = first_errors(summary["output"])
        print(f"refused rows ({len(shown)} shown; all in {os.path.join(summary['output'], ERRORS)}-*.jsonl):",
              file=sys.stderr)
        for error in shown:
            print(f"  {describe(error)}", file=sys.stderr)
    if summary["rows_with_errors"] > args.max_errors:
        print(f"batch-predict: {summary['rows_with_errors']} rows refused, more than --max_errors "
              f"{args.max_errors}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Run main from the importable module, not __main__, so Beam pickles these classes by reference.
    from ops.batch_predict import main as _main

    sys.exit(_main())
