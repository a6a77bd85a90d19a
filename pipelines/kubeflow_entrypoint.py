"""Runs one TFX component in a Kubeflow Pipelines 2 pod: TFX's v2 entrypoint, input types repaired.

The compiled pipeline (pipelines/kubeflow_runner.py) starts every component as

    python -m pipelines.kubeflow_entrypoint --executor_class_path ... \\
        --json_serialized_invocation_args '{{$}}' --json_serialized_inputs_spec_args '{...}' <beam args>

which are the arguments of TFX's own entrypoint
(tfx.orchestration.kubeflow.v2.container.kubeflow_v2_run_executor). That entrypoint was written
for Vertex AI Pipelines, which hands each input artifact over with the TFX type the compiled spec
declares (`title: tfx.Examples` and its properties). TFX finds the artifact's Python class from
that title; when the input arrives with a `system.*` title or with no schema, the lookup fails
before the executor starts (open issue tfx#7768, "kubeflow_v2_entrypoint_utils fails to retrieve
classpath": TFX 1.16.0 on Kubeflow 1.8 with KFP 2.5). Pipeline spec 2.1 passes each component's
input definitions, which carry the TFX types, so this entrypoint copies the declared type onto
every input artifact that lacks a usable one and then runs TFX's entrypoint unchanged.

For a file-based ExampleGen it first runs TFX's ExampleGen driver. The compiled spec names that
driver as the container's `lifecycle.preCacheCheck` hook, which Vertex AI runs and open-source
KFP 2 does not: its driver builds the pod from the container's command and args only and decides
caching with no hook (kubeflow/pipelines backend/src/v2/driver/driver.go:309-317,
container.go:149-242, at 7b70c7b; `Lifecycle` appears only in api/v2alpha1/pipeline_spec.proto:753-768
and code generated from it, and `git log -S PreCacheCheck -- backend/src` finds no caller in any
version). Without it the CSV executor globs the literal `span-{SPAN}` pattern and
finds nothing.

Then it keeps a recurring run from training on the same data again, the Kubeflow twin of
`make retrain`'s "nothing new" (pipelines/span_window.py, exit 3). On Vertex AI the driver's span,
version and input fingerprint feed ExampleGen's cache key, so unchanged files reuse the old
examples; here ExampleGen is never cached (pipelines/kubeflow_runner.py), so the entrypoint
compares what the driver resolved (input base, resolved pattern, span, version, fingerprint) with
the record of what this pipeline's ExampleGen last ingested: a JSON file under the pipeline root
(the task's `ingested_record` parameter, compiled from configs/kubeflow.yaml's pipeline_root). When
they are equal and the run asks for new data (`require_new_span`, which `make schedule` sets and
`make submit` does not), it stops before the executor writes anything and exits NOTHING_NEW_EXIT,
naming the span, its version, when it was ingested and what to do (KFP's launcher fails the task
with "exit status 3" and uploads nothing: backend/src/v2/component/launcher_v2.go, execute).
Otherwise TFX's executor runs and, only once it succeeded, the record is replaced (written beside
it, then renamed over it), so a failed ingestion leaves the old record and the next tick tries
again. A file rewritten inside the newest span changes TFX's fingerprint (its files' count, total
size and modification times in seconds, tfx/utils/io_utils.py:202-220), which counts as new data.
The record is a file written with tf.io.gfile (object storage or local disk alike), not an entry
in KFP's ML Metadata, which is KFP's own schema behind its API server.
"""

import datetime
import json
import os
import tempfile
import uuid
from typing import Dict, List, Optional

import yaml

# A run stopped for want of new data exits as `make retrain`'s refusal does.
from pipelines.span_window import NOTHING_NEW_EXIT

# Parameters pipelines/kubeflow_runner.py adds to the compiled ExampleGen task, taken out of the
# executor input before TFX's driver and executor see it.
RECORD_PARAMETER = "ingested_record"  # where this pipeline records what its ExampleGen last ingested
REQUIRE_NEW_PARAMETER = "require_new_span"  # a pipeline parameter: true in the recurring run


class NothingNew(RuntimeError):
    """The newest data under input_base is what this pipeline's ExampleGen ingested last."""


def _has_tfx_type(type_schema) -> bool:
    """True when TFX can map the artifact type to a Python class (a tfx.* or class-path title)."""
    kind = type_schema.WhichOneof("kind")
    if kind == "schema_title":
        title = type_schema.schema_title
    elif kind == "instance_schema":
        title = (yaml.safe_load(type_schema.instance_schema or "") or {}).get("title")
    else:
        return False
    return bool(title) and not title.startswith("system.")


