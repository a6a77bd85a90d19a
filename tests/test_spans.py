"""Spans: data.path with {SPAN} and data.rolling_spans, resolved by TFX's own ExampleGen."""

import dataclasses
import glob
import os

import pytest

from components import feature_spec

HEADER = "fare,trip_miles,payment_type,tips\n"


def write_spans(root, sizes):
    for span, rows in sizes.items():
        folder = root / f"span-{span}"
        folder.mkdir(parents=True)
        (folder / "data.csv").write_text(HEADER + "".join(f"{span}.{i},1.0,Cash,0.0\n" for i in range(rows)))


def spanned(tmp_path, rolling):
    spec = feature_spec.load("configs/taxi.yaml")
    return dataclasses.replace(spec, data_path=str(tmp_path / "spans") + "/span-{SPAN}/", rolling_spans=rolling)


def test_the_spec_reads_the_spans_of_the_window(tmp_path):
    """The window is span numbers newest - N + 1 to newest, TFX's RollingRange rule (below), not the
    newest N folders present: with spans 1, 2, 10 a window of 2 is span 10 alone, of 9 spans 2 and 10."""
    write_spans(tmp_path / "spans", {1: 3, 2: 4, 10: 5})
    (tmp_path / "spans" / "span-x").mkdir()  # not a span number: ignored, as ExampleGen ignores it
    spec = spanned(tmp_path, 2)
    assert spec.spans() == [1, 2, 10]
    assert spec.csv_files() == [str(tmp_path / "spans" / "span-10" / "data.csv")]
    assert spanned(tmp_path, 9).csv_files() == [str(tmp_path / "spans" / "span-2" / "data.csv"),
                                                str(tmp_path / "spans" / "span-10" / "data.csv")]
    assert spanned(tmp_path, None).csv_files() == [str(tmp_path / "spans" / "span-10" / "data.csv")]
    empty = dataclasses.replace(spec, data_path=str(tmp_path / "none") + "/span-{SPAN}/")
    with pytest.raises(feature_spec.SpecError, match=r"no span matches .*span-\{SPAN\}"):
        empty.csv_files()


def _window_strategy(spec, tmp_path):
    """The rolling_spans resolver's strategy exactly as create_pipeline configures it for `spec`."""
    from tfx.dsl.components.common import resolver

    from pipelines import pipeline as pipeline_lib

    built = pipeline_lib.create_pipeline(spec, pipeline_lib.Environment(pipeline_root=str(tmp_path / "root"),
                                                                        model_repository=str(tmp_path / "repo")))
    window = next(c for c in built.components if c.id == "rolling_spans")
    return window.exec_properties[resolver.RESOLVER_STRATEGY_CLASS](**window.exec_properties[resolver.RESOLVER_CONFIG])


def _examples(spans):
    from tfx.types import standard_artifacts

    artifacts = []
    for span in spans:
        artifact = standard_artifacts.Examples()
        artifact.set_int_custom_property("span", span)
        artifacts.append(artifact)
    return artifacts


def test_the_spec_and_the_pipelines_window_pick_the_same_spans(tmp_path):
    """What reads the data without TFX (pipelines/fingerprint.py's skip decision, ops/demo_drift.py's full
    run, the schema tool) takes spec.csv_files(); the pipeline trains on what TFX's SpanRangeStrategy
    resolves from ExampleGen's artifacts. With every span on disk ingested, they are the same spans."""
    write_spans(tmp_path / "spans", {1: 1, 2: 1, 10: 1})
    for window in (2, 3, 9, 10):
        spec = spanned(tmp_path, window)
        resolved = _window_strategy(spec, tmp_path).resolve_artifacts(None, {"examples": _examples(spec.spans())})
        chosen = sorted(a.get_int_custom_property("span") for a in resolved["examples"])
        assert chosen == spec.window_spans(), f"rolling_spans {window}"
        assert spec.csv_files() == [str(tmp_path / "spans" / f"span-{n}" / "data.csv") for n in chosen]
    assert spanned(tmp_path, 2).window_spans() == [10] and spanned(tmp_path, 9).window_spans() == [2, 10]


