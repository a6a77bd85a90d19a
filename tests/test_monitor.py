"""The skew and drift monitor on logged taxi traffic: a clean replay, a shifted one, and its edges.

Training statistics are computed here with TFDV from 10,000 taxi rows, so no pipeline run is
needed; served traffic is the other rows, sent as clients send them and logged as the proxy logs.
"""

import json
import math
import os
import re
import sys
import time

import pytest

from tests import monitor_data as data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = os.path.join(ROOT, "configs", "taxi.yaml")
WINDOW = ["--start", str(data.CURRENT_START), "--end", str(data.CURRENT_END)]


class FakePopen:
    """Stands in for subprocess.Popen: records what would have been started."""

    calls = []

    def __init__(self, command, **kwargs):
        FakePopen.calls.append((command, kwargs))
        self.pid = 4242


@pytest.fixture(scope="module")
def spans_spec(tmp_path_factory):
    """taxi's spec over a folder of spans, as README's configs/my_taxi_spans.yaml: what --retrain needs."""
    import yaml

    with open(SPEC) as f:
        raw = yaml.safe_load(f)
    folder = tmp_path_factory.mktemp("spans")
    raw["data"] = {**raw["data"], "path": str(folder / "span-{SPAN}") + "/", "rolling_spans": 3}
    (folder / "span-1").mkdir()  # one span, never ingested: the retraining run has data it has not seen
    path = folder / "taxi_spans.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture(scope="module")
def spans_env(tmp_path_factory):
    """configs/local.yaml with its ML Metadata store in a folder of the test's own (no store yet)."""
    import yaml

    with open(os.path.join(ROOT, "configs", "local.yaml")) as f:
        raw = yaml.safe_load(f)
    folder = tmp_path_factory.mktemp("env")
    raw["metadata_path"] = str(folder / "metadata" / "{name}.sqlite")
    path = folder / "local.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path), str(folder / "metadata" / "taxi.sqlite")


@pytest.fixture(scope="module")
def rows(taxi_spec):
    return data.split_rows(taxi_spec)


@pytest.fixture(scope="module")
def training_statistics(taxi_spec, rows, tmp_path_factory):
    from ops import monitor

    stats = monitor.compute_statistics(monitor.typed_rows(rows[0], taxi_spec), taxi_spec)
    path = tmp_path_factory.mktemp("training") / "FeatureStats.pb"
    path.write_bytes(stats.SerializeToString())
    return str(path)


def _log(tmp_path, previous_rows, current_rows, spec, name="log.sqlite", noise=True, url=None):
    """Previous window then current window; plus failed and shadow requests carrying shifted rows,
    which the monitor must not count. Into tmp_path/name, or the log at url."""
    records = (data.log_records(data.as_instances(previous_rows, spec), data.PREVIOUS_START, data.CURRENT_START,
                                prefix="p")
               + data.log_records(data.as_instances(current_rows, spec), data.CURRENT_START, data.CURRENT_END,
                                  prefix="c"))
    if noise:
        junk = data.as_instances(data.shifted(current_rows[:1500]), spec)
        records += data.log_records(junk, data.CURRENT_START, data.CURRENT_END, status=400, prefix="bad")
        records += data.log_records(junk, data.CURRENT_START, data.CURRENT_END, shadow=1, prefix="c")
    return data.write_log(url or str(tmp_path / name), records)


def _run(log, training_statistics, out_dir, *extra, popen=None, spec=SPEC):
    from ops import monitor

    FakePopen.calls = []
    argv = ["--log", log, "--model", "taxi", "--spec", spec, *WINDOW, "--training_statistics", training_statistics,
            "--out_dir", str(out_dir), *extra]
    code = monitor.main(argv, popen=popen or FakePopen)
    report_path = out_dir / "taxi_monitor.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else None
    return code, report


def _flagged(report, kind):
    return {a["feature"] for a in report["anomalies"] if a["kind"] == kind}


@pytest.fixture(scope="module")
def clean(taxi_spec, rows, training_statistics, tmp_path_factory, spans_spec):
    tmp = tmp_path_factory.mktemp("clean")
    log = _log(tmp, rows[1], rows[2], taxi_spec)
    code, report = _run(log, training_statistics, tmp / "out", "--retrain", spec=spans_spec)
    return code, report, list(FakePopen.calls), tmp / "out"