def repair_input_types(executor_input, inputs_spec) -> List[str]:
    """Gives every input artifact without a TFX type the type its component declares.

    executor_input: pipeline_spec_pb2.ExecutorInput (changed in place); inputs_spec:
    pipeline_spec_pb2.ComponentInputsSpec. Returns the input keys that were repaired.
    """
    repaired = []
    for key, artifact_list in executor_input.inputs.artifacts.items():
        declared = inputs_spec.artifacts.get(key)
        if declared is None or not declared.HasField("artifact_type"):
            continue
        for artifact in artifact_list.artifacts:
            if not _has_tfx_type(artifact.type):
                artifact.type.CopyFrom(declared.artifact_type)
                repaired.append(key)
    return repaired


def is_file_based_example_gen(executor_class_path: str, executor_input) -> bool:
    """An ExampleGen executor that reads files under input_base (the ones TFX compiles with the driver hook)."""
    from tfx.components.example_gen.base_example_gen_executor import BaseExampleGenExecutor
    from tfx.types import standard_component_specs
    from tfx.utils import import_utils

    executor_class = import_utils.import_class_by_path(executor_class_path)
    return (issubclass(executor_class, BaseExampleGenExecutor)
            and standard_component_specs.INPUT_BASE_KEY in executor_input.inputs.parameter_values)


def resolve_span(executor_input, inputs_spec) -> Optional[int]:
    """Does what Vertex AI does with the preCacheCheck hook: runs TFX's file-based ExampleGen driver as
    made (it resolves {SPAN} to the newest span, the input fingerprint and the version) and applies what it
    writes to executor_input (changed in place): the exec properties (span, version, input_fingerprint,
    input_config with the resolved pattern) and the Examples artifact's properties (span). Returns the span."""
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2
    from tfx.components.example_gen import utils
    from tfx.orchestration.kubeflow.v2.file_based_example_gen import driver

    with tempfile.TemporaryDirectory() as folder:
        probe = pipeline_spec_pb2.ExecutorInput()
        probe.CopyFrom(executor_input)
        probe.outputs.output_file = os.path.join(folder, "driver_output.json")
        driver._run_driver(probe, inputs_spec)
        resolved = pipeline_spec_pb2.ExecutorOutput()
        with open(probe.outputs.output_file) as f:
            json_format.Parse(f.read(), resolved, ignore_unknown_fields=True)
    for key, value in resolved.parameter_values.items():
        executor_input.inputs.parameter_values[key].CopyFrom(value)
    for key, artifact_list in resolved.artifacts.items():
        for target, artifact in zip(executor_input.outputs.artifacts[key].artifacts, artifact_list.artifacts):
            target.metadata.update(artifact.metadata)
    return int(resolved.parameter_values[utils.SPAN_PROPERTY_NAME].number_value)


def record_path(pipeline_root: str, node_id: str) -> str:
    """Where the compiled pipeline keeps the record of what its ExampleGen node last ingested."""
    return f"{pipeline_root.rstrip('/')}/skewless/{node_id}_ingested.json"


def take_own_parameters(executor_input) -> Dict:
    """Removes this entrypoint's parameters from executor_input (changed in place): {record, require_new}."""
    values = executor_input.inputs.parameter_values
    own = {"record": values[RECORD_PARAMETER].string_value if RECORD_PARAMETER in values else None,
           "require_new": values[REQUIRE_NEW_PARAMETER].bool_value if REQUIRE_NEW_PARAMETER in values else False}
    for key in (RECORD_PARAMETER, REQUIRE_NEW_PARAMETER):
        values.pop(key, None)
    return own


def resolved_data(executor_input) -> Dict:
    """What identifies the data TFX's driver resolved (after resolve_span): equal means the same files."""
    from tfx.components.example_gen import utils
    from tfx.types import standard_component_specs

    values = executor_input.inputs.parameter_values
    version = values.get(utils.VERSION_PROPERTY_NAME)
    return {"input_base": values[standard_component_specs.INPUT_BASE_KEY].string_value,
            "input_config": json.loads(values[standard_component_specs.INPUT_CONFIG_KEY].string_value),
            "span": int(values[utils.SPAN_PROPERTY_NAME].number_value),
            "version": None if version is None else int(version.number_value),
            "input_fingerprint": values[utils.FINGERPRINT_PROPERTY_NAME].string_value}