def test_rolling_spans_needs_a_span_pattern():
    raw = feature_spec.load("configs/taxi.yaml").raw
    with pytest.raises(feature_spec.SpecError, match=r"data.rolling_spans: needs \{SPAN\} in data.path"):
        feature_spec.parse({**raw, "data": {**raw["data"], "rolling_spans": 3}})
    with pytest.raises(feature_spec.SpecError, match="data.rolling_spans: must be positive, got 0"):
        feature_spec.parse({**raw, "data": {"path": "build/spans/span-{SPAN}/", "rolling_spans": 0}})
    spec = feature_spec.parse({**raw, "data": {"path": "build/spans/span-{SPAN}/", "rolling_spans": 3}})
    assert spec.rolling_spans == 3 and spec.has_spans


def test_a_relative_span_folder_stays_a_folder_for_example_gen():
    """build/spans/span-{SPAN}/ (README, make export-span): the trailing slash survives path resolution, so
    ExampleGen's pattern reads the span folder's CSVs, not the folder as a file."""
    from pipelines.pipeline import data_folder

    raw = feature_spec.load("configs/taxi.yaml").raw
    spec = feature_spec.parse({**raw, "data": {"path": "build/spans/span-{SPAN}/"}})
    spans = os.path.join(feature_spec.REPO_ROOT, "build", "spans")
    assert spec.data_path == os.path.join(spans, "span-{SPAN}") + "/"
    assert data_folder(spec) == (spans, "span-{SPAN}/*.csv")


def test_example_gen_ingests_the_newest_span_and_the_next_run_the_next(tmp_path):
    """TFX's driver resolves {SPAN}: each run ingests the newest span on disk, stamped with it."""
    import tensorflow as tf
    from tfx.orchestration import metadata, pipeline
    from tfx.orchestration.local.local_dag_runner import LocalDagRunner

    from pipelines import mlmd
    from pipelines.pipeline import _example_gen

    write_spans(tmp_path / "spans", {1: 3, 2: 4})
    spec = spanned(tmp_path, 2)
    db = str(tmp_path / "mlmd.sqlite")

    def run():
        LocalDagRunner().run(pipeline.Pipeline(
            pipeline_name="spans", pipeline_root=str(tmp_path / "root"), components=[_example_gen(spec)],
            metadata_connection_config=metadata.sqlite_metadata_connection_config(db), enable_cache=True))
        newest = max(mlmd.connect(db).get_artifacts_by_type("Examples"), key=lambda a: a.id)
        files = glob.glob(os.path.join(newest.uri, "Split-*", "*.gz"))
        return newest.custom_properties["span"].int_value, sum(
            1 for f in files for _ in tf.data.TFRecordDataset(f, compression_type="GZIP"))
    assert run() == (2, 4)
    write_spans(tmp_path / "spans", {3: 5})  # a new span arrives
    assert run() == (3, 5)


def test_training_reads_the_window_and_validation_the_newest_span(tmp_path):
    from tfx.proto import range_config_pb2

    from pipelines import pipeline as pipeline_lib

    write_spans(tmp_path / "spans", {1: 3})
    spec = spanned(tmp_path, 2)
    built = pipeline_lib.create_pipeline(spec, pipeline_lib.Environment(pipeline_root=str(tmp_path / "root"),
                                                                        model_repository=str(tmp_path / "repo")))
    nodes = {c.id: c for c in built.components}
    window = nodes["rolling_spans"]
    assert nodes["Transform"].inputs["examples"].producer_component_id == "rolling_spans"
    assert nodes["StatisticsGen"].inputs["examples"].producer_component_id == "CsvExampleGen"
    assert nodes["Evaluator"].inputs["examples"].producer_component_id == "CsvExampleGen"
    assert nodes["data_gate"].inputs["previous_statistics"].producer_component_id == "previous_span_statistics"
    # Transform reads the latest analyzer cache (without it the cache is written and never read).
    assert nodes["Transform"].inputs["analyzer_cache"].producer_component_id == "previous_analyzer_cache"
    # The window's strategy, with the config the pipeline gives it, keeps the newest two spans.
    from tfx.dsl.components.common import resolver

    config = window.exec_properties[resolver.RESOLVER_CONFIG]
    strategy = window.exec_properties[resolver.RESOLVER_STRATEGY_CLASS](**config)
    resolved = strategy.resolve_artifacts(None, {"examples": _examples((1, 2, 3))})
    assert sorted(a.get_int_custom_property("span") for a in resolved["examples"]) == [2, 3]
    from tfx.dsl.compiler import compiler

    compiled = compiler.Compiler().compile(built)  # what LocalDagRunner runs: the window compiles
    assert "rolling_spans" in {n.pipeline_node.node_info.id for n in compiled.nodes}
    assert isinstance(config["range_config"], range_config_pb2.RangeConfig)
    single = pipeline_lib.create_pipeline(spanned(tmp_path, 1), pipeline_lib.Environment(
        pipeline_root=str(tmp_path / "root"), model_repository=str(tmp_path / "repo")))
    assert not {"rolling_spans", "previous_analyzer_cache"} & {c.id for c in single.components}


