"""An unchanged `make run` is answered from the previous summary without starting TFX
(pipelines/fingerprint.py), and any change to what a run reads means a real run."""

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from components import feature_spec
from pipelines import fingerprint
from tests.conftest import TAXI_SPEC, read_rows, taxi_csv_path, write_sample

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def inputs(taxi_spec, tmp_path):
    """A spec over a small copy of the taxi rows, an environment with every output under tmp_path,
    and a previous summary whose outputs exist, as a successful run leaves them."""
    data = tmp_path / "data"
    write_sample(read_rows(taxi_csv_path(taxi_spec), limit=50), str(data))
    with open(TAXI_SPEC) as f:
        raw = yaml.safe_load(f)
    raw["data"]["path"] = str(data)
    raw["schema"] = os.path.join(REPO, raw["schema"])
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    env_path = tmp_path / "env.yaml"
    env_path.write_text(yaml.safe_dump({"pipeline_root": str(tmp_path / "root"), "model_repository": str(tmp_path / "models"),
                                        "metadata_path": str(tmp_path / "metadata.sqlite"),
                                        "beam_profile": "direct_in_memory"}))
    (tmp_path / "metadata.sqlite").write_bytes(b"")
    for folder in ("model", "evaluation", "models/taxi/1"):
        os.makedirs(tmp_path / folder)
    (tmp_path / "eval.html").write_text("<html></html>")
    spec = feature_spec.load(str(spec_path))
    summary = {"succeeded": True, "pushed": True, "model_path": str(tmp_path / "models/taxi/1"),
               "artifacts": {"model": str(tmp_path / "model"), "evaluation": str(tmp_path / "evaluation"),
                             "anomalies": None},
               "reports": {"evaluation": str(tmp_path / "eval.html")},
               fingerprint.KEY: fingerprint.inputs_fingerprint(spec, str(spec_path), str(env_path))}
    summary_path = tmp_path / "run_summary.json"
    summary_path.write_text(json.dumps(summary))
    return {"tmp": tmp_path, "spec": str(spec_path), "env": str(env_path), "summary": str(summary_path),
            "data": data / "data.csv"}


def _check(inputs, beam_profile=None):
    spec = feature_spec.load(inputs["spec"])
    return fingerprint.unchanged_run(inputs["summary"],
                                     fingerprint.inputs_fingerprint(spec, inputs["spec"], inputs["env"], beam_profile),
                                     also_needed=[str(inputs["tmp"] / "metadata.sqlite")])


def test_the_previous_summary_stands_when_nothing_changed(inputs):
    previous, why = _check(inputs)
    assert why == "" and previous["model_path"] == str(inputs["tmp"] / "models/taxi/1")


@pytest.mark.parametrize("change", ["data_touched", "data_appended", "spec_edited", "env_edited", "beam_profile"])
def test_any_change_to_what_a_run_reads_means_a_real_run(inputs, change):
    if change == "data_touched":  # same bytes, newer file: ExampleGen would see a new fingerprint too
        stat = os.stat(inputs["data"])
        os.utime(inputs["data"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    elif change == "data_appended":
        with open(inputs["data"], "a") as f:
            f.write(open(inputs["data"]).read().splitlines()[-1] + "\n")
    elif change == "spec_edited":
        raw = yaml.safe_load(open(inputs["spec"]))
        raw["thresholds"]["AUC"]["lower"] = 0.89
        open(inputs["spec"], "w").write(yaml.safe_dump(raw))
    elif change == "env_edited":
        open(inputs["env"], "a").write("enable_cache: false\n")
    previous, why = _check(inputs, beam_profile="direct_multi_processing" if change == "beam_profile" else None)
    assert previous is None and why == "the spec, environment, data or code changed since the previous run"


@pytest.mark.parametrize("gone", ["models/taxi/1", "evaluation", "eval.html", "metadata.sqlite"])
def test_a_missing_output_means_a_real_run_and_is_named(inputs, gone):
    path = inputs["tmp"] / gone
    os.rmdir(path) if path.is_dir() else os.remove(path)
    previous, why = _check(inputs)
    assert previous is None and why == f"an output of the previous run is gone: {path}"


def test_a_failed_previous_run_is_never_reused(inputs):
    summary = json.load(open(inputs["summary"]))
    json.dump(dict(summary, succeeded=False), open(inputs["summary"], "w"))
    assert _check(inputs) == (None, "the previous run failed")


def test_the_cli_answers_an_unchanged_run_without_importing_tensorflow_or_tfx(inputs):
    """What `make run` does the second time: one line, exit 0, and neither TensorFlow nor TFX is
    imported (the point of the check: their imports alone take about 20 s here)."""
    args = ["--spec", inputs["spec"], "--env", inputs["env"], "--summary", inputs["summary"]]
    probe = ("import sys; from pipelines import local_runner; code = local_runner.main(%r); "
             "print('exit', code, 'tensorflow' in sys.modules, 'tfx' in sys.modules)" % args)
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = done.stdout.splitlines()
    assert lines[-1] == "exit 0 False False", done.stdout + done.stderr
    assert len(lines) == 2 and lines[0].startswith("skewless: nothing changed since the last run of 'taxi'")
    assert inputs["summary"] in lines[0]
