"""`make demo-drift` (ops/demo_drift.py), reduced to what fits the suite's budget: the spans cut by
time and shifted, a promoted model served behind the proxy, the shifted span replayed, the monitor
flagging it, the span exported with labels, policy and propensity, and `make retrain`'s check
taking it as new. The pipeline runs themselves (one per span, then the retraining) are left to
`make demo-drift`: each costs a minute or more here, and test_spans.py / test_pipeline_e2e.py run
the pipeline over spans already. How the demo's full run (the reference for the incremental
retrain: the spans spec on a fresh store) is set up is checked without running it.
"""

import csv
import json
import os

import pytest

from components import feature_spec
from ops import demo_drift, export_span, monitor
from tests.conftest import write_models_config


def test_the_full_run_is_the_spans_spec_on_a_fresh_store_that_ingests_the_window(tmp_path, monkeypatch):
    """The reference for the incremental retrain: the same spans spec, run through the local runner (the
    command a user runs) with its own root, store and model repository; nothing of the work dir is reused,
    so the runner's ingestion (span_window.spans_to_ingest on the empty store) takes the window's older
    spans before the run's own ExampleGen takes the newest."""
    import yaml

    from pipelines import mlmd, span_window

    work = tmp_path / "work"
    spans_dir = work / "spans"
    header = ["trip_start_timestamp", "fare", "payment_type", "tips"]
    rows = [{"trip_start_timestamp": str(i), "fare": f"{i}.5", "payment_type": "Cash", "tips": "0"} for i in range(9)]
    for number in (1, 2):
        demo_drift.write_span(str(spans_dir), number, header, rows[3 * (number - 1):3 * number])
    # A served span (ops/export_span.py) brings the policy and propensity columns after the raw ones.
    demo_drift.write_span(str(spans_dir), 3, header + ["policy", "propensity"],
                          [dict(r, policy="model", propensity="0.9") for r in rows[6:]])
    spec_path = demo_drift.write_spec(str(work / "spec.yaml"), str(spans_dir), window=2)
    (tmp_path / "work-full" / "pipeline_root").mkdir(parents=True)  # a previous demo's full run: replaced
    ran = []

    def run_pipeline(spec, env, summary, retrain=False):
        ran.append((spec, yaml.safe_load(open(env)), summary, retrain))
        return {"wall_seconds": 5.0, "total_seconds": 4.0, "model_version": 7}
    monkeypatch.setattr(demo_drift, "run_pipeline", run_pipeline)
    full = demo_drift._full_run(str(work), spec_path, feature_spec.load(spec_path))

    [(spec, env, summary, retrain)] = ran
    assert spec == spec_path and not retrain  # the spans spec itself, not a one-CSV copy
    fresh = str(tmp_path / "work-full")
    assert [os.path.dirname(env[k]) for k in ("pipeline_root", "metadata_path", "model_repository")] == [fresh] * 3
    assert os.path.dirname(summary) == fresh and not os.path.exists(env["pipeline_root"])
    assert full["spans"] == ["spans/span-2/data.csv", "spans/span-3/data.csv"] and full["pushed_version"] == 7
    spans = feature_spec.load(spec)
    assert span_window.spans_to_ingest(spans, mlmd.ingested_spans(env["metadata_path"])) == [2]


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
    from pipelines import span_window

    env = {"metadata_path": str(tmp_path / "metadata.sqlite")}
    assert span_window.require_new_span(spec, env) == 2
