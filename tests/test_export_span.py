"""ops/export_span.py: served traffic and late labels become a span in the spec's raw CSV format."""

import csv
import dataclasses
import json
import math

import pytest

from ops import export_span
from pipelines import mlmd
from serving import logstore
from tests.conftest import POSTGRES_PASSWORD
from tests.test_ab_report import write_log

T0 = 1_700_000_000.0


def record(request_id, rows, ts=T0, shadow=0, variant="stable", version=3, policy="model", propensity=0.9,
           client_id=None, status=200, api="predict"):
    return {"request_id": request_id, "client_request_id": client_id, "ts": ts, "model": "taxi", "variant": variant,
            "model_version": version, "shadow": shadow, "api": api, "status": status, "latency_ms": 2.0,
            "routing_key": None, "request": json.dumps({"instances": rows}),
            "response": json.dumps({"predictions": [{"score": 0.5}] * len(rows)}), "policy": policy,
            "propensity": propensity}


@pytest.fixture
def spec():
    from components import feature_spec

    return feature_spec.load("configs/taxi.yaml")


def test_served_rows_with_labels_become_a_span_and_the_rest_is_counted(spec, tmp_path):
    row = {"fare": 12.5, "trip_miles": 2.0, "payment_type": "Cash", "company": "", "trip_seconds": math.nan}
    log = write_log(tmp_path / "log.sqlite", [
        record("a", [row, {**row, "fare": 3.0}]),
        record("b", [{**row, "payment_type": "Credit Card"}], variant="holdback", version=2,
               policy="holdback:stable", propensity=0.1, client_id="c-1"),
        record("b2", [{**row, "payment_type": "Credit Card"}], client_id="c-1"),  # the client's retry
        record("a:shadow", [row], shadow=1, variant="canary"),
        record("f", [row], variant="fallback", policy="fallback", propensity=1.0),
        record("e", [row], status=400),
        record("n", [row]),  # no label yet
        record("late", [row], ts=T0 + 7200),  # outside the window
    ])
    labels = tmp_path / "labels.jsonl"
    labels.write_text("\n".join(json.dumps(x) for x in [
        {"request_id": "a", "row": 0, "label": 4.0}, {"request_id": "a", "row": 1, "label": 0.0},
        {"request_id": "b", "label": 1.5}, {"request_id": "b2", "label": 7.0}, {"request_id": "a:shadow", "label": 9.0},
        {"request_id": "f", "label": 9.0}, {"request_id": "late", "label": 9.0}]) + "\n")
    metadata = str(tmp_path / "mlmd.sqlite")
    result = export_span.export(log, str(labels), str(tmp_path / "spans"), spec, start=T0 - 1, end=T0 + 3600,
                                metadata=metadata)
    assert result["span"] == 1 and result["rows"] == 3
    assert result["left_out"] == {"client_retry": 1, "fallback": 1, "no_label": 1, "not_a_served_prediction": 1,
                                  "shadow": 1}
    with open(spec.csv_files()[0], newline="") as f:
        header = next(csv.reader(f))
    with open(tmp_path / "spans" / "span-1" / "data.csv", newline="") as f:
        assert next(csv.reader(f)) == header  # the training CSV's columns, in its order
        f.seek(0)
        written = list(csv.DictReader(f))
    assert [(r["fare"], r["payment_type"], r["tips"], r["company"], r["trip_seconds"], r["pickup_latitude"])
            for r in written] == [("12.5", "Cash", "4.0", "", "", ""), ("3.0", "Cash", "0.0", "", "", ""),
                                  ("12.5", "Credit Card", "1.5", "", "", "")]
    with open(tmp_path / "spans" / "span-1" / "served.jsonl") as f:
        served = [json.loads(line) for line in f]
    assert [(s["request_id"], s["row"], s["model_version"], s["policy"], s["propensity"]) for s in served] == [
        ("a", 0, 3, "model", 0.9), ("a", 1, 3, "model", 0.9), ("b", 0, 2, "holdback:stable", 0.1)]
    # A spec reading the span folder (data.path: .../span-{SPAN}/) reads data.csv and nothing else.
    folder_spec = dataclasses.replace(spec, data_path=str(tmp_path / "spans") + "/span-{SPAN}/")
    assert folder_spec.csv_files() == [str(tmp_path / "spans" / "span-1" / "data.csv")]
    provenance = json.loads((tmp_path / "spans" / "span-1" / "provenance.json").read_text())
    assert provenance["policies"] == {"holdback:stable": 1, "model": 2} and provenance["model_versions"] == {
        "2": 1, "3": 2} and provenance["label_column"] == "tips"
    store = mlmd.connect(metadata)
    [artifact] = store.get_artifacts_by_type("ServedSpan")
    assert artifact.uri.endswith("span-1") and mlmd.custom_property(artifact, "rows") == 3
    # The next export is the next span, and a span is never overwritten.
    assert export_span.next_span(str(tmp_path / "spans")) == 2
    with pytest.raises(export_span.ExportError, match="span-1 exists: a span is written once"):
        export_span.export(log, str(labels), str(tmp_path / "spans"), spec, span=1)


