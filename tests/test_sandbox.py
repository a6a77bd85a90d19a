"""Sandbox validation (components/sandbox.py) against a real exported model served in its own process."""

import os
import shutil

import numpy as np
import pytest

from tests.conftest import PARSE


def _raw_examples(rows, spec):
    """CSV rows as CsvExampleGen writes them: an empty cell is an absent feature."""
    import tensorflow as tf

    out = []
    for r in rows:
        feature = {}
        for name, f in spec.columns.items():
            if r[name] == "":
                continue
            value = PARSE[f.type](r[name])
            feature[name] = (tf.train.Feature(bytes_list=tf.train.BytesList(value=[value.encode()])) if f.type == "string"
                             else tf.train.Feature(int64_list=tf.train.Int64List(value=[value])) if f.type == "int"
                             else tf.train.Feature(float_list=tf.train.FloatList(value=[value])))
        out.append(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    return out


@pytest.fixture(scope="module")
def sandbox_run(small_model, taxi_spec, taxi_rows, tmp_path_factory):
    from components.sandbox import SandboxConfig, validate

    examples = _raw_examples(taxi_rows[1500:1800], taxi_spec)
    config = SandboxConfig.from_dict({"rows": 300, "latency_requests": 100, "throughput_seconds": 1,
                                      "max_p50_ms": 1000, "max_p99_ms": 5000, "min_requests_per_second": 1,
                                      "warmup_records": 40})
    work = tmp_path_factory.mktemp("sandbox")
    report, warmup = validate(small_model[0], "taxi", examples, config, str(work))
    return config, report, warmup, work


def test_candidate_served_in_a_separate_process_matches_in_process_predictions(sandbox_run):
    _, report, _, _ = sandbox_run
    assert report["blessed"], report["reasons"]
    predictions = report["predictions"]
    assert predictions["rows"] == 300 and predictions["rows_differing"] == 0
    assert set(predictions["max_abs_diff"]) == {"probabilities", "class_ids", "classes", "score"}
    assert predictions["max_abs_diff"]["probabilities"] <= 1e-6
    assert report["latency"]["requests"] == 100 and report["latency"]["errors"] == 0
    assert 0 < report["latency"]["p50_ms"] <= report["latency"]["p99_ms"]
    assert report["throughput"]["errors"] == 0 and report["throughput"]["requests_per_second"] > 1


def test_thresholds_from_the_config_decide_the_blessing(sandbox_run):
    from components.sandbox import SandboxConfig, verdict

    _, report, _, _ = sandbox_run
    strict = SandboxConfig.from_dict({"max_p50_ms": report["latency"]["p50_ms"] / 2,
                                      "max_p99_ms": report["latency"]["p99_ms"] / 2,
                                      "min_requests_per_second": report["throughput"]["requests_per_second"] * 2})
    reasons = verdict(report, strict)
    assert [r.split(":")[0] for r in reasons] == ["latency", "latency", "throughput"]
    assert "max_p50_ms" in reasons[0] and "max_p99_ms" in reasons[1] and "min_requests_per_second" in reasons[2]
    assert verdict(report, SandboxConfig.from_dict({"max_p50_ms": report["latency"]["p50_ms"] * 2,
                                                    "max_p99_ms": report["latency"]["p99_ms"] * 2,
                                                    "min_requests_per_second": 1})) == []


def test_a_prediction_off_by_more_than_the_tolerance_is_caught(small_model, taxi_spec, taxi_rows, tmp_path):
    import tensorflow as tf

    from components.export import raw_inputs
    from components.sandbox import REPLAY_BATCH, SandboxServer, compare_predictions
    from serving.json_tensor import instances

    signature = tf.saved_model.load(small_model[0]).signatures["serving_default"]
    columns = raw_inputs(_raw_examples(taxi_rows[:50], taxi_spec), signature.structured_input_signature[1])
    expected = {k: v.numpy() for k, v in signature(**columns).items()}
    expected["probabilities"][7] += 2e-6  # a serving path that is off in the sixth decimal, in one row
    expected["classes"][11] = b"no" if expected["classes"][11] == b"yes" else b"yes"
    rows = instances({k: v.numpy() for k, v in columns.items()})
    with SandboxServer(small_model[0], "taxi", str(tmp_path), 180) as server:
        server.warm(rows, REPLAY_BATCH)  # as validate() does: a cold model's first call can outlast the proxy's 5 s
        result = compare_predictions(server, expected, rows, tolerance=1e-6)
    assert "error" not in result, result  # the server answered every batch
    assert result["rows"] == 50 and result["rows_differing"] == 2
    assert 1e-6 < result["max_abs_diff"]["probabilities"] < 3e-6


def test_warmup_records_replay_in_the_local_server(sandbox_run, small_model, tmp_path):
    from components.sandbox import write_warmed_model
    from serving.core import warm
    from serving.repository import LoadedVersion

    config, _, warmup, _ = sandbox_run
    assert len(warmup) == config.warmup_records == 40
    path = write_warmed_model(small_model[0], str(tmp_path / "1"), warmup)
    assert path.endswith(os.path.join("assets.extra", "tf_serving_warmup_requests"))
    assert not os.path.exists(os.path.join(small_model[0], "assets.extra", "tf_serving_warmup_requests"))
    assert LoadedVersion("taxi", 1, str(tmp_path / "1")).warm_up(warm) == 40


def test_a_model_the_server_cannot_load_is_not_served(small_model, tmp_path):
    from components.sandbox import SandboxError, SandboxServer

    broken = tmp_path / "broken"
    shutil.copytree(small_model[0], broken)
    with open(broken / "saved_model.pb", "wb") as f:
        f.write(b"not a SavedModel")
    with pytest.raises(SandboxError, match="could not load the model: .*saved_model.pb: not a SavedModel"):
        with SandboxServer(str(broken), "taxi", str(tmp_path / "work"), start_timeout=60):
            pass


@pytest.mark.parametrize("config, message", [
    ({"p50": 3}, r"^sandbox config: p50: unknown key \(allowed: clients, .*warmup_records\)$"),
    ({"max_p99_ms": -1}, r"^sandbox config: max_p99_ms: must be at least 0, got -1$"),
    ({"clients": "four"}, r"^sandbox config: clients: must be int, got str \('four'\)$"),
    ({"warmup_records": 5000}, r"^sandbox config: warmup_records: is at most 1000 \(TF Serving reads no more\)"),
    ({"server": "triton"}, r"^sandbox config: server: 'triton' is not one of local or tf_serving$"),
])
def test_config_errors_name_the_key(config, message):
    from components.sandbox import SandboxConfig

    with pytest.raises(ValueError, match=message):
        SandboxConfig.from_dict(config)


def test_the_replay_goes_through_the_proxy_in_the_production_wire_form(sandbox_run):
    """Every replayed request passed the proxy (its prediction log has them) with every named
    input present and NaN / "" for the gaps: the request clients send."""
    from serving import logstore

    config, report, _, work = sandbox_run
    records = list(logstore.read_records(str(work / "prediction_log.sqlite"), include_shadow=True))
    # Exactly the checks' requests: the warming requests went straight to the server, unlogged.
    replay_requests = config.rows // 100 + config.latency_requests + report["throughput"]["requests"]
    assert len(records) == replay_requests and {(r["variant"], r["status"]) for r in records} == {("candidate", 200)}
    assert report["warm_seconds"] > 0
    first = records[0]["request"]["instances"][0]
    assert len(first) == 17 and any(isinstance(v, float) and v != v for v in first.values())  # NaN sent as such


def _stand_in_binary(tmp_path):
    """A `tensorflow_model_server` stand-in: the local server, given the real binary's flags."""
    import stat
    import sys

    from tests.conftest import REPO

    binary = tmp_path / "tensorflow_model_server"
    binary.write_text(f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m serving.server \"$@\"\n")
    binary.chmod(binary.stat().st_mode | stat.S_IEXEC)
    return str(binary)


def test_server_tf_serving_runs_the_same_checks_on_a_binary_or_a_running_url(small_model, taxi_spec, taxi_rows,
                                                                              tmp_path):
    import shutil

    from components.sandbox import SandboxConfig, validate
    from tests.conftest import serve

    examples = _raw_examples(taxi_rows[1500:1600], taxi_spec)
    loose = {"rows": 100, "latency_requests": 20, "throughput_seconds": 0.5, "max_p50_ms": 1000, "max_p99_ms": 5000,
             "min_requests_per_second": 1, "warmup_records": 5, "server": "tf_serving"}
    config = SandboxConfig.from_dict({**loose, "tf_serving_binary": _stand_in_binary(tmp_path)})
    report, _ = validate(small_model[0], "taxi", examples, config, str(tmp_path / "binary"))
    assert report["blessed"] and report["predictions"]["rows_differing"] == 0, report.get("reasons")
    shutil.copytree(small_model[0], tmp_path / "staging" / "taxi" / "3")
    staging = serve(tmp_path / "staging")  # a running TF Serving that serves the candidate
    try:
        config = SandboxConfig.from_dict({**loose, "tf_serving_url": staging.url})
        report, _ = validate(small_model[0], "taxi", examples, config, str(tmp_path / "url"))
        assert report["blessed"] and report["predictions"]["rows_differing"] == 0, report.get("reasons")
    finally:
        staging.stop()
    with pytest.raises(ValueError, match="sandbox config: server: tf_serving needs exactly one of 'tf_serving_binary'"):
        SandboxConfig.from_dict({"server": "tf_serving"})
