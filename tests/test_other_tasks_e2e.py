"""The same pipeline, through the CLI, on the multiclass and regression specs (slow).

Each run is its own process, as `make run SPEC=...` would be: tf.Transform keeps lookup
tables per process, and two different specs' vocabularies must not meet in one.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from tests import datasets
from tests.conftest import CONSOLE_NOISE, REPO, component_lines

pytestmark = pytest.mark.slow


def _run_cli(spec, data_dir, tmp):
    env_path = os.path.join(tmp, "env.yaml")
    with open(env_path, "w") as f:
        yaml.safe_dump({"pipeline_root": f"{tmp}/pipelines/{{name}}", "metadata_path": f"{tmp}/metadata.sqlite",
                        "model_repository": f"{tmp}/models",
                        "beam_args": ["--direct_running_mode=in_memory", "--direct_num_workers=1"]}, f)
    summary_path = os.path.join(tmp, "summary.json")
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.local_runner", "--spec", spec, "--env", env_path, "--data", data_dir,
         "--summary", summary_path],
        cwd=REPO, env=dict(os.environ, TF_USE_LEGACY_KERAS="1"), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    # A quiet console: one line per component, the rest in the run's log file.
    assert not [w for w in CONSOLE_NOISE if w in out.stdout + out.stderr], out.stdout + out.stderr
    ended = component_lines(out.stdout)
    assert {"CsvExampleGen", "Transform", "Trainer", "Evaluator", "Pusher"} <= set(ended), out.stdout
    assert set(ended.values()) == {1}, ended
    with open(summary_path) as f:
        return json.load(f)


def _train(tmp_path, write_csv, spec):
    """Generates the dataset, runs the pipeline; returns (summary, model, serving inputs)."""
    import tensorflow as tf

    data = str(tmp_path / "data")
    write_csv(os.path.join(data, "data.csv"), rows=1500, seed=3)
    summary = _run_cli(spec, data, str(tmp_path))
    assert summary["blessed"] and summary["pushed"]
    model = tf.saved_model.load(summary["model_path"])
    _, inputs = model.signatures["serving_default"].structured_input_signature
    return summary, model, inputs


@pytest.mark.xdist_group("other_tasks")
def test_multiclass_spec_trains_blesses_and_serves(tmp_path):
    import tensorflow as tf

    summary, model, inputs = _train(tmp_path, datasets.write_multiclass_csv, "configs/synthetic_multiclass.yaml")
    overall = summary["metrics"]["overall"]
    assert overall["sparse_categorical_accuracy"] > 0.65  # chance is 0.33
    # Readable names, each metric once: no "macro_average: true\n_auc", no compiled "accuracy".
    assert set(overall) == {"example_count", "sparse_categorical_accuracy", "macro_auc", "macro_precision",
                            "macro_recall", *(f"{m}_class_{k}" for m in ("auc", "precision", "recall") for k in range(3))}
    assert overall["macro_auc"] == pytest.approx(sum(overall[f"auc_class_{k}"] for k in range(3)) / 3)
    lower, upper = summary["metrics"]["intervals"]["Overall"]["auc_class_0"]
    assert lower < overall["auc_class_0"] < upper
    assert any(k.startswith("region=") for k in summary["metrics"]["slices"])
    assert "segment" not in inputs  # the label column is not asked for
    columns = {}
    for name, spec in inputs.items():
        columns[name] = tf.constant([""] * 4) if spec.dtype == tf.string else tf.constant([math.nan] * 4, spec.dtype)
    out = model.signatures["serving_default"](**columns)  # every value missing: filled, still served
    assert out["probabilities"].shape == (4, 3)
    assert set(out["classes"].numpy().tolist()) <= {b"low", b"mid", b"high"}


@pytest.mark.xdist_group("other_tasks")
def test_regression_spec_trains_blesses_and_serves(tmp_path):
    import tensorflow as tf

    summary, model, inputs = _train(tmp_path, datasets.write_regression_csv, "configs/synthetic_regression.yaml")
    overall = summary["metrics"]["overall"]
    assert overall["mean_absolute_error"] < 0.4 and overall["root_mean_squared_error"] < 0.5
    # Only the EvalConfig's metrics: not the model's compiled copies of them (mae, rmse, loss).
    assert not {"mae", "rmse", "loss"} & set(overall), sorted(overall)
    assert "delivery_hours" not in inputs
    example = {name: (tf.constant(["north"]) if spec.dtype == tf.string else tf.constant([1.0], spec.dtype))
               for name, spec in inputs.items()}
    value = model.signatures["serving_default"](**example)["value"].numpy()
    assert value.shape == (1,) and math.isfinite(value[0])