@pytest.fixture(scope="module")
def shifted(taxi_spec, rows, training_statistics, tmp_path_factory, spans_spec, spans_env):
    tmp = tmp_path_factory.mktemp("shifted")
    log = _log(tmp, rows[1], data.shifted(rows[2]), taxi_spec)
    code, report = _run(log, training_statistics, tmp / "out", "--retrain", "--env", spans_env[0], spec=spans_spec)
    return code, report, list(FakePopen.calls), tmp / "out"


def test_clean_replay_has_no_anomaly(clean, rows):
    code, report, started, _ = clean
    assert report["anomalies"] == [], report["anomalies"]
    assert code == 0
    assert started == []  # --retrain starts nothing when nothing moved
    # Only the HTTP 200, non-shadow requests count: 2,501 rows in 251 requests per window.
    assert report["window"]["rows"] == len(rows[2])
    assert report["window"]["requests"] == math.ceil(len(rows[2]) / 10)
    assert report["window"]["requests_not_counted"] == {"400": math.ceil(1500 / 10)}
    assert report["previous_window"]["rows"] == len(rows[1])
    # Both checks measured every comparable feature, each below its threshold.
    for check in ("skew", "drift"):
        measured = report["measurements"][check]
        assert {"fare", "payment_type", "trip_start_hour", "company"} <= set(measured)
        assert all(m["value"] < m["threshold"] for m in measured.values()), measured
    assert report["measurements"]["skew"]["payment_type"]["comparator"] == "infinity_norm"
    assert report["measurements"]["skew"]["trip_start_hour"]["comparator"] == "infinity_norm"  # vocabulary int
    assert report["measurements"]["skew"]["fare"]["comparator"] == "jensen_shannon_divergence"
    # One value in 15,000 rows: too few to compare, and said so.
    assert "pickup_census_tract" in report["not_compared"]["skew"]


def test_shifted_replay_flags_payment_type_and_fare_for_skew_and_drift(shifted):
    code, report, _, _ = shifted
    assert code == 1
    assert _flagged(report, "skew") == {"fare", "payment_type"}
    assert _flagged(report, "drift") == {"fare", "payment_type"}
    assert _flagged(report, "schema") == set()
    by_key = {(a["kind"], a["feature"]): a for a in report["anomalies"]}
    for kind in ("skew", "drift"):
        assert by_key[(kind, "payment_type")]["comparator"] == "infinity_norm"
        assert by_key[(kind, "fare")]["comparator"] == "jensen_shannon_divergence"
        for feature in ("fare", "payment_type"):
            anomaly = by_key[(kind, feature)]
            assert anomaly["value"] > anomaly["threshold"] > 0
    assert "Cash" in by_key[("skew", "payment_type")]["description"] or \
        "Credit Card" in by_key[("skew", "payment_type")]["description"]
    assert report["window"]["start"] == "2023-11-14T23:13:20Z" and report["window"]["end"] == "2023-11-15T00:13:20Z"
    assert report["previous_window"]["end"] == report["window"]["start"]


def test_report_files(shifted):
    _, report, _, out_dir = shifted
    page = (out_dir / "taxi_monitor.html").read_text()
    anomalies = page.split("<section id='anomalies'>", 1)[1].split("</section>", 1)[0]
    anomaly_rows = anomalies.split("<tr")[2:]  # after the head row
    assert len(anomaly_rows) == len(report["anomalies"]) == 4
    assert all(r.startswith(" class='flagged'>") for r in anomaly_rows)
    assert all(("fare" in r) != ("payment_type" in r) for r in anomaly_rows)
    import tensorflow_data_validation as tfdv

    served = tfdv.load_stats_binary(str(out_dir / "taxi_served_stats.pb"))
    assert served.datasets[0].num_examples == report["window"]["rows"]


