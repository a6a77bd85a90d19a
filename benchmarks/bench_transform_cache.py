"""tf.Transform's analyzer cache across spans: the project's preprocessing_fn analyzing a window of
spans with the cache of the older spans against without it, and the newest span alone (the floor),
measured in the same run, interleaved (A B C A B C ...), so the ratio holds on a loaded machine
where absolute times move.

    python -m benchmarks.bench_transform_cache [--spans 3] [--rows 2500] [--rounds 3]

Analysis only, as the Transform component runs it (tfx/components/transform/executor.py, 1.16:
_Dataset keys each input by its file pattern, _OptimizeRun asks get_analysis_dataset_keys which
inputs the cache leaves to read and passes None for the others, then AnalyzeDatasetWithCache and
WriteTransformFn): each span is a CSV file read through tfx_bsl's CsvTFXIO with the spec's schema.
With a cache, the new span's cache is written too, as the executor writes its updated cache; the
"without" arm is Transform with disable_analyzer_cache (no cache read or written). Without
materialization or statistics the executor reads no cached span at all, so this is the whole
saving; the pipeline's Transform also writes transformed examples of every span, which the cache
does not shorten. The cache of the older spans is written once before the rounds.
Writes build/bench_transform_cache.json.
"""

import argparse
import csv
import glob
import json
import os
import statistics
import tempfile
import time
from typing import Dict, List, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JSON_PATH = os.path.join(REPO_ROOT, "build", "bench_transform_cache.json")
TAXI_SPEC = os.path.join(REPO_ROOT, "configs", "taxi.yaml")


def write_spans(spec, rows_per_span: int, spans: int, folder: str) -> List[str]:
    """Cuts the spec's CSV into `spans` consecutive files of `rows_per_span` rows (span 1 first),
    starting again at its first row where a window needs more rows than it holds (spans larger
    than the taxi CSV's 15,002 rows / spans, to see how the cache's effect grows with span size)."""
    with open(spec.csv_files()[0], newline="") as f:
        reader = csv.reader(f)
        header, rows = next(reader), list(reader)
    paths = []
    for i in range(spans):
        paths.append(os.path.join(folder, f"span-{i + 1}", "data.csv"))
        write_csv(paths[-1], header, [rows[j % len(rows)] for j in range(i * rows_per_span, (i + 1) * rows_per_span)])
    return paths


def write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


class SpanAnalysis:
    """The spec's preprocessing_fn under tf.Transform's Beam implementation over CSV spans, each span
    a dataset key of its own (named by its span, as the executor names it by its file pattern)."""

    def __init__(self, spec, work_dir: str):
        from google.protobuf import text_format
        from tensorflow_metadata.proto.v0 import schema_pb2

        from components.preprocessing import preprocessing_fn
        from pipelines.pipeline import component_config

        # What the pipeline's Transform gets: ImportSchemaGen's schema file and its custom_config.
        with open(spec.schema_path) as f:
            self.schema = text_format.Parse(f.read(), schema_pb2.Schema())
        custom_config = component_config(spec, "Transform")
        self.preprocessing_fn = lambda inputs: preprocessing_fn(inputs, custom_config)
        self.work_dir = work_dir

    @staticmethod
    def key(span_path: str):
        from tensorflow_transform.beam import analyzer_cache

        return analyzer_cache.DatasetKey(os.path.basename(os.path.dirname(span_path)))

    def _tfxio(self, pattern: str):
        """Reads the CSV files matching pattern (all with the header of the first)."""
        from tfx_bsl.public import tfxio

        with open(sorted(glob.glob(pattern))[0], newline="") as f:
            columns = next(csv.reader(f))
        return tfxio.CsvTFXIO(file_pattern=pattern, column_names=columns, schema=self.schema, skip_header_lines=1)

    def _context(self):
        import tensorflow_transform.beam as tft_beam

        from components.preprocessing import FORCE_TF_COMPAT_V1

        return tft_beam.Context(temp_dir=tempfile.mkdtemp(dir=self.work_dir), force_tf_compat_v1=FORCE_TF_COMPAT_V1)

    def keys_to_read(self, spans: Sequence[str], cache) -> set:
        """The spans tf.Transform must read given the cache read from disk ({}: all of them)."""
        from tensorflow_transform.beam import analysis_graph_builder

        from components.preprocessing import FORCE_TF_COMPAT_V1

        keys = [self.key(s) for s in spans]
        typespecs = self._tfxio(spans[0]).TensorAdapter().OriginalTypeSpecs()
        return set(analysis_graph_builder.get_analysis_dataset_keys(
            self.preprocessing_fn, typespecs, keys, cache, FORCE_TF_COMPAT_V1))

    def spans_read_with(self, spans: Sequence[str], cache_dir: str) -> List[str]:
        """The names of the spans analysis reads with the cache in cache_dir (nothing is run)."""
        import apache_beam as beam
        from tensorflow_transform.beam import analyzer_cache

        cache = beam.Pipeline() | analyzer_cache.ReadAnalysisCacheFromFS(cache_dir, [self.key(s) for s in spans])
        return sorted(k.key for k in self.keys_to_read(spans, cache))

    def analyze(self, spans: Sequence[str], transform_fn_dir: str, cache_in: Optional[str] = None,
                cache_out: Optional[str] = None, read_instead: Optional[Dict[str, str]] = None,
                transform: Optional[str] = None, transformed_path: Optional[str] = None) -> None:
        """Analyzes the spans into transform_fn_dir, as the executor does: with cache_in, reads only the
        spans keys_to_read names (None for the others); with cache_out, writes the cache of each span it read.

        read_instead {span: other CSV}: reads the other file under the span's key (what a cache
        that did not hold the span would be computed from). transform: a pattern of CSV files whose
        rows are transformed with the result and written as JSON lines to the file transformed_path.
        """
        import apache_beam as beam
        import tensorflow_transform.beam as tft_beam
        from tensorflow_transform.beam import analyzer_cache

        read_instead = read_instead or {}
        tfxio = self._tfxio(spans[0])
        with beam.Pipeline() as p, self._context():
            cache = p | "ReadCache" >> analyzer_cache.ReadAnalysisCacheFromFS(
                cache_in, [self.key(s) for s in spans]) if cache_in else {}
            # Without a cache the executor skips the inspection and reads every span.
            to_read = self.keys_to_read(spans, cache) if cache_in else {self.key(s) for s in spans}
            data = {}
            for i, span in enumerate(spans):
                source = read_instead.get(span, span)
                data[self.key(span)] = (p | f"Read[{i}]" >> self._tfxio(source).BeamSource()
                                        if self.key(span) in to_read else None)
            transform_fn, cache_output = ((data, cache, tfxio.TensorAdapterConfig())
                                          | "Analyze" >> tft_beam.AnalyzeDatasetWithCache(self.preprocessing_fn))
            _ = transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(transform_fn_dir)
            if cache_out:
                _ = cache_output | "WriteCache" >> analyzer_cache.WriteAnalysisCacheToFS(
                    p, cache_out, dataset_keys=[self.key(s) for s in spans])
            if transform:
                rows = p | "ReadToTransform" >> self._tfxio(transform).BeamSource()
                transformed, _ = (((rows, tfxio.TensorAdapterConfig()), transform_fn)
                                  | "Transform" >> tft_beam.TransformDataset())
                _ = (transformed | "Encode" >> beam.Map(_json_row)
                     | "Write" >> beam.io.WriteToText(transformed_path, shard_name_template=""))