def test_nothing_labelled_is_an_error_that_says_what_was_left_out(spec, tmp_path):
    log = write_log(tmp_path / "log.sqlite", [record("a", [{"fare": 1.0}])])
    labels = tmp_path / "labels.csv"
    labels.write_text("request_id,label\nother,1.0\n")
    with pytest.raises(export_span.ExportError, match=r"no labelled served row .*'no_label': 1.*wait for more"):
        export_span.export(log, str(labels), str(tmp_path / "spans"), spec)
    assert not (tmp_path / "spans").exists()
    assert logstore.open_store(log, readonly=True).count() == 1


def _served_schema(spec, tmp_path):
    """The curated schema plus the two served columns, optional and absent at serving (as
    ops/demo_drift.py's write_schema makes it; text appended: a proto's repeated field takes it)."""
    path = tmp_path / "schema.pbtxt"
    path.write_text(open(spec.schema_path).read() + "".join(
        f'feature {{ name: "{name}" type: {kind} presence {{ min_count: 0 }} not_in_environment: "SERVING" }}\n'
        for name, kind in ((spec.served.policy_column, "BYTES"), (spec.served.propensity_column, "FLOAT"))))
    return str(path)


def test_a_spec_with_served_gets_policy_and_propensity_in_data_csv(spec, tmp_path):
    from components import feature_spec

    served = dataclasses.replace(spec, served=feature_spec.Served("inverse_propensity"))
    row = {"fare": 12.5, "payment_type": "Cash"}
    log = write_log(tmp_path / "log.sqlite", [
        record("a", [row]), record("b", [row], variant="holdback", policy="holdback:fallback", propensity=0.1)])
    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"request_id": "a", "label": 1.0}\n{"request_id": "b", "label": 2.0}\n')
    # A schema without the served columns: TFDV would call each a "New column" and the data gate stop the run.
    with pytest.raises(export_span.ExportError, match=r"taxi.pbtxt: the schema lacks policy, propensity.*New column"
                                                      r".*not_in_environment.*or leave served: out"):
        export_span.export(log, str(labels), str(tmp_path / "spans"), served, start=T0 - 1, end=T0 + 1)
    assert not (tmp_path / "spans").exists()
    served = dataclasses.replace(served, schema_path=_served_schema(served, tmp_path))
    export_span.export(log, str(labels), str(tmp_path / "spans"), served, start=T0 - 1, end=T0 + 1)
    with open(tmp_path / "spans" / "span-1" / "data.csv", newline="") as f:
        written = list(csv.DictReader(f))
    assert [(r["tips"], r["policy"], r["propensity"]) for r in written] == [
        ("1.0", "model", "0.9"), ("2.0", "holdback:fallback", "0.1")]