def test_the_report_renders_offline_with_served_beside_training_distributions(shifted):
    from pipelines import pages
    from tests import browser

    browser.require_chromium()
    _, report, _, out_dir = shifted
    page = browser.render_page(str(out_dir / "taxi_monitor.html"), "taxi_monitor",
                               ("4 anomalies", "Measurements", "Distributions: served vs training"), height=4800,
                               computed={"td": ["background-color"]})
    # Anomalies are red (pages.table's flagged rows), and so is each measured feature past a bound.
    red = browser.css_rgb(pages.FLAGGED_BACKGROUND)
    anomalies = browser.table_rows(page.dom, "anomalies")
    assert len(anomalies) == 4 and all((r["class"], r["background"]) == ("flagged", red) for r in anomalies)
    measured = {r["cells"][0]: r for r in browser.table_rows(page.dom, "measurements")}
    past = {a["feature"] for a in report["anomalies"] if a["kind"] in ("skew", "drift")}
    assert past == {"fare", "payment_type"}
    assert {name for name, r in measured.items() if r["background"] == red} == past
    assert all(r["class"] == "" and r["background"] != red for name, r in measured.items() if name not in past)
    # The shifted replay moved payment types: the served bars differ from training's.
    svg = re.search(r'aria-label="payment_type">(.*?)</svg>', page.dom).group(1)
    bars = {(s, v): float(h) for s, h, v in re.findall(
        r'<rect class="bar" data-series="(\w+)"[^>]*height="([\d.]+)"[^>]*><title>\w+: ([^=]+) =', svg)}
    assert {s for s, _ in bars} == {"served", "training"}
    assert any(abs(bars[("served", v)] - bars[("training", v)]) > 10 for _, v in bars if ("served", v) in bars)
    assert report["measurements"]["skew"]["payment_type"]["value"] > 0
    assert browser.colour_pixels(page.screenshot, pages.PALETTE[0]) > 500


def test_retraining_starts_the_local_pipeline_for_the_spec(shifted, spans_spec, spans_env):
    _, report, started, out_dir = shifted
    assert len(started) == 1
    command, kwargs = started[0]
    assert command[:3] == [sys.executable, "-m", "pipelines.local_runner"]
    assert command[command.index("--spec") + 1] == spans_spec
    assert command[command.index("--env") + 1] == spans_env[0]
    assert "--require_new_span" in command  # make retrain's run: never the same data again
    assert kwargs["start_new_session"] is True  # it outlives the monitor
    assert report["retrain"]["pid"] == 4242 and report["retrain"]["reason"] == ["drift", "skew"]
    assert os.path.exists(report["retrain"]["log"])


def test_retraining_on_one_dataset_is_refused_before_anything_is_read(rows, training_statistics, tmp_path,
                                                                      taxi_spec, capsys):
    """configs/taxi.yaml reads one CSV: the retraining run would stop at once ("is one dataset, not spans",
    exit 3) while the monitor said it had started."""
    log = _log(tmp_path, [], data.shifted(rows[2][:500]), taxi_spec, noise=False)
    code, report = _run(log, training_statistics, tmp_path / "out", "--retrain")
    error = capsys.readouterr().err
    assert code == 2 and report is None and not (tmp_path / "out").exists() and FakePopen.calls == []
    for named in (f"--retrain: {SPEC}: data.path", "one dataset, not spans", "{SPAN}",
                  "make monitor RETRAIN=1 SPEC=", "leave out --retrain"):
        assert named in error, error


