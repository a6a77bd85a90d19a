"""`make demo-drift` (ops/demo_drift.py), reduced to what fits the suite's budget: the spans cut by
time and shifted, a promoted model served behind the proxy, the shifted span replayed, the monitor
flagging it, the span exported with labels, policy and propensity, and `make retrain`'s check
taking it as new. The pipeline runs themselves (one per span, then the retraining) are left to
`make demo-drift`: each costs a minute or more here, and test_spans.py / test_pipeline_e2e.py run
the pipeline over spans already. How the demo's full run (the reference for the incremental
retrain) is written is checked without running it.
"""

import csv
import json
import os

import pytest

from components import feature_spec
from ops import demo_drift, export_span, monitor
from tests.conftest import write_models_config


def test_the_full_run_reads_every_span_of_the_window_as_one_csv(tmp_path):
    spans_dir = tmp_path / "spans"
    header = ["trip_start_timestamp", "fare", "payment_type", "tips"]
    rows = [{"trip_start_timestamp": str(i), "fare": f"{i}.5", "payment_type": "Cash", "tips": "0"} for i in range(9)]
    for number in (1, 2):
        demo_drift.write_span(str(spans_dir), number, header, rows[3 * (number - 1):3 * number])
    # A served span (ops/export_span.py) brings the policy and propensity columns after the raw ones.
    served = [dict(r, policy="model", propensity="0.9") for r in rows[6:]]
    served[0]["policy"], served[0]["propensity"] = "holdback:fallback", "0.1"
    demo_drift.write_span(str(spans_dir), 3, header + ["policy", "propensity"], served)
    spec_path = demo_drift.write_spec(str(tmp_path / "spec.yaml"), str(spans_dir), window=2)
    window = feature_spec.load(spec_path).csv_files()
    assert [os.path.basename(os.path.dirname(f)) for f in window] == ["span-2", "span-3"]

    data = tmp_path / "full" / "data.csv"
    assert demo_drift.write_full_run_data(window, str(data)) == 6
    with open(data, newline="") as f:
        reader = csv.DictReader(f)
        # ExampleGen needs one header for the split (tfx csv_example_gen/executor.py): the union.
        assert reader.fieldnames == header + ["policy", "propensity"]
        written = list(reader)
    assert [r["trip_start_timestamp"] for r in written] == [str(i) for i in range(3, 9)]  # span-1 left the window
    assert [(r["policy"], r["propensity"]) for r in written] == [("", "")] * 3 + [
        ("holdback:fallback", "0.1"), ("model", "0.9"), ("model", "0.9")]  # never served: empty, weight 1

    full = feature_spec.load(demo_drift.write_full_run_spec(spec_path, str(data), str(tmp_path / "full.yaml")))
    assert not full.has_spans and full.rolling_spans is None
    assert full.csv_files() == [str(data)]
    incremental = feature_spec.load(spec_path)
    assert (full.features, full.label, full.served, full.split, full.schema_path, full.training) == (
        incremental.features, incremental.label, incremental.served, incremental.split, incremental.schema_path,
        incremental.training)  # the same pipeline but for its data


def test_the_report_puts_the_incremental_run_over_the_full_one_with_both_loads():
    retrain = {"wall_seconds": 90.0, "load_average": {"start": [5.1, 4.0, 3.0], "end": [6.2, 4.5, 3.1]}}
    full = {"wall_seconds": 120.0, "load_average": {"start": [6.0, 4.4, 3.1], "end": [5.8, 4.9, 3.3]}}
    figures = demo_drift._incremental_vs_full(retrain, full)
    assert figures["ratio"] == 0.75
    assert figures["incremental_load_average"] == retrain["load_average"]
    assert figures["full_load_average"] == full["load_average"]


@pytest.mark.slow
def test_cut_and_shift(taxi_spec):
    header, rows = demo_drift.read_taxi(taxi_spec)
    spans = demo_drift.cut_spans(rows, 3, 200)
    assert [len(s) for s in spans] == [200, 200, 200]
    assert max(int(r["trip_start_timestamp"]) for r in spans[0]) <= min(int(r["trip_start_timestamp"])
                                                                         for r in spans[1])
    shifted = demo_drift.shift(spans[2])
    for before, after in zip(spans[2], shifted):
        if before["fare"]:
            assert float(after["fare"]) == pytest.approx(float(before["fare"]) * 1.5, abs=0.006)
        assert after["tips"] == before["tips"]  # the ground truth is the trip's own
    assert all(a["payment_type"] == b["payment_type"] for b, a in zip(spans[2], shifted)
               if b["payment_type"] != "Credit Card")
    assert sum(a["payment_type"] == "Cash" for a in shifted) == sum(
        b["payment_type"] in ("Cash", "Credit Card") for b in spans[2])


@pytest.mark.slow
def test_the_shifted_span_is_served_flagged_exported_and_new_to_retraining(taxi_spec, small_model, tmp_path):
    header, rows = demo_drift.read_taxi(taxi_spec)
    earlier, later = demo_drift.cut_spans(rows, 2, 400)
    spans_dir = str(tmp_path / "spans")
    demo_drift.write_span(spans_dir, 1, header, earlier)
    spec = feature_spec.load(demo_drift.write_spec(str(tmp_path / "spec.yaml"), spans_dir, window=2))
    repository = tmp_path / "repository"
    (repository / "taxi").mkdir(parents=True)
    os.symlink(small_model[0], repository / "taxi" / "1")
    write_models_config(repository, labels={"taxi": {"stable": 1}})
    with demo_drift.Serving(str(repository), str(tmp_path), "taxi", spec.label.classes) as serving:
        truth = demo_drift.replay(serving.port, demo_drift.shift(later), spec, "tips")
    assert len(truth) == sum(1 for r in later if r["tips"] != "")
    log = str(tmp_path / "prediction_log.sqlite")

    stats = monitor.compute_statistics(monitor.typed_rows(earlier, taxi_spec), taxi_spec)
    (tmp_path / "train.pb").write_bytes(stats.SerializeToString())
    code = monitor.main(["--log", log, "--model", "taxi", "--window_hours", "1", "--training_statistics",
                         str(tmp_path / "train.pb"), "--out_dir", str(tmp_path / "monitor")])
    report = json.loads((tmp_path / "monitor" / "taxi_monitor.json").read_text())
    assert code == 1
    assert "payment_type" in {a["feature"] for a in report["anomalies"] if a["kind"] == "skew"}
    assert report["measurements"]["skew"]["fare"]["comparator"] == "jensen_shannon_divergence"

    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps(t) + "\n" for t in truth))
    exported = export_span.export(log, str(labels), spans_dir, spec)
    assert exported["span"] == 2 and exported["rows"] == len(truth)
    with open(os.path.join(spans_dir, "span-2", "data.csv"), newline="") as f:
        written = list(csv.DictReader(f))
    policies = {r["policy"]: r["propensity"] for r in written}
    assert policies == {"model": "0.9", "holdback:fallback": "0.1"}  # the proxy held back 10 % of users
    from pipelines import local_runner

    env = {"metadata_path": str(tmp_path / "metadata.sqlite")}
    assert local_runner.require_new_span(spec, env) == 2
