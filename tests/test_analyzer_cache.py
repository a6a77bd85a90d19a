"""tf.Transform's analyzer cache across spans, run on the project's own preprocessing_fn.

The pipeline wires Transform's analyzer_cache input to the newest cache (tests/test_spans.py); this
proves the cache then does its work: every analyzer of preprocessing_fn takes an older span from
the cache instead of the data. The analysis runs as the Transform component runs it
(tfx/components/transform/executor.py, TFX 1.16: `_Dataset.__init__` keys each input by its file
pattern, `_OptimizeRun` reads the cache and asks `get_analysis_dataset_keys` which inputs are left
to read, `AnalyzeDatasetWithCache` then `WriteAnalysisCacheToFS`), through
benchmarks/bench_transform_cache.py's SpanAnalysis, so the benchmark measures the path proved here.
tf.Transform keys a cache entry by the analyzer and the dataset key, never by the data
(tensorflow_transform/beam/analyzer_cache.py: DatasetKey, make_cache_entry_key): a span whose rows
changed under the same key is served its old results, which is what the test below exploits.
"""

import csv
import json
import os

import numpy as np
import pytest

from benchmarks.bench_transform_cache import SpanAnalysis, summarize, write_csv, write_spans

ROWS_PER_SPAN = 200


@pytest.fixture(scope="module")
def spans_analysed(taxi_spec, tmp_path_factory):
    """Spans 1 and 2 analysed from their rows (their cache written), then again with that cache while
    span 1's key reads other rows: span 1's rows three times over, every value moved (`_moved`). Both
    runs transform the rows of spans 1 and 2 with what they analysed."""
    work = str(tmp_path_factory.mktemp("analyzer_cache"))
    spans = write_spans(taxi_spec, ROWS_PER_SPAN, 3, os.path.join(work, "spans"))
    moved = _moved(taxi_spec, spans[0], os.path.join(work, "moved", "data.csv"))
    analysis = SpanAnalysis(taxi_spec, work)
    cache = os.path.join(work, "cache")
    outputs = {}
    for name, options in {"from_rows": dict(cache_out=cache),
                          "from_cache": dict(cache_in=cache, read_instead={spans[0]: moved})}.items():
        transformed = os.path.join(work, name)
        analysis.analyze(spans[:2], os.path.join(work, f"{name}_transform_fn"),
                         transform=os.path.join(work, "spans", "span-[12]", "data.csv"),
                         transformed_path=transformed, **options)
        outputs[name] = _columns(transformed)
    return analysis, spans, cache, outputs


def _moved(spec, source, path, copies=3):
    """source's rows `copies` times, each int + 10**6, each float + 1000, each string prefixed: an
    analyzer that read them would find other means, variances, quantiles (all shifted) and
    vocabularies (new tokens, three times as frequent as span 1's, ranked before span 2's)."""
    header, *rows = _csv_rows(source)
    types = {name: column.type for name, column in spec.columns.items()}
    move = {"int": lambda v: str(int(v) + 10**6), "float": lambda v: repr(float(v) + 1000.0),
            "string": lambda v: "moved " + v}
    moved = [[move[types[c]](v) if v and c in types else v for c, v in zip(header, row)] for row in rows]
    return write_csv(path, header, moved * copies)


def _columns(path):
    """{output: values} over the transformed rows, rows in one canonical order (Beam keeps none)."""
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    rows.sort(key=lambda r: json.dumps({k: np.round(v, 4).tolist() for k, v in r.items()}, sort_keys=True))
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def _differing(a, b):
    return sorted(k for k in a if not np.allclose(a[k], b[k], rtol=1e-5, atol=1e-6))


# Two tf.Transform Beam runs with 28 cache entries per span: minutes on a loaded 2-core machine.
@pytest.mark.slow
def test_with_the_cache_of_older_spans_only_the_new_span_is_read(spans_analysed):
    analysis, spans, cache, _ = spans_analysed
    # A non-cacheable analyzer needs the flattened dataset, and tf.Transform then names every span
    # (analysis_graph_builder.get_analysis_dataset_keys): only span-3 means each analyzer is cached.
    assert analysis.spans_read_with(spans, cache) == ["span-3"]
    assert sorted(os.listdir(cache)) == ["span-1", "span-2"]


@pytest.mark.slow
def test_every_analyzer_takes_the_cached_span_from_the_cache(spans_analysed):
    _, _, _, outputs = spans_analysed
    # Had any analyzer read span 1's key, the moved rows would have changed its outputs.
    assert _differing(outputs["from_rows"], outputs["from_cache"]) == []
    assert outputs["from_rows"]["fare_xf"].shape == (2 * ROWS_PER_SPAN,)


def test_write_spans_cuts_consecutive_rows_and_starts_again_past_the_last(taxi_spec, tmp_path):
    source = _csv_rows(taxi_spec.csv_files()[0])
    header, rows = source[0], source[1:]
    assert [_csv_rows(s) for s in write_spans(taxi_spec, 3, 2, str(tmp_path / "small"))] == [
        [header] + rows[0:3], [header] + rows[3:6]]
    # 15,002 rows: span 2 of 10,000 holds rows 10,000 to 15,001, then rows 0 to 4,997.
    second = _csv_rows(write_spans(taxi_spec, 10000, 2, str(tmp_path / "large"))[1])
    assert len(rows) == 15002 and second == [header] + rows[10000:] + rows[:4998]


def _csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_summary_is_the_ratio_of_the_medians_without_over_with():
    loads = {"with_cache": [5.0, 6.0, 7.0], "without_cache": [5.5, 6.5, 7.5], "newest_span_alone": [6.0, 6.0, 6.0]}
    summary = summarize({"with_cache": [10.0, 30.0, 20.0], "without_cache": [40.0, 60.0, 50.0],
                         "newest_span_alone": [9.0, 8.0, 7.0]}, loads)
    assert summary["median_seconds"] == {"with_cache": 20.0, "without_cache": 50.0, "newest_span_alone": 8.0}
    assert summary["speedup_without_over_with"] == pytest.approx(2.5)
    assert summary["speedup_per_round"] == pytest.approx([4.0, 2.0, 2.5])
    assert summary["load_average_1m"] is loads