def test_a_newest_span_trained_on_already_starts_no_retraining(rows, training_statistics, tmp_path, taxi_spec,
                                                               spans_spec, spans_env):
    """The retraining run would refuse it (span_window.require_new_span, exit 3) while the monitor said it had
    started: the monitor asks the same rule first. The store says CsvExampleGen ingested span 1, the newest,
    as TFX 1.16 records it: a custom property `span` on the Examples (example_gen/driver.py 55-57)."""
    from pipelines import mlmd

    env_path, metadata = spans_env
    env_copy, store_path = tmp_path / "local.yaml", tmp_path / "metadata" / "taxi.sqlite"
    env_copy.write_text(open(env_path).read().replace(os.path.dirname(metadata), str(store_path.parent)))
    store, pb2 = mlmd.connect(str(store_path), create=True), mlmd._pb2()
    kind = pb2.ArtifactType(name="Examples")
    examples = pb2.Artifact(type_id=store.put_artifact_type(kind), uri=str(tmp_path / "CsvExampleGen" / "examples" / "1"))
    examples.custom_properties["span"].int_value = 1
    store.put_artifacts([examples])
    log = _log(tmp_path, rows[1], data.shifted(rows[2][:2000]), taxi_spec, noise=False)
    code, report = _run(log, training_statistics, tmp_path / "out", "--retrain", "--env", str(env_copy),
                        spec=spans_spec)
    assert code == 1 and FakePopen.calls == []  # anomalies found, nothing started
    assert report["retrain"]["started"] is False and report["retrain"]["reason"] == ["drift", "skew"]
    assert report["retrain"]["why"].startswith("nothing new to train on: span 1 (the newest under")
    assert "export a new span (make export-span)" in report["retrain"]["why"]
    assert not os.path.exists(metadata)  # the fixture's own store was never made: only the copy's was read