def test_the_first_served_span_is_exported_into_an_empty_spans_folder_with_policy_and_propensity(tmp_path, capsys):
    """README's cron line: a spans spec with `served:` and no span on disk yet (the spec's CSVs cannot
    give the header: spec.csv_files() finds no span). The columns come from the spec's schema."""
    import yaml

    from components import feature_spec

    raw = yaml.safe_load(open("configs/taxi.yaml"))
    raw["data"] = {**raw["data"], "path": str(tmp_path / "spans" / "span-{SPAN}") + "/", "rolling_spans": 3}
    raw["served"] = {"use": "holdback_only"}
    raw["schema"] = _served_schema(feature_spec.parse(raw), tmp_path)
    spec_path = tmp_path / "taxi_spans.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    with pytest.raises(feature_spec.SpecError, match="no span matches"):
        feature_spec.load(str(spec_path)).csv_files()
    row = {"fare": 12.5, "payment_type": "Cash"}
    log = write_log(tmp_path / "log.sqlite", [
        record("a", [row]), record("b", [row], variant="holdback", policy="holdback:fallback", propensity=0.1)])
    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"request_id": "a", "label": 1.0}\n{"request_id": "b", "label": 2.0}\n')
    argv = ["--log", log, "--labels", str(labels), "--spec", str(spec_path), "--start", str(T0 - 1), "--end",
            str(T0 + 1)]
    assert export_span.main(argv + ["--spans", str(tmp_path / "spans")]) == 0, capsys.readouterr().err
    with open(feature_spec.load("configs/taxi.yaml").csv_files()[0], newline="") as f:
        training_header = next(csv.reader(f))
    with open(tmp_path / "spans" / "span-1" / "data.csv", newline="") as f:
        assert next(csv.reader(f)) == training_header + ["policy", "propensity"]
        f.seek(0)
        assert [(r["fare"], r["tips"], r["policy"], r["propensity"]) for r in csv.DictReader(f)] == [
            ("12.5", "1.0", "model", "0.9"), ("12.5", "2.0", "holdback:fallback", "0.1")]
    assert feature_spec.load(str(spec_path)).csv_files() == [str(tmp_path / "spans" / "span-1" / "data.csv")]
    # A spans folder the spec does not read is refused, naming data.path and the folder to pass.
    assert export_span.main(argv + ["--spans", str(tmp_path / "elsewhere")]) == 2
    error = capsys.readouterr().err
    assert "data.path" in error and f"--spans {tmp_path / 'spans'}" in error and not (tmp_path / "elsewhere").exists()
    # data.path may name the span's file (ops/demo_drift.py: span-{SPAN}/data.csv): the same folder.
    file_spec = dataclasses.replace(feature_spec.load(str(spec_path)), data_path=raw["data"]["path"] + "data.csv")
    assert export_span.span_folder(str(tmp_path / "spans"), 2, file_spec) == str(tmp_path / "spans" / "span-2")


def test_make_export_span_reads_a_postgresql_log(postgres_url, tmp_path, capsys):
    """What `make export-span LOG=postgresql://...` runs (the production log): the same span as from
    SQLite, and the password never printed, also when it is wrong."""
    row = {"fare": 12.5, "payment_type": "Cash"}
    write_log(postgres_url, [record("a", [row, {**row, "fare": 3.0}]), record("a:shadow", [row], shadow=1),
                             record("n", [row])])
    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"request_id": "a", "row": 0, "label": 4.0}\n{"request_id": "a", "row": 1, "label": 0.5}\n')
    argv = ["--labels", str(labels), "--spans", str(tmp_path / "spans"), "--spec", "configs/taxi.yaml",
            "--start", str(T0 - 1), "--end", str(T0 + 1)]
    assert export_span.main(["--log", postgres_url] + argv) == 0
    with open(tmp_path / "spans" / "span-1" / "data.csv", newline="") as f:
        assert [(r["fare"], r["tips"]) for r in csv.DictReader(f)] == [("12.5", "4.0"), ("3.0", "0.5")]
    out = capsys.readouterr().out
    assert "span 1: 2 rows" in out and "'no_label': 1" in out and "'shadow': 1" in out
    wrong = postgres_url.replace(POSTGRES_PASSWORD, "not-the-password")
    assert export_span.main(["--log", wrong] + argv) == 2
    said = capsys.readouterr()
    assert "not-the-password" not in said.err + said.out and "127.0.0.1" in said.err