@pytest.fixture(scope="module")
def taxi_span_statistics(taxi_spec, tmp_path_factory):
    """TFDV statistics of two consecutive 300-row taxi spans cut by trip_start_timestamp (ops/demo_drift.py's
    cut), the second shifted as demo_drift shifts it, and its first 100 rows; and the curated schema.
    generate_statistics_from_csv types the columns with tfx_bsl's CSV decoder, as CsvExampleGen does."""
    import tensorflow_data_validation as tfdv
    from google.protobuf import text_format
    from tensorflow_metadata.proto.v0 import schema_pb2

    from ops import demo_drift

    header, rows = demo_drift.read_taxi(taxi_spec)
    spans = demo_drift.cut_spans(rows, len(rows) // 300, 300)
    earlier, later = spans[20], spans[21]
    folder = tmp_path_factory.mktemp("span_statistics")
    samples = {"earlier": earlier, "later": later, "shifted": demo_drift.shift(later),
               "small": demo_drift.shift(later)[:100]}
    stats = {name: tfdv.generate_statistics_from_csv(demo_drift.write_span(str(folder), i, header, sample) + "/data.csv")
             for i, (name, sample) in enumerate(samples.items())}
    with open(feature_spec.resolve_path(taxi_spec.raw["schema"])) as f:
        return stats, text_format.Parse(f.read(), schema_pb2.Schema())


def test_unshifted_taxi_spans_of_the_judged_size_pass_the_span_bounds(taxi_spec, taxi_span_statistics):
    """configs/taxi.yaml's monitoring.span_drift: 300 rows a span (above its 250 values a feature); what holds
    fewer values (company, the census tracts) and what the spec ignores (the time the spans are cut by) is
    not judged, and said so; every other feature is measured, below its bound."""
    from components.spans import span_drift

    stats, schema = taxi_span_statistics
    measured, unjudged = span_drift(stats["later"], stats["earlier"], schema, taxi_spec.monitoring.span_drift)
    assert [m["feature"] for m in measured if m["drifted"]] == []
    assert set(unjudged) == {"company", "pickup_census_tract", "dropoff_census_tract", "trip_start_timestamp",
                             "trip_start_month"}
    assert unjudged["trip_start_month"] == "monitoring.span_drift.ignore lists it"
    assert unjudged["company"].startswith("n < min: ") and "min_values is 250" in unjudged["company"]
    assert {m["feature"] for m in measured} == {f.name for f in schema.feature} - set(unjudged)
    bound = {m["feature"]: (m["comparator"], m["threshold"]) for m in measured}
    assert bound["payment_type"] == ("L_INFTY", pytest.approx(0.15))
    assert bound["fare"] == ("JENSEN_SHANNON_DIVERGENCE", pytest.approx(0.15))
    assert bound["trip_start_day"] == ("JENSEN_SHANNON_DIVERGENCE", pytest.approx(0.4))  # its own bound


def test_the_shifted_span_fails_naming_its_features_and_a_small_one_is_not_judged(taxi_spec, taxi_span_statistics):
    """Fares x1.5 and card payers paying cash (ops/demo_drift.py shift): fare and payment_type past their
    bounds, nothing else. The same shift on 100 rows is below min_values for every feature: not judged."""
    from components.spans import drift_problems, span_drift

    stats, schema = taxi_span_statistics
    bounds = taxi_spec.monitoring.span_drift
    problems = drift_problems(stats["shifted"], stats["earlier"], schema, bounds)
    assert [p.split("'")[1] for p in problems] == ["fare", "payment_type"], problems
    assert problems[0].startswith("[train] feature 'fare': drifted from the previous span: JENSEN_SHANNON_DIVERGENCE")
    assert problems[0].endswith("> 0.15 (the spec's monitoring.span_drift)")
    assert " L_INFTY " in problems[1] and problems[1].endswith("> 0.15 (the spec's monitoring.span_drift)")
    measured, unjudged = span_drift(stats["small"], stats["earlier"], schema, bounds)
    assert measured == [] and set(unjudged) == {f.name for f in schema.feature}
    assert unjudged["fare"] == ("n < min: 300 values in the previous span, 100 in this one; "
                                "monitoring.span_drift.min_values is 250")


def test_span_drift_names_only_columns_of_the_spec():
    raw = feature_spec.load("configs/taxi.yaml").raw
    for key, names in (("ignore", ["trip_start_timestamp", "pickup_time"]),
                       ("features", {"pickup_time": {"jensen_shannon_divergence": 0.4}})):
        block = {**raw["monitoring"], "span_drift": {**raw["monitoring"]["span_drift"], key: names}}
        with pytest.raises(feature_spec.SpecError, match=rf"monitoring.span_drift.{key}: 'pickup_time' is not a "
                                                          r"declared column \(columns: tips, fare, "):
            feature_spec.parse({**raw, "monitoring": block})


def test_previous_span_statistics_are_the_newest_earlier_span():
    from tfx.types import standard_artifacts

    from components.spans import CURRENT, STATISTICS, PreviousSpanStatisticsStrategy

    def stats(span, artifact_id):
        a = standard_artifacts.ExampleStatistics()
        a.span, a.id = span, artifact_id
        return a
    current = stats(5, 9)
    older = [stats(3, 1), stats(4, 2), stats(4, 3), stats(5, 9)]
    resolved = PreviousSpanStatisticsStrategy().resolve_artifacts(None, {STATISTICS: older, CURRENT: [current]})
    assert [(a.span, a.id) for a in resolved[STATISTICS]] == [(4, 3)] and resolved[CURRENT] == [current]
    first = PreviousSpanStatisticsStrategy().resolve_artifacts(None, {STATISTICS: [current], CURRENT: [current]})
    assert first[STATISTICS] == []  # the first span has nothing to drift from


def test_previous_span_statistics_on_a_store_are_found_by_the_span_their_examples_had(tmp_path):
    """On a store as TFX 1.16 writes it every ExampleStatistics' declared span is 0 (tests/test_mlmd.py
    _spans_store): the strategy reads the span through lineage, and of span 2 ingested twice the latest."""
    from tfx.types import standard_artifacts

    from components.spans import CURRENT, STATISTICS, PreviousSpanStatisticsStrategy
    from pipelines import mlmd
    from tests.test_mlmd import _spans_store

    run, statistics = _spans_store(str(tmp_path / "mlmd.sqlite"))
    third = run.artifact("ExampleStatistics", "/root/StatisticsGen/statistics/50")
    run.execution("StatisticsGen", {"examples": [run.artifact("Examples", "/root/CsvExampleGen/examples/50", span=3)]},
                  {"statistics": [third]})

    def wrapped(proto):
        artifact = standard_artifacts.ExampleStatistics()
        artifact.set_mlmd_artifact(proto)
        return artifact
    store = mlmd.connect(str(tmp_path / "mlmd.sqlite"))
    every = [wrapped(a) for a in store.get_artifacts_by_type("ExampleStatistics")]
    by_id = {a.id: a for a in every}
    assert {a.span for a in every} == {0}
    strategy = PreviousSpanStatisticsStrategy()
    resolved = strategy.resolve_artifacts(store, {STATISTICS: every, CURRENT: [by_id[third.id]]})
    assert [a.id for a in resolved[STATISTICS]] == [statistics[2].id]  # span 2's second ingestion
    again = strategy.resolve_artifacts(store, {STATISTICS: every, CURRENT: [by_id[statistics[2].id]]})
    assert [a.id for a in again[STATISTICS]] == [statistics[0].id]  # span 2 re-ingested: against span 1
    first = strategy.resolve_artifacts(store, {STATISTICS: every, CURRENT: [by_id[statistics[0].id]]})
    assert first[STATISTICS] == []


def test_the_analyzer_cache_is_the_newest_and_none_before_the_first_transform():
    from tfx.types import standard_artifacts

    from components.spans import CACHE, LatestAnalyzerCacheStrategy

    caches = []
    for artifact_id in (4, 9, 2):
        caches.append(standard_artifacts.TransformCache())
        caches[-1].id = artifact_id
    assert [a.id for a in LatestAnalyzerCacheStrategy().resolve_artifacts(None, {CACHE: caches})[CACHE]] == [9]
    assert LatestAnalyzerCacheStrategy().resolve_artifacts(None, {CACHE: []}) == {CACHE: []}


def test_retraining_refuses_data_it_has_seen(tmp_path):
    """make retrain: never the same data again (the newest span must be one ExampleGen never ingested)."""
    from pipelines import span_window
    from tests.test_mlmd import Run

    write_spans(tmp_path / "spans", {1: 3, 2: 4})
    spec = spanned(tmp_path, 2)
    env = {"metadata_path": str(tmp_path / "mlmd.sqlite")}
    assert span_window.require_new_span(spec, env) == 2  # no store yet: everything is new
    run = Run(env["metadata_path"])
    from ml_metadata.proto import metadata_store_pb2 as pb2

    run.store.put_artifact_type(pb2.ArtifactType(name="Examples", properties={"span": pb2.INT}),
                                can_add_fields=True)  # TFX declares span as a property of Examples
    ingested = run.artifact("Examples", str(tmp_path / "root" / "CsvExampleGen" / "examples" / "20"))
    # ...but its ExampleGen driver writes the span as a custom property (tfx/components/example_gen/driver.py:55-57)
    ingested.custom_properties["span"].int_value = 2
    run.store.put_artifacts([ingested])
    with pytest.raises(span_window.NothingNew, match="span 2 .* was trained on already: export a new span"):
        span_window.require_new_span(spec, env)
    write_spans(tmp_path / "spans", {3: 5})
    assert span_window.require_new_span(spec, env) == 3
    with pytest.raises(span_window.NothingNew, match="is one dataset, not spans"):
        span_window.require_new_span(feature_spec.load("configs/taxi.yaml"), env)


def test_a_run_first_ingests_the_windows_spans_its_example_gen_would_skip(tmp_path):
    """TFX 1.16's ExampleGen ingests the newest span per run (tfx/components/example_gen/input_processor.py
    40-57: a rolling range of one span, or a static range of one); the window's older spans ExampleGen never
    ingested are ingested first, oldest first: the spans window_spans() counts, and no others."""
    from pipelines.span_window import spans_to_ingest

    write_spans(tmp_path / "spans", {1: 1, 2: 1, 3: 1})
    spec = spanned(tmp_path, 3)
    assert spans_to_ingest(spec, []) == [1, 2]  # a first run over a folder of three spans
    assert spans_to_ingest(spec, [3]) == [1, 2]  # two spans arrived before the run that took the newest
    assert spans_to_ingest(spec, [1]) == [2]
    assert spans_to_ingest(spec, [1, 2, 3]) == []
    assert spans_to_ingest(spanned(tmp_path, 2), []) == [2]  # span 1 is outside a window of two
    assert spans_to_ingest(spanned(tmp_path, 1), []) == []  # the run's own ExampleGen takes the one span
    assert spans_to_ingest(spanned(tmp_path, None), []) == []
    write_spans(tmp_path / "spans", {10: 1})  # a gap: the window of 9 is spans 2, 3 and 10 (window_spans)
    assert spans_to_ingest(spanned(tmp_path, 9), [1]) == [2, 3]
    assert spans_to_ingest(feature_spec.load("configs/taxi.yaml"), []) == []  # one CSV: nothing extra runs


def _taxi_spans(taxi_spec, tmp, rolling, drift=None):
    """A taxi spec over tmp/spans/span-{SPAN}/ with `rolling` spans and `drift` as monitoring.span_drift (None:
    no span-to-span check), an Environment on tmp with Beam in memory, the store's path and the taxi rows."""
    import yaml
    from tfx.orchestration import metadata

    from pipelines import pipeline as pipeline_lib
    from tests.conftest import REPO, TAXI_SPEC, read_rows, taxi_csv_path

    with open(TAXI_SPEC) as f:
        raw = yaml.safe_load(f)
    raw["schema"] = os.path.join(REPO, raw["schema"])
    raw["data"] = {**raw["data"], "path": str(tmp / "spans") + "/span-{SPAN}/", "rolling_spans": rolling}
    if drift is None:
        raw["monitoring"].pop("span_drift")
    else:
        raw["monitoring"]["span_drift"] = drift
    db = str(tmp / "mlmd.sqlite")
    environment = pipeline_lib.Environment(
        pipeline_root=str(tmp / "root"), model_repository=str(tmp / "models"),
        metadata_connection_config=metadata.sqlite_metadata_connection_config(db),
        beam_pipeline_args=["--direct_running_mode=in_memory", "--direct_num_workers=1"])
    return feature_spec.parse(raw, source="spans.yaml"), environment, db, read_rows(taxi_csv_path(taxi_spec), limit=360)


@pytest.fixture(scope="module")
def window_runs(taxi_spec, tmp_path_factory):
    """One run of the pipeline up to Transform over four taxi spans (90 rows each) with rolling_spans 3,
    after the ingestion local_runner.run() does first; span 1 was ingested by an earlier run (so it is
    in the store, and out of the window). Returns (metadata path, spec, console lines, ingested spans,
    spans Transform read). One Transform run: the suite's 15-minute budget."""
    import io

    from tfx.orchestration import pipeline
    from tfx.orchestration.local.local_dag_runner import LocalDagRunner

    from pipelines import local_runner, mlmd, pipeline as pipeline_lib
    from tests.conftest import write_sample

    tmp = tmp_path_factory.mktemp("window")
    # 90 rows a span are too few for the span-to-span drift bounds: no drift check
    spec, environment, db, rows = _taxi_spans(taxi_spec, tmp, 3)
    write_sample(rows[:90], str(tmp / "spans" / "span-1"))
    LocalDagRunner().run(pipeline_lib.span_ingestion_pipeline(spec, environment, 1))  # an earlier run's span
    for span in (2, 3, 4):  # three spans arrive before the next run
        write_sample(rows[(span - 1) * 90:span * 90], str(tmp / "spans" / f"span-{span}"))
    console = io.StringIO()
    local_runner.ingest_window_spans(spec, environment, db, out=console)
    LocalDagRunner().run(pipeline_lib.create_pipeline(spec, environment),
                         run_options=pipeline.RunOptions(to_nodes=["Transform"]))
    return (db, spec, console.getvalue().splitlines(), mlmd.ingested_spans(db),
            mlmd.spans_read(db, spec.name, "Transform"))


@pytest.mark.slow
def test_the_window_trains_on_every_span_that_arrived(window_runs):
    """Transform's input Examples, as ML Metadata recorded them, cover the whole window: spans 2-4 when
    three spans arrived at once after span 1 (without the ingestion, only span 4); span 1 is in the store
    but out of the window; no span is read twice."""
    from pipelines import span_window

    db, spec, lines, ingested, read = window_runs
    assert [line.split(" of the window")[0].strip() for line in lines] == ["ingesting span 2", "ingesting span 3"]
    assert ingested == [1, 2, 3, 4] and read == [2, 3, 4]
    # make retrain's rule on the store TFX wrote: span 4, the newest, was trained on.
    with pytest.raises(span_window.NothingNew, match="span 4 .* was trained on already"):
        span_window.require_new_span(spec, {"metadata_path": db})


@pytest.mark.slow
def test_a_real_run_gates_a_span_that_drifted_from_the_one_before(taxi_spec, tmp_path, caplog):
    """LocalDagRunner over consecutive taxi spans of 800 rows cut by trip_start_timestamp (ops/demo_drift.py's
    cut: the file's own order is no null, its first rows lack the pickup location), rolling_spans 2, with
    configs/taxi.yaml's own monitoring.span_drift: each split holds 250 values or more of most features (the
    train split about 530 rows, the eval split about 270). Span 2 passes the gate against span 1; span 3, fares
    x100, stops the run at the data gate, before Transform, naming fare, its distance and the
    bound. The previous span's statistics reach the gate only because PreviousSpanStatisticsStrategy reads
    their span through lineage (TFX leaves it 0)."""
    import logging
    import re

    from tfx.orchestration import pipeline as tfx_pipeline
    from tfx.orchestration.local.local_dag_runner import LocalDagRunner

    from ops import demo_drift
    from pipelines import local_runner, mlmd, pipeline as pipeline_lib
    from tests.conftest import write_sample

    spec, environment, db, _ = _taxi_spans(taxi_spec, tmp_path, 2, drift=taxi_spec.raw["monitoring"]["span_drift"])
    header, rows = demo_drift.read_taxi(taxi_spec)
    spans = demo_drift.cut_spans(rows, len(rows) // 800, 800)[10:13]
    write_sample(spans[0], str(tmp_path / "spans" / "span-1"))
    write_sample(spans[1], str(tmp_path / "spans" / "span-2"))
    assert local_runner.ingest_window_spans(spec, environment, db) == [1]
    caplog.set_level(logging.INFO)
    LocalDagRunner().run(pipeline_lib.create_pipeline(spec, environment),
                         run_options=tfx_pipeline.RunOptions(to_nodes=["data_gate"]))
    measured = re.findall(r"data gate: \[(\w+)\] feature '(\w+)' against the previous span: (\w+) "
                          r"([0-9.]+) \(bound ([0-9.]+)\)( DRIFTED)?", caplog.text)
    bounds = {(split, feature): (comparator, float(bound)) for split, feature, comparator, _, bound, _ in measured}
    assert bounds[("train", "fare")] == bounds[("eval", "fare")] == ("JENSEN_SHANNON_DIVERGENCE", 0.15)
    assert bounds[("eval", "payment_type")] == ("L_INFTY", 0.15)
    assert [(split, feature) for split, feature, *_, flag in measured if flag] == []
    assert "data gate: [eval] feature 'trip_start_timestamp' not judged against the previous span: " \
           "monitoring.span_drift.ignore lists it" in caplog.text
    _the_report_shows_what_the_gate_judged(spec, environment, tmp_path, 2, caplog.text, drifted=[])
    caplog.clear()

    shifted = [{**row, "fare": str(float(row["fare"] or 0) * 100)} for row in spans[2]]
    write_sample(shifted, str(tmp_path / "spans" / "span-3"))
    assert local_runner.ingest_window_spans(spec, environment, db) == []  # span 2 is in the store
    with pytest.raises(Exception) as failed:
        LocalDagRunner().run(pipeline_lib.create_pipeline(spec, environment))
    message = str(failed.value)
    found = re.findall(r"\[(\w+)\] feature '(\w+)': drifted from the previous span: (\w+) ([0-9.]+) > ([0-9.]+)",
                       message)
    assert {feature for _, feature, *_ in found} == {"fare"}, message
    assert all(comparator == "JENSEN_SHANNON_DIVERGENCE" and float(value) > 0.15 and float(bound) == 0.15
               for _, _, comparator, value, bound in found)
    assert mlmd.spans_read(db, spec.name, "StatisticsGen") == [3]
    assert mlmd.spans_read(db, spec.name, "Transform") == []  # the gate stopped the run before Transform
    _the_report_shows_what_the_gate_judged(spec, environment, tmp_path, 3, caplog.text, ["fare"], failed.value)



def _the_report_shows_what_the_gate_judged(spec, environment, tmp_path, span, gate_log, drifted, error=None):
    """After a run through the data gate of `span` (span - 1 before it): the run's summary and data report
    show what the gate judged (pipelines/report.py span_drift, on the gate's inputs ML Metadata recorded,
    also when the gate stopped the run): per compared feature and split TFDV's comparator, the distance,
    the bound and the verdict, exactly the lines the gate logged (`gate_log`), the `drifted` features
    flagged; and each feature the gate did not judge, with its reason."""
    import html
    import re

    from pipelines import report
    from tests import browser

    logged = {(feature, split): (comparator, float(value), float(bound), bool(flag)) for split, feature, comparator,
              value, bound, flag in re.findall(r"data gate: \[(\w+)\] feature '(\w+)' against the previous span: "
                                               r"(\w+) ([0-9.]+) \(bound ([0-9.]+)\)( DRIFTED)?", gate_log)}
    unjudged = {(feature, split): why for split, feature, why in re.findall(
        r"data gate: \[(\w+)\] feature '(\w+)' not judged against the previous span: (.*)", gate_log)}
    assert logged and unjudged
    summary = report.build_summary(spec, {"model_repository": environment.model_repository}, environment, [], {},
                                   0.0, error)
    drift = summary["span_drift"]
    assert (drift["span"], drift["previous_span"]) == (span, span - 1)
    measured = {(m["feature"], m["split"]): m for m in drift["measurements"]}
    assert {key: (m["comparator"], round(m["value"], 4), m["threshold"], m["drifted"])
            for key, m in measured.items()} == logged
    assert {(n["feature"], n["split"]): n["why"] for n in drift["not_judged"]} == unjudged
    assert {feature for (feature, _), m in measured.items() if m["drifted"]} == set(drifted)
    with open(report.write_html(summary, spec, str(tmp_path / f"reports-{span}"))["data"]) as f:
        page = f.read().replace("'", '"')  # the attribute quotes a browser's DOM would show
    rows = {(r["cells"][0], r["cells"][1]): r for r in browser.table_rows(page, "span-drift")}
    assert set(rows) == set(measured) | set(unjudged)
    for key, m in measured.items():
        verdict = "DRIFTED" if m["drifted"] else "within bound"
        assert rows[key]["cells"][2:] == [m["comparator"], f"{m['value']:.4f}", f"{m['threshold']:.4f}", verdict]
        assert rows[key]["class"] == ("flagged" if m["drifted"] else "")
    for key, why in unjudged.items():
        assert html.unescape(rows[key]["cells"][-1]) == f"not judged: {why}" and rows[key]["class"] == ""
    assert f"Span {span} against span {span - 1}" in page


def test_a_spans_spec_refuses_a_store_where_its_pipeline_ingested_another_input(tmp_path):
    """A spans spec copied from taxi.yaml keeps name: taxi, and so the pipeline and store `make run` uses.
    TFX's ExampleGen stamps a single CSV's Examples span 0, and SpanRangeStrategy takes every Examples
    of the pipeline's ExampleGen in the store: with 3 rolling spans and newest span 2 the window holds the
    whole CSV (span_range_strategy.py:93-100). create_pipeline refuses such a store, naming it, the spec's
    name key and the fix; over its own spans alone it builds."""
    from tfx.orchestration import metadata, pipeline
    from tfx.orchestration.local.local_dag_runner import LocalDagRunner
    from tfx.proto import range_config_pb2
    from tfx.dsl.input_resolution.strategies.span_range_strategy import SpanRangeStrategy
    from tfx.types import standard_artifacts

    from pipelines import mlmd, pipeline as pipeline_lib

    write_spans(tmp_path / "spans", {1: 3, 2: 3})
    spans = spanned(tmp_path, 3)
    (tmp_path / "single").mkdir()
    (tmp_path / "single" / "data.csv").write_text(HEADER + "9.0,1.0,Cash,0.0\n" * 3)
    single = dataclasses.replace(spans, data_path=str(tmp_path / "single" / "data.csv"), rolling_spans=None)
    db = str(tmp_path / "mlmd.sqlite")
    env = pipeline_lib.Environment(pipeline_root=str(tmp_path / "root"), model_repository=str(tmp_path / "models"),
                                   metadata_connection_config=metadata.sqlite_metadata_connection_config(db))

    def ingest(spec):
        LocalDagRunner().run(pipeline.Pipeline(pipeline_name=spec.name, pipeline_root=env.pipeline_root,
                                               components=[pipeline_lib._example_gen(spec)],
                                               metadata_connection_config=env.metadata_connection_config))
    ingest(spans)  # span 2, the newest
    pipeline_lib.create_pipeline(spans, env)  # its own spans only: no refusal
    ingest(single)  # `make run` of taxi.yaml: the same pipeline name and store
    assert spans.name == single.name == "taxi" and mlmd.ingested_spans(db) == [0, 2]

    def wrapped(proto):
        artifact = standard_artifacts.Examples()
        artifact.set_mlmd_artifact(proto)
        return artifact
    window = SpanRangeStrategy(range_config_pb2.RangeConfig(rolling_range=range_config_pb2.RollingRange(num_spans=3)))
    every = [wrapped(a) for a in mlmd.connect(db).get_artifacts_by_type("Examples")]
    resolved = window._resolve({"examples": every})["examples"]
    assert [a.get_int_custom_property("span") for a in resolved] == [2, 0]  # the whole CSV joins the window
    with pytest.raises(feature_spec.SpecError) as refused:  # what the local runner prints without a traceback
        pipeline_lib.create_pipeline(spans, env)
    message = str(refused.value)
    assert message.startswith(f"{db}: pipeline 'taxi' already ingested {tmp_path / 'single' / 'data.csv'} (span 0)")
    assert f"not this spec's spans {tmp_path / 'spans' / 'span-{SPAN}/*.csv'}" in message
    assert f"own name: key in {spans.source} (e.g. name: taxi_spans" in message and f"remove {db}" in message