def test_make_monitor_passes_the_spec_and_environment_it_is_given(tmp_path):
    import subprocess

    dry = subprocess.run(["make", "-n", "monitor", "RETRAIN=1", "SPEC=configs/my_taxi_spans.yaml", "ENV=e.yaml"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "-m ops.monitor" in dry and "--spec configs/my_taxi_spans.yaml" in dry and "--env e.yaml" in dry
    assert "--retrain" in dry


def test_retrain_command_runs_as_a_detached_process_with_its_placeholders(rows, training_statistics,
                                                                         tmp_path, taxi_spec):
    import subprocess

    log = _log(tmp_path, [], data.shifted(rows[2][:500]), taxi_spec, noise=False)
    marker = tmp_path / "started.txt"
    template = (f"{sys.executable} -c \"import sys; open(sys.argv[1], 'w').write(' '.join(sys.argv[2:]))\" "
                f"{marker} {{model}} {{spec}} {{report}}")
    code, report = _run(log, training_statistics, tmp_path / "out", "--retrain", "--retrain_command", template,
                        popen=subprocess.Popen)
    assert code == 1 and report["retrain"]["started"] is True
    for _ in range(200):
        if marker.exists() and marker.read_text():
            break
        time.sleep(0.05)
    model, spec, report_path = marker.read_text().split(" ")
    assert (model, spec) == ("taxi", SPEC) and json.loads(open(report_path).read())["retrain"]["pid"] > 0


def test_a_crash_is_not_reported_as_anomalies(rows, training_statistics, tmp_path, taxi_spec, monkeypatch, capsys):
    from ops import monitor

    def broken(*args, **kwargs):
        raise RuntimeError("TFDV exploded")

    monkeypatch.setattr(monitor, "validate", broken)
    log = _log(tmp_path, [], rows[2][:300], taxi_spec, noise=False)
    code, _ = _run(log, training_statistics, tmp_path / "out")
    assert code == 3 and "TFDV exploded" in capsys.readouterr().err


def test_served_rows_keep_types_and_missing_values(taxi_spec, rows, tmp_path):
    """Ints sent as 5 or 5.0 stay INT; "", NaN, null and absent keys are missing, not values."""
    from tensorflow_metadata.proto.v0 import statistics_pb2

    from ops import monitor

    current = rows[2]
    log = _log(tmp_path, [], current, taxi_spec, noise=False)
    served = monitor.read_served(log, "taxi", (data.CURRENT_START, data.CURRENT_END), taxi_spec)
    stats = monitor.compute_statistics(served.rows, taxi_spec)
    features = {f.path.step[0]: f for f in stats.datasets[0].features}
    kinds = {"int": statistics_pb2.FeatureNameStatistics.INT, "float": statistics_pb2.FeatureNameStatistics.FLOAT,
             "string": statistics_pb2.FeatureNameStatistics.STRING}
    for name, feature in taxi_spec.features.items():
        if name in features:
            assert features[name].type == kinds[feature.type], name
    for name in ("company", "dropoff_census_tract", "trip_seconds"):
        common = (features[name].string_stats if features[name].HasField("string_stats")
                  else features[name].num_stats).common_stats
        assert common.num_missing == sum(r[name] == "" for r in current), name
    hours = {b.label: b.sample_count for b in features["trip_start_hour"].string_stats.rank_histogram.buckets}
    assert sum(hours.values()) == len(current) and all(label.isdigit() for label in hours)
    assert "tips" not in features  # a label column nobody sent is not a served feature
    assert served.invalid == {}


def test_values_of_the_wrong_type_are_schema_anomalies(taxi_spec, rows, training_statistics, tmp_path, spans_spec):
    instances = data.as_instances(rows[2], taxi_spec)
    for instance in instances[:40]:
        instance["trip_start_hour"] = 7.5
    log = data.write_log(str(tmp_path / "log.sqlite"),
                         data.log_records(instances, data.CURRENT_START, data.CURRENT_END))
    code, report = _run(log, training_statistics, tmp_path / "out", "--retrain", spec=spans_spec)
    invalid = [a for a in report["anomalies"] if a.get("reason") == "INVALID_VALUE"]
    assert code == 1 and [a["feature"] for a in invalid] == ["trip_start_hour"] and invalid[0]["value"] == 40
    assert report["retrain"]["started"] is False and FakePopen.calls == []
    assert report["previous_window"]["rows"] == 0 and report["measurements"]["drift"] == {}


def test_a_feature_clients_stopped_sending_is_flagged(taxi_spec, rows, training_statistics, tmp_path):
    """No distance sees a column that is simply gone when the schema lets it be absent (company)."""
    instances = data.as_instances(rows[2], taxi_spec)
    for instance in instances:
        instance.pop("company", None)
    log = data.write_log(str(tmp_path / "log.sqlite"),
                         data.log_records(instances, data.CURRENT_START, data.CURRENT_END))
    code, report = _run(log, training_statistics, tmp_path / "out")
    assert code == 1
    assert [(a["kind"], a["feature"]) for a in report["anomalies"]] == [("missing", "company")]
    assert "company" not in report["measurements"]["skew"]


def test_thresholds_from_json_override_the_defaults(rows, training_statistics, tmp_path, taxi_spec):
    log = _log(tmp_path, rows[1], rows[2], taxi_spec, noise=False)
    override = {"skew": {"infinity_norm": 0.001}, "features": {"fare": {"drift": {"jensen_shannon_divergence": 0.001}}}}
    code, report = _run(log, training_statistics, tmp_path / "out", "--thresholds", json.dumps(override))
    assert code == 1
    assert _flagged(report, "skew") == {n for n, m in report["measurements"]["skew"].items()
                                        if m["comparator"] == "infinity_norm"}
    assert _flagged(report, "drift") == {"fare"}
    assert report["measurements"]["drift"]["fare"]["threshold"] == 0.001
    assert report["measurements"]["drift"]["trip_miles"]["threshold"] == 0.25


def test_thresholds_from_a_yaml_file_with_a_monitoring_block(taxi_spec, tmp_path):
    from ops import monitor

    path = tmp_path / "monitoring.yaml"
    path.write_text("monitoring:\n  min_values: 500\n  drift: {infinity_norm: 0.2}\n"
                    "  features:\n    company: {skew: {infinity_norm: 0.3}}\n")
    thresholds = monitor.load_thresholds(taxi_spec, str(path))
    assert thresholds["min_values"] == 500
    assert monitor.threshold_for(thresholds, "company", "skew", "infinity_norm") == 0.3
    assert monitor.threshold_for(thresholds, "payment_type", "skew", "infinity_norm") == 0.1
    assert monitor.threshold_for(thresholds, "company", "drift", "infinity_norm") == 0.2
    assert monitor.DEFAULT_THRESHOLDS["drift"]["infinity_norm"] == 0.1  # the defaults are not modified


@pytest.mark.parametrize("extra, message", [
    (["--thresholds", '{"skew": {"l_infinity": 0.1}}'],
     "--thresholds: skew.l_infinity: unknown key (allowed: infinity_norm, jensen_shannon_divergence)"),
    (["--thresholds", '{"features": {"tips": {"skew": {"infinity_norm": 0.1}}}}'], "features.tips: not a feature"),
    (["--thresholds", '{"drift": {"infinity_norm": -1}}'], "drift.infinity_norm: must be positive, got -1"),
])
def test_bad_thresholds_are_usage_errors_naming_the_key(extra, message, training_statistics, tmp_path, capsys):
    log = data.write_log(str(tmp_path / "log.sqlite"), [])
    code, _ = _run(log, training_statistics, tmp_path / "out", *extra)
    assert code == 2 and message in capsys.readouterr().err


def test_empty_window_is_a_usage_error_naming_window_and_log(rows, training_statistics, tmp_path, capsys, taxi_spec):
    log = _log(tmp_path, rows[1][:50], rows[2][:50], taxi_spec)
    from ops import monitor

    code = monitor.main(["--log", log, "--spec", SPEC, "--start", "2030-01-01T00:00:00Z", "--window_hours", "2",
                         "--training_statistics", training_statistics, "--out_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "[2030-01-01T00:00:00Z, 2030-01-01T02:00:00Z)" in err and log in err
    assert not (tmp_path / "out").exists()


def test_a_postgresql_log_gives_the_report_a_sqlite_log_gives(shifted, taxi_spec, rows, training_statistics,
                                                              tmp_path, postgres_url, spans_spec):
    from serving import logstore
    from tests.conftest import POSTGRES_PASSWORD

    log = _log(tmp_path, rows[1], data.shifted(rows[2]), taxi_spec, url=postgres_url)
    code, report = _run(log, training_statistics, tmp_path / "out", "--retrain", spec=spans_spec)
    _, from_sqlite, _, _ = shifted
    assert code == 1 and _flagged(report, "skew") == {"payment_type", "fare"}
    assert report["window"]["rows"] == len(rows[2]) and report["window"] == from_sqlite["window"]
    assert report["measurements"] == from_sqlite["measurements"]
    assert report["log"] == logstore.masked_url(postgres_url) and POSTGRES_PASSWORD not in json.dumps(report)


def test_missing_log_and_statistics_files_are_named(training_statistics, tmp_path, capsys, rows, taxi_spec):
    code, _ = _run(str(tmp_path / "nowhere.sqlite"), training_statistics, tmp_path / "out")
    err = capsys.readouterr().err
    assert code == 2 and f"--log: prediction log sqlite://{tmp_path}/nowhere.sqlite: no such file" in err
    log = _log(tmp_path, [], rows[2][:200], taxi_spec, noise=False)
    code, _ = _run(log, str(tmp_path / "missing.pb"), tmp_path / "out")
    assert code == 2 and "missing.pb: no such file" in capsys.readouterr().err


def test_training_statistics_without_category_counts_are_refused(taxi_spec, rows, tmp_path, capsys):
    """StatisticsGen without a schema describes vocabulary ints as numbers: L-infinity would then
    compare served category shares with nothing."""
    from ops import monitor

    stats = monitor.compute_statistics(monitor.typed_rows(rows[0][:2000], taxi_spec), taxi_spec, categorical=[])
    path = tmp_path / "numeric.pb"
    path.write_bytes(stats.SerializeToString())
    log = _log(tmp_path, [], rows[2][:200], taxi_spec, noise=False)
    code, _ = _run(log, str(path), tmp_path / "out")
    err = capsys.readouterr().err
    assert code == 2 and str(path) in err
    assert "trip_start_hour has no category counts" in err and "fare" not in err


def test_category_counts_are_added_from_the_training_examples(taxi_spec, rows, tmp_path):
    import tensorflow as tf

    from ops import monitor

    train = rows[0][:1000]
    split = tmp_path / "Split-train"
    split.mkdir()
    with tf.io.TFRecordWriter(str(split / "data_tfrecord-00000-of-00001.gz"), options="GZIP") as writer:
        for row in train:
            feature = {}
            for name, spec_feature in taxi_spec.columns.items():
                value = row[name]
                if spec_feature.type == "int":
                    values = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)] if value else []))
                elif spec_feature.type == "float":
                    values = tf.train.Feature(float_list=tf.train.FloatList(value=[float(value)] if value else []))
                else:
                    values = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value.encode()] if value else []))
                feature[name] = values  # an empty cell is an empty list, as CsvExampleGen writes it
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    numeric = monitor.compute_statistics(monitor.typed_rows(train, taxi_spec), taxi_spec, categorical=[])
    completed = monitor.add_category_counts(numeric, str(split), ["trip_start_day", "dropoff_community_area"],
                                            taxi_spec)
    features = {f.path.step[0]: f for f in completed.datasets[0].features}
    days = {b.label: b.sample_count for b in features["trip_start_day"].string_stats.rank_histogram.buckets}
    assert days == {d: sum(r["trip_start_day"] == d for r in train) for d in {r["trip_start_day"] for r in train}}
    assert features["dropoff_community_area"].HasField("string_stats")
    assert features["trip_start_hour"].HasField("num_stats")  # not asked for: left as StatisticsGen had it
    assert features["fare"] == {f.path.step[0]: f for f in numeric.datasets[0].features}["fare"]