def read_record(path: str) -> Optional[Dict]:
    import tensorflow as tf

    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        text = f.read()
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    if not isinstance(record, dict) or not {"data", "ingested_at"} <= set(record):
        raise ValueError(f"{path}: not a record of an ExampleGen ingestion (a JSON object with 'data' and "
                         f"'ingested_at'); delete it, and the next run ingests the newest span and records it again")
    return record


def write_record(path: str, record: Dict) -> None:
    """Writes the record beside path and renames it over path, so a reader sees the old or the new one."""
    import tensorflow as tf

    tf.io.gfile.makedirs(os.path.dirname(path))
    written = f"{path}.{uuid.uuid4().hex}.tmp"
    with tf.io.gfile.GFile(written, "w") as f:
        f.write(json.dumps(record, indent=1, sort_keys=True) + "\n")
    tf.io.gfile.rename(written, path, overwrite=True)


def refuse_same_data(record: Optional[Dict], data: Dict, path: str) -> None:
    """NothingNew when the record says this pipeline's ExampleGen ingested exactly `data` last."""
    if record is None or record["data"] != data:
        return
    version = "" if data["version"] is None else f" version {data['version']}"
    raise NothingNew(
        f"nothing new under {data['input_base']}: span {data['span']}{version} (the newest) was ingested by this "
        f"pipeline at {record['ingested_at']} with the same files (TFX's input fingerprint; record {path}), so this "
        f"run, which requires new data ({REQUIRE_NEW_PARAMETER}, set by make schedule), stops before training on it "
        f"again. Add a newer span under data_root (make export-span); "
        f"to train on span {data['span']} again, start a one-off run (make submit), which does not require new data")


def run(args, beam_args: List[str]) -> None:
    """TFX's _run_executor on the parsed arguments, after the input types are repaired and, for a
    file-based ExampleGen, the span resolved; NothingNew when the run requires new data and the
    resolved data is what the record says was ingested last; the record replaced after a
    successful ingestion."""
    from absl import logging
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2
    from tfx.orchestration.kubeflow.v2.container import kubeflow_v2_run_executor

    own, data = {"record": None}, None
    if getattr(args, "json_serialized_inputs_spec_args", None):
        executor_input = pipeline_spec_pb2.ExecutorInput()
        json_format.Parse(args.json_serialized_invocation_args, executor_input, ignore_unknown_fields=True)
        inputs_spec = pipeline_spec_pb2.ComponentInputsSpec()
        json_format.Parse(args.json_serialized_inputs_spec_args, inputs_spec, ignore_unknown_fields=True)
        repaired = repair_input_types(executor_input, inputs_spec)
        if repaired:
            logging.info("skewless: input artifact types taken from the component spec for %s", sorted(set(repaired)))
        span = None
        if is_file_based_example_gen(args.executor_class_path, executor_input):
            own = take_own_parameters(executor_input)
            span = resolve_span(executor_input, inputs_spec)
            data = resolved_data(executor_input)
            logging.info("skewless: TFX's ExampleGen driver resolved span %s", span)
            if own["record"] and own["require_new"]:
                refuse_same_data(read_record(own["record"]), data, own["record"])
        if repaired or span is not None:
            args.json_serialized_invocation_args = json_format.MessageToJson(executor_input)
    kubeflow_v2_run_executor._run_executor(args, beam_args)
    if own["record"] and data is not None:
        (examples,) = executor_input.outputs.artifacts["examples"].artifacts
        write_record(own["record"], {"data": data, "examples": examples.uri, "ingested_at": datetime.datetime.now(
            datetime.timezone.utc).isoformat(timespec="seconds")})
        logging.info("skewless: recorded span %s as ingested in %s", data["span"], own["record"])


def exit_code(args, beam_args: List[str]) -> int:
    """`run`, with a run stopped for want of new data told apart from a failure: NOTHING_NEW_EXIT."""
    import sys

    try:
        run(args, beam_args)
    except NothingNew as e:
        print(f"skewless: {e}", file=sys.stderr)  # one line in the pod's log, without a traceback
        return NOTHING_NEW_EXIT
    return 0


def main() -> None:
    """The container's command: absl flags and logging set up as in TFX's entrypoint, then `run`
    (exit NOTHING_NEW_EXIT when it stops for want of new data)."""
    from absl import app
    from tfx.orchestration.kubeflow.v2.container import kubeflow_v2_run_executor

    app.run(lambda parsed: exit_code(*parsed),
            flags_parser=lambda argv: kubeflow_v2_run_executor._parse_flags(argv[1:]))


if __name__ == "__main__":
    main()
