"""`make bench-pipeline`: our pipeline beside TFX's own Chicago-taxi native-Keras example, on
the same CSV, timed as a user waits for them: whole processes, imports included.

    python -m benchmarks.bench_pipeline [--skip-example] [--spec configs/taxi.yaml]

One invocation, in this order, each run a fresh Python process started from here:
  1. TFX's example (tfx/examples/chicago_taxi_pipeline/taxi_pipeline_native_keras.py) with
     LocalDagRunner, given the same in-memory DirectRunner arguments as ours (the Beam profile
     configs/local.yaml names; the example's own multi-processing arguments are slower on 2 cores).
     Our runner hands TFX those arguments as none at all, Beam's defaults for the same runner, mode
     and worker count (pipelines/beam_profiles.py for_tfx), which spares TFX building a package of
     itself in every Beam component; the example is run as TFX ships it and gets them as flags;
  2. ours, first run: `python -m pipelines.local_runner` with a fresh pipeline root, metadata
     store and model repository;
  3. ours, rerun on unchanged data and spec;
  4. ours, rerun after a thresholds-only change to the spec (only the Evaluator and what follows
     it should run again).
Targets (issue 11): first run <= 0.6x the example's wall time, unchanged rerun <= 0.05x,
thresholds-only rerun <= 0.35x. Quality is reported beside the times: accuracy and AUC of both
models on their eval splits (the example's scored here after the timings, from its pushed
SavedModel). Writes build/bench_pipeline.json.
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import yaml

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV_PATH = os.path.join(REPO_ROOT, "configs", "local.yaml")
JSON_PATH = os.path.join(REPO_ROOT, "build", "bench_pipeline.json")
TARGETS = {"first_run": 0.6, "rerun_unchanged": 0.05, "rerun_thresholds": 0.35}
CHILD_ENV = {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore"}


def timed_process(args: List[str], log_path: str) -> float:
    """Wall seconds of a child Python process from start to exit; its output goes to log_path."""
    env = dict(os.environ, **CHILD_ENV)
    env.setdefault("HOME", tempfile.gettempdir())  # the example module reads it at import
    started = time.time()
    with open(log_path, "w") as log:
        code = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT).returncode
    seconds = time.time() - started
    if code != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{' '.join(args)} exited with {code}; the end of {log_path}:\n{tail}")
    return seconds


def direct_args() -> List[str]:
    """The Beam arguments our local runs get (configs/local.yaml's profile), for the example too."""
    from pipelines import beam_profiles

    with open(ENV_PATH) as f:
        env = yaml.safe_load(f)
    return beam_profiles.beam_args(env, ENV_PATH, None, pipeline_root=tempfile.gettempdir(), name="bench")


# --- TFX's example ---------------------------------------------------------------------------

def example_paths(root: str) -> Dict[str, str]:
    return {"pipeline_root": os.path.join(root, "pipeline"),
            "metadata_path": os.path.join(root, "metadata", "metadata.db"),
            "serving_model_dir": os.path.join(root, "serving_model")}


def example_child(root: str, beam_args: List[str]) -> int:
    """The child's whole job: build and run the example, nothing else (timed by the parent)."""
    from tfx.examples.chicago_taxi_pipeline import taxi_pipeline_native_keras as example
    from tfx.orchestration.local.local_dag_runner import LocalDagRunner

    example_dir = os.path.dirname(example.__file__)
    LocalDagRunner().run(example._create_pipeline(
        pipeline_name=example._pipeline_name, data_root=os.path.join(example_dir, "data", "simple"),
        module_file=os.path.join(example_dir, "taxi_utils_native_keras.py"), beam_pipeline_args=beam_args,
        **example_paths(root)))
    return 0


def example_quality(root: str) -> Dict:
    """Accuracy at 0.5 and AUC of the example's pushed SavedModel on its own eval split.

    Its eval config computes BinaryAccuracy only, so both are scored here with its serving_default
    signature; the label is its own: tips > 0.2 * fare in float32, missing values as 0."""
    import numpy as np
    import tensorflow as tf
    from sklearn.metrics import roc_auc_score

    paths = example_paths(root)
    model_dir = sorted(glob.glob(os.path.join(paths["serving_model_dir"], "*")))[-1]
    files = glob.glob(os.path.join(paths["pipeline_root"], "CsvExampleGen", "examples", "*", "Split-eval", "*"))
    serve = tf.saved_model.load(model_dir).signatures["serving_default"]

    def value(example, name):
        values = example.features.feature[name].float_list.value
        return np.float32(values[0] if values else 0.0)

    labels, scores = [], []
    for batch in tf.data.TFRecordDataset(files, compression_type="GZIP").batch(1024):
        scores.append(serve(examples=batch)["outputs"].numpy().reshape(-1))
        for s in batch.numpy():
            example = tf.train.Example.FromString(s)
            labels.append(bool(value(example, "tips") > value(example, "fare") * np.float32(0.2)))
    labels, scores = np.array(labels), np.concatenate(scores)
    return {"accuracy": float(((scores > 0.5) == labels).mean()), "auc": float(roc_auc_score(labels, scores)),
            "eval_examples": int(len(labels))}


# --- ours ------------------------------------------------------------------------------------

def write_inputs(root: str, spec_path: str) -> Dict[str, str]:
    """A copy of the spec (so the thresholds-only change touches nothing in the repo) and an
    environment file with every output under root."""
    os.makedirs(root, exist_ok=True)
    with open(ENV_PATH) as f:
        env = yaml.safe_load(f)
    env.update(pipeline_root=os.path.join(root, "pipelines", "{name}"),
               metadata_path=os.path.join(root, "metadata", "{name}.sqlite"),
               model_repository=os.path.join(root, "model_repository"))
    paths = {"env": os.path.join(root, "env.yaml"), "spec": os.path.join(root, "spec.yaml")}
    with open(paths["env"], "w") as f:
        yaml.safe_dump(env, f)
    shutil.copyfile(spec_path, paths["spec"])
    return paths


def change_thresholds_only(spec_copy: str) -> str:
    """Lowers one threshold bound a little: a change that blesses the same model."""
    with open(spec_copy) as f:
        spec = yaml.safe_load(f)
    metric = sorted(spec["thresholds"])[0]
    spec["thresholds"][metric]["lower"] = round(spec["thresholds"][metric]["lower"] - 0.01, 4)
    with open(spec_copy, "w") as f:
        yaml.safe_dump(spec, f, sort_keys=False)
    return f"thresholds.{metric}.lower -> {spec['thresholds'][metric]['lower']}"


def run_ours(root: str, paths: Dict[str, str], name: str) -> Dict:
    """One `make run`: every run writes the same summary file, as `make run` does (build/run_summary.json),
    so an unchanged rerun can be answered from it (pipelines/fingerprint.py); a copy is kept per run."""
    summary_path = os.path.join(root, "run_summary.json")
    runs_before = pipeline_runs(root)
    seconds = timed_process(["-m", "pipelines.local_runner", "--spec", paths["spec"], "--env", paths["env"],
                             "--summary", summary_path], os.path.join(root, f"{name}.log"))
    shutil.copyfile(summary_path, os.path.join(root, f"{name}.json"))
    with open(summary_path) as f:
        summary = json.load(f)
    overall = summary.get("metrics", {}).get("overall", {})
    started_tfx = pipeline_runs(root) > runs_before
    states = component_states(summary, root) if started_tfx else {
        node: "NOT RUN" for node in summary.get("seconds_per_component", {})}  # answered from the fingerprint
    return {"seconds": seconds, "states": states, "started_tfx": started_tfx,
            "seconds_per_component": summary.get("seconds_per_component", {}) if started_tfx else {},
            "accuracy": overall.get("binary_accuracy"), "auc": overall.get("auc"),
            "blessed": summary.get("blessed"), "pushed": summary.get("pushed")}


def pipeline_runs(root: str) -> int:
    """How many pipeline runs ML Metadata has recorded under root (0 before the first)."""
    from pipelines import mlmd

    paths = glob.glob(os.path.join(root, "metadata", "*.sqlite"))
    return sum(len(mlmd.connect(p).get_contexts_by_type("pipeline_run")) for p in paths)


def component_states(summary: Dict, root: str) -> Dict[str, str]:
    """{node: COMPLETE | CACHED | ...} of the latest run, as ML Metadata recorded it."""
    from pipelines import mlmd

    path = os.path.join(root, "metadata", summary["pipeline_name"] + ".sqlite")
    if not os.path.exists(path):
        return {}
    store = mlmd.connect(path)
    run = mlmd.latest_run(store)
    return {node: state for _, node, state in mlmd.run_executions(store, run)} if run else {}


# --- results ---------------------------------------------------------------------------------

def verdicts(results: Dict) -> Dict[str, Dict]:
    example = results.get("example")
    if not example:
        return {}
    out = {}
    for key, target in TARGETS.items():
        ratio = results[key]["seconds"] / example["seconds"]
        out[key] = {"ratio": ratio, "target": target, "met": ratio <= target}
    return out


def fmt(value, spec=".3f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: Dict, checks: Dict) -> None:
    rows = [("run", "wall s", "x example", "target", "", "accuracy", "AUC")]
    example = results.get("example")
    if example:
        rows.append(("TFX example, first run", fmt(example["seconds"], ".1f"), "1.00", "", "",
                     fmt(example.get("accuracy")), fmt(example.get("auc"))))
    labels = {"first_run": "ours, first run", "rerun_unchanged": "ours, rerun unchanged",
              "rerun_thresholds": "ours, rerun thresholds-only"}
    for key, label in labels.items():
        check = checks.get(key, {})
        rows.append((label, fmt(results[key]["seconds"], ".1f"), fmt(check.get("ratio"), ".2f"),
                     f"<= {TARGETS[key]}", "" if not check else "met" if check["met"] else "MISSED",
                     fmt(results[key]["accuracy"]), fmt(results[key]["auc"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    print(f"\nthresholds-only change: {results['threshold_change']}")
    print(f"Beam arguments of every run: {' '.join(results['beam_args'])} (ours hands them to TFX as none, "
          f"Beam's defaults: pipelines/beam_profiles.py for_tfx)")
    load = results["load_average_1m"]
    print(f"load average (1 min) {load['start']:.2f} at start, {load['end']:.2f} at end, on {os.cpu_count()} cores")
    print(f"\n{'component':<28}{'first s':>8}  {'rerun':>9}  {'thresholds-only':>16}")
    first, rerun, thresholds = (results[k] for k in labels)
    for node in first["seconds_per_component"]:
        print(f"  {node:<26}{fmt(first['seconds_per_component'].get(node), '8.1f')}  "
              f"{rerun['states'].get(node, ''):>9}  {thresholds['states'].get(node, ''):>16}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-example", action="store_true", help="run only ours (no ratios)")
    parser.add_argument("--spec", default=os.path.join(REPO_ROOT, "configs", "taxi.yaml"))
    parser.add_argument("--example-child", metavar="ROOT", help=argparse.SUPPRESS)  # the child's mode
    parser.add_argument("--beam-args-json", default="[]", help=argparse.SUPPRESS)  # "--flag" values defeat nargs
    args = parser.parse_args(argv)
    if args.example_child:
        return example_child(args.example_child, json.loads(args.beam_args_json))
    root = tempfile.mkdtemp(prefix="bench_pipeline_")
    beam_args = direct_args()
    results = {"work_dir": root, "beam_args": beam_args, "load_average_1m": {"start": os.getloadavg()[0]}}
    example_root = os.path.join(root, "example")
    if not args.skip_example:
        print(f"bench: TFX's taxi native-Keras example, whole process; work dir {root}", flush=True)
        os.makedirs(example_root)
        results["example"] = {"seconds": timed_process(
            ["-m", "benchmarks.bench_pipeline", "--example-child", example_root, "--beam-args-json", json.dumps(beam_args)],
            os.path.join(root, "example.log"))}
    ours = os.path.join(root, "ours")
    paths = write_inputs(ours, args.spec)
    for key, label in (("first_run", "first run"), ("rerun_unchanged", "rerun, nothing changed")):
        print(f"bench: ours, {label} ...", flush=True)
        results[key] = run_ours(ours, paths, key)
    results["threshold_change"] = change_thresholds_only(paths["spec"])
    print(f"bench: ours, rerun after {results['threshold_change']} ...", flush=True)
    results["rerun_thresholds"] = run_ours(ours, paths, "rerun_thresholds")
    results["load_average_1m"]["end"] = os.getloadavg()[0]
    if not args.skip_example:  # scored after every timing, so no run shares the CPU with it
        results["example"].update(example_quality(example_root))
    checks = verdicts(results)
    print()
    print_table(results, checks)
    os.makedirs(os.path.dirname(JSON_PATH), exist_ok=True)
    with open(JSON_PATH, "w") as f:
        json.dump({**results, "targets": TARGETS, "checks": checks}, f, indent=2, default=str)
    print(f"wrote {JSON_PATH}")
    shutil.rmtree(root, ignore_errors=True)  # kept on failure, for a look at what went wrong
    return 0


if __name__ == "__main__":
    sys.exit(main())