def test_statistics_artifact_is_found_from_the_examples_in_ml_metadata(tmp_path):
    from ml_metadata.metadata_store import metadata_store
    from ml_metadata.proto import metadata_store_pb2

    from pipelines import mlmd

    config = metadata_store_pb2.ConnectionConfig()
    config.sqlite.filename_uri = str(tmp_path / "mlmd.sqlite")
    store = metadata_store.MetadataStore(config)
    types = {name: store.put_artifact_type(metadata_store_pb2.ArtifactType(name=name))
             for name in ("Examples", "ExampleStatistics")}
    statistics_gen = store.put_execution_type(metadata_store_pb2.ExecutionType(
        name="tfx.components.statistics_gen.component.StatisticsGen"))
    other = store.put_execution_type(metadata_store_pb2.ExecutionType(name="components.data_gate.DataGate"))

    def artifact(kind, uri):
        return store.put_artifacts([metadata_store_pb2.Artifact(type_id=types[kind], uri=uri)])[0]

    def execution(type_id, inputs, outputs):
        execution_id = store.put_executions([metadata_store_pb2.Execution(type_id=type_id)])[0]
        events = []
        for kind, key, artifact_ids in ((metadata_store_pb2.Event.INPUT, "examples", inputs),
                                        (metadata_store_pb2.Event.OUTPUT, "statistics", outputs)):
            for artifact_id in artifact_ids:
                event = metadata_store_pb2.Event(artifact_id=artifact_id, execution_id=execution_id, type=kind)
                event.path.steps.add().key = key
                events.append(event)
        store.put_events(events)

    examples, other_examples = artifact("Examples", "/p/CsvExampleGen/examples/1"), artifact("Examples", "/p/x/2")
    execution(statistics_gen, [examples], [artifact("ExampleStatistics", "/p/StatisticsGen/statistics/3")])
    execution(statistics_gen, [other_examples], [artifact("ExampleStatistics", "/p/StatisticsGen/statistics/9")])
    execution(other, [examples], [artifact("ExampleStatistics", "/p/data_gate/statistics/7")])
    found = mlmd.statistics_for_examples(store, "/p/CsvExampleGen/examples/1")
    assert found.uri == "/p/StatisticsGen/statistics/3"
    with pytest.raises(mlmd.MetadataError, match="/p/none"):
        mlmd.statistics_for_examples(store, "/p/none")