def _json_row(instance) -> str:
    import numpy as np

    return json.dumps({k: np.asarray(v).tolist() for k, v in sorted(instance.items())}, sort_keys=True)


def summarize(times: Dict[str, List[float]], loads: Dict[str, List[float]]) -> Dict:
    """Medians per arm and the speed-up without/with: how many times longer the analysis takes
    without the cache than with it (> 1: the cache saves time), of the medians and of each round's
    pair (measured back to back, at about the same load)."""
    medians = {arm: statistics.median(t) for arm, t in times.items()}
    pairs = [without / with_ for with_, without in zip(times["with_cache"], times["without_cache"])]
    return {"seconds": times, "load_average_1m": loads, "median_seconds": medians,
            "speedup_without_over_with": medians["without_cache"] / medians["with_cache"],
            "speedup_per_round": pairs}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spans", type=int, default=3, help="spans in the window (the cache holds all but the newest)")
    parser.add_argument("--rows", type=int, default=2500, help="taxi rows per span (the CSV's rows again past its last)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (with cache, without, newest span alone)")
    args = parser.parse_args(argv)

    from components import feature_spec

    spec = feature_spec.load(TAXI_SPEC)
    work = tempfile.mkdtemp(prefix="bench_transform_cache_")
    spans = write_spans(spec, args.rows, args.spans, os.path.join(work, "spans"))
    analysis = SpanAnalysis(spec, work)
    cache_dir = os.path.join(work, "cache")
    analysis.analyze(spans[:-1], os.path.join(work, "warm"), cache_out=cache_dir)
    uncached = analysis.spans_read_with(spans, cache_dir)
    print(f"with the cache of {args.spans - 1} spans, tf.Transform reads: {uncached}")
    # The newest span alone, without a cache: the floor the cache could at best bring the window to.
    arms = {"with_cache": (spans, cache_dir), "without_cache": (spans, None), "newest_span_alone": (spans[-1:], None)}
    times = {arm: [] for arm in arms}
    loads = {arm: [] for arm in arms}
    for r in range(args.rounds):
        for arm, (window, cache) in arms.items():
            loads[arm].append(os.getloadavg()[0])
            start = time.perf_counter()
            # With a cache Transform also writes the new span's (executor.py: WriteCache into
            # updated_analyzer_cache); with disable_analyzer_cache it writes none.
            analysis.analyze(window, os.path.join(work, f"{arm}-{r}"), cache_in=cache,
                             cache_out=os.path.join(work, f"{arm}-{r}-cache") if cache else None)
            times[arm].append(time.perf_counter() - start)
            print(f"round {r + 1} {arm}: {times[arm][-1]:.1f} s (load {loads[arm][-1]:.1f})", flush=True)
    result = {"spans": args.spans, "rows_per_span": args.rows, "rounds": args.rounds,
              "spans_read_with_cache": uncached, **summarize(times, loads)}
    os.makedirs(os.path.dirname(JSON_PATH), exist_ok=True)
    with open(JSON_PATH, "w") as f:
        json.dump(result, f, indent=2)
    medians = result["median_seconds"]
    print(f"median with cache {medians['with_cache']:.1f} s, without {medians['without_cache']:.1f} s, newest span "
          f"alone {medians['newest_span_alone']:.1f} s: without/with {result['speedup_without_over_with']:.2f}x "
          f"(per round {', '.join(f'{r:.2f}' for r in result['speedup_per_round'])}; {JSON_PATH})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