def test_served_version_is_the_stable_label_else_the_latest(tmp_path):
    from ops import monitor

    for version in ("100", "300", "200"):
        (tmp_path / "taxi" / version).mkdir(parents=True)
        (tmp_path / "taxi" / version / "saved_model.pb").write_bytes(b"")
    (tmp_path / "taxi" / "400" / "variables").mkdir(parents=True)  # half-pushed: no saved_model.pb yet
    assert monitor.served_version(str(tmp_path), "taxi") == 300
    from tests.conftest import write_models_config

    write_models_config(tmp_path, {"taxi": {"stable": 200, "canary": 300}})
    assert monitor.served_version(str(tmp_path), "taxi") == 200
    with pytest.raises(monitor.MonitorError, match="no pushed version"):
        monitor.served_version(str(tmp_path), "other")


def test_windows():
    from ops import monitor

    assert monitor.resolve_window("2024-05-01T00:00:00Z", "2024-05-01T06:00:00+00:00", None) == (1714521600.0,
                                                                                                 1714543200.0)
    assert monitor.resolve_window("1714521600", None, 2) == (1714521600.0, 1714528800.0)
    assert monitor.resolve_window(None, "2024-05-01T02:00:00", 2) == (1714521600.0, 1714528800.0)
    assert monitor.resolve_window(None, None, 1, now=5000.0) == (1400.0, 5000.0)
    with pytest.raises(monitor.MonitorError, match="--start: 'yesterday'"):
        monitor.resolve_window("yesterday", None, 1)
    with pytest.raises(monitor.MonitorError, match="must be after --start"):
        monitor.resolve_window("2024-05-02", "2024-05-01", None)


def test_the_specs_monitoring_block_is_read_before_the_override(taxi_spec, tmp_path):
    from components import feature_spec
    from ops import monitor

    spec = feature_spec.parse({**taxi_spec.raw, "monitoring": {
        "min_values": 300, "skew": {"jensen_shannon_divergence": 0.4}}}, source=taxi_spec.source)
    thresholds = monitor.load_thresholds(spec)
    assert thresholds["min_values"] == 300
    assert monitor.threshold_for(thresholds, "fare", "skew", "jensen_shannon_divergence") == 0.4
    override = monitor.load_thresholds(spec, '{"skew": {"jensen_shannon_divergence": 0.5}}')
    assert monitor.threshold_for(override, "fare", "skew", "jensen_shannon_divergence") == 0.5
    assert override["min_values"] == 300  # what the override does not set stays the spec's
    with pytest.raises(feature_spec.SpecError, match=r"taxi.yaml: monitoring.skew.l1: unknown key \(allowed: "
                                                     r"infinity_norm, jensen_shannon_divergence\)"):
        feature_spec.parse({**taxi_spec.raw, "monitoring": {"skew": {"l1": 0.1}}}, source=taxi_spec.source)
    with pytest.raises(monitor.MonitorError, match=r"--thresholds: skew.infinity_norm: must be at most 1, got 2"):
        monitor.load_thresholds(spec, '{"skew": {"infinity_norm": 2}}')


def test_served_categories_never_seen_in_training_are_counted_per_feature(clean, rows, taxi_spec):
    _, report, _, _ = clean
    unseen = report["unseen_categories"]
    assert {"payment_type", "company", "trip_start_hour"} <= set(unseen) and "fare" not in unseen
    for name in ("company", "pickup_community_area", "payment_type"):
        def text(value):  # the CSV's int cells read as the statistics' labels ("8.0" is not a category of 8)
            return str(int(float(value))) if taxi_spec.features[name].type == "int" else value
        trained = {text(r[name]) for r in rows[0] if r[name] != ""}
        served = [text(r[name]) for r in rows[2] if r[name] != ""]
        assert unseen[name]["count"] == sum(v not in trained for v in served), name
        assert set(unseen[name]["examples"]) <= set(served) - trained
    assert unseen["payment_type"]["count"] == 0 or unseen["payment_type"]["examples"]


def test_a_new_category_in_served_traffic_is_counted_and_printed(taxi_spec, rows, training_statistics, tmp_path):
    import io

    from ops import monitor

    current = [dict(r, payment_type="Bitcoin") if i % 50 == 0 else r for i, r in enumerate(rows[2])]
    _, report = _run(_log(tmp_path, rows[1], current, taxi_spec, noise=False), training_statistics, tmp_path / "out")
    bitcoin = sum(1 for i, _ in enumerate(rows[2]) if i % 50 == 0)
    assert report["unseen_categories"]["payment_type"] == {"count": bitcoin, "examples": ["Bitcoin"]}
    printed = io.StringIO()
    monitor.print_summary(report, stream=printed)
    assert f"payment_type {bitcoin} (e.g. 'Bitcoin')" in printed.getvalue()
    page = (tmp_path / "out" / "taxi_monitor.html").read_text()
    unseen = page.split("<section id='unseen'>", 1)[1].split("</section>", 1)[0]
    assert f"<tr><th>payment_type</th><td class='num'>{bitcoin}</td><td>Bitcoin</td></tr>" in unseen
