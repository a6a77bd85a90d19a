"""`make demo-drift`: the continuous-training loop on taxi data that drifts, end to end.

    python -m ops.demo_drift [--spans 2] [--rows_per_span 2500] [--work build/demo_drift]
                             [--json build/demo_drift.json]

1. The taxi rows, ordered by trip_start_timestamp, are cut into --spans spans of --rows_per_span
   rows. The last one is shifted as production might shift: fares x1.5 and a changed payment mix
   (the card payers pay cash).
2. The pipeline runs once per earlier span as it arrives (ExampleGen ingests the newest span;
   the spec's rolling window trains on all of them); the last run's model is promoted `stable`.
3. The shifted span is replayed through the proxy in front of the local server (both processes on
   127.0.0.1, the proxy holding back 10 % of users), and the monitor compares the served traffic
   with the training statistics: it flags the shift (skew against training).
4. The served span is exported with its labels (ops/export_span.py: policy and propensity per row),
   and `make retrain` (the local runner with --require_new_span) trains on the window including it,
   weighting the served rows by inverse propensity (the spec's `served` block).
5. Right after it, a full run: the same spans spec as one fresh pipeline (its own root, metadata
   and model repository: nothing cached, nothing ingested). The local runner ingests every span
   of the window older than the newest first (TFX 1.16's ExampleGen takes one span a run;
   pipelines/local_runner.py ingest_window_spans), then trains on the window: the code path a
   user's first run over a folder of spans takes.
6. The same retraining run is repeated on a copy of the store whose analyzer cache was emptied:
   Transform's time with and without tf.Transform's analyzer cache.

Figures (the JSON): the monitor's distances and anomalies; AUC on the newest span's holdout (its
eval split, what the Evaluator reads) of the promoted model (before) and the retrained one (after);
each run's seconds per component and the load average at its start and end; the incremental
retrain's seconds over the full run's.

The demo's spec is a copy of configs/taxi.yaml with the spans as data, the curated schema plus the
policy and propensity columns the served span brings (an inferred schema fails on a small span
where a sparse column such as pickup_census_tract holds no value at all), low quality floors (few rows), the data
gate's span-to-span drift bound opened (the point is to learn the new span, not to stop it) and a
short training schedule. The monitor keeps the taxi spec's skew thresholds.
"""

import argparse
import copy
import csv
import http.client
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import yaml

from components import feature_spec, sandbox
from components.values import coerce
from ops import export_span, monitor, release
from pipelines import mlmd

REPO = feature_spec.REPO_ROOT
TAXI_SPEC = os.path.join(REPO, "configs", "taxi.yaml")
TIME_COLUMN = "trip_start_timestamp"
FARE_SCALE = 1.5
HOLDBACK_SHARE = 0.1
BATCH_ROWS = 25  # rows per :predict request in the replay


class DemoError(RuntimeError):
    """A step of the scenario failed; the message names the step and its log."""


# --- the data ----------------------------------------------------------------------------------

def read_taxi(spec: feature_spec.FeatureSpec):
    path = spec.csv_files()[0]
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def cut_spans(rows: Sequence[Dict[str, str]], spans: int, rows_per_span: int) -> List[List[Dict[str, str]]]:
    """Consecutive time slices of the rows ordered by trip_start_timestamp, each cut to rows_per_span."""
    ordered = sorted(rows, key=lambda r: int(r[TIME_COLUMN]))
    size = len(ordered) // spans
    if size < rows_per_span:
        raise DemoError(f"--rows_per_span {rows_per_span} x --spans {spans} is more than the {len(ordered)} taxi rows")
    return [ordered[i * size:i * size + rows_per_span] for i in range(spans)]


def shift(rows: Sequence[Dict[str, str]]) -> List[Dict[str, str]]:
    """Fares x FARE_SCALE, and every card payer pays cash (half the change, measured, stays under the
    monitor's payment_type bound of 0.1)."""
    shifted = []
    for row in rows:
        row = dict(row)
        if row["fare"]:
            row["fare"] = repr(round(float(row["fare"]) * FARE_SCALE, 2))
        if row["payment_type"] == "Credit Card":
            row["payment_type"] = "Cash"
        shifted.append(row)
    return shifted


def write_span(spans_dir: str, number: int, header: Sequence[str], rows: Sequence[Dict[str, str]]) -> str:
    folder = os.path.join(spans_dir, f"span-{number}")
    os.makedirs(folder)
    with open(os.path.join(folder, "data.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(header))
        writer.writeheader()
        writer.writerows(rows)
    return folder


def write_spec(path: str, spans_dir: str, window: int, epochs: int = 6) -> str:
    raw = copy.deepcopy(feature_spec.read_yaml(TAXI_SPEC)[0])
    raw["data"] = {"path": os.path.abspath(spans_dir) + "/span-{SPAN}/data.csv", "rolling_spans": window,
                   "split": raw["data"].get("split", {"train": 2, "eval": 1})}
    raw["served"] = {"use": "inverse_propensity"}
    raw["schema"] = write_schema(os.path.join(os.path.dirname(os.path.abspath(path)), "schema.pbtxt"),
                                 feature_spec.resolve_path(raw["schema"]), feature_spec.parse(raw).served)
    raw["thresholds"] = {"AUC": {"lower": 0.55}}  # better than chance: a few thousand rows, a short schedule
    # The data gate's span-to-span bounds opened (distances are at most 1): still measured and logged, never a stop.
    raw["monitoring"] = {**raw.get("monitoring", {}),
                         "span_drift": {"infinity_norm": 1.0, "jensen_shannon_divergence": 1.0}}
    raw["training"] = {**raw["training"], "schedule": [{"learning_rate": 0.003, "batch_size": 64, "epochs": epochs}]}
    with open(path, "w") as f:
        yaml.safe_dump(raw, f, sort_keys=False)
    feature_spec.load(path)  # the copy is a valid spec
    return path


def write_schema(path: str, curated: str, served: feature_spec.Served) -> str:
    """The curated taxi schema plus the served columns: optional (a span never served lacks them)
    and absent at serving (no client sends them)."""
    from google.protobuf import text_format
    from tensorflow_metadata.proto.v0 import schema_pb2

    with open(curated) as f:
        schema = text_format.Parse(f.read(), schema_pb2.Schema())
    for name, kind in ((served.policy_column, schema_pb2.BYTES), (served.propensity_column, schema_pb2.FLOAT)):
        feature = schema.feature.add(name=name, type=kind)
        feature.presence.min_count = 0
        feature.value_count.min, feature.value_count.max = 0, 1
        feature.not_in_environment.append("SERVING")
    with open(path, "w") as f:
        f.write(text_format.MessageToString(schema))
    return path


def write_env(path: str, work: str, baseline: str = "stable") -> str:
    env = {"pipeline_root": os.path.join(work, "pipeline_root"),
           "metadata_path": os.path.join(work, "metadata.sqlite"),
           "model_repository": os.path.join(work, "model_repository"),
           "enable_cache": True, "beam_profile": "direct_in_memory", "baseline": baseline,
           # A loaded 2-core machine: the sandbox checks the wire, not this machine's speed.
           "sandbox": {"rows": 100, "latency_requests": 50, "max_p50_ms": 2000, "max_p99_ms": 10000,
                       "clients": 2, "throughput_seconds": 1, "min_requests_per_second": 1, "warmup_records": 20}}
    with open(path, "w") as f:
        yaml.safe_dump(env, f, sort_keys=False)
    return path


# --- the pipeline ------------------------------------------------------------------------------

def run_pipeline(spec_path: str, env_path: str, summary_path: str, retrain: bool = False) -> Dict[str, Any]:
    """One local run (`make run`, or `make retrain` with retrain=True) in its own process."""
    command = [sys.executable, "-m", "pipelines.local_runner", "--spec", spec_path, "--env", env_path,
               "--summary", summary_path] + (["--require_new_span"] if retrain else [])
    load_at_start = os.getloadavg()
    started = time.monotonic()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=_python_env())
    seconds = time.monotonic() - started
    load_at_end = os.getloadavg()
    if done.returncode != 0 or not os.path.exists(summary_path):
        raise DemoError(f"{' '.join(command)} exited {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}")
    with open(summary_path) as f:
        summary = json.load(f)
    summary["wall_seconds"] = round(seconds, 1)
    # The machine is shared: a run's seconds mean little without the load it ran under.
    summary["load_average"] = {"start": [round(x, 2) for x in load_at_start],
                               "end": [round(x, 2) for x in load_at_end]}
    return summary


def _python_env() -> Dict[str, str]:
    return dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2", PYTHONWARNINGS="ignore",
                PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))


def overall_auc(evaluation_uri: str, model_name: str) -> Optional[float]:
    """AUC on the overall slice of one model of an Evaluator output (candidate or baseline)."""
    import tensorflow_model_analysis as tfma

    try:
        result = tfma.load_eval_result(evaluation_uri, model_name=model_name)
    except (KeyError, OSError) as e:  # no such model in this evaluation (e.g. no baseline resolved)
        print(f"no {model_name} metrics in {evaluation_uri}: {e!r}", file=sys.stderr)
        return None
    for slice_key, by_output in result.slicing_metrics:
        if slice_key == ():
            for sub_keys in by_output.values():
                for values in sub_keys.values():
                    if "auc" in {k.lower() for k in values}:
                        name = next(k for k in values if k.lower() == "auc")
                        return round(float(values[name]["doubleValue"]), 4)
    return None


# --- serving and the replay --------------------------------------------------------------------

class Serving:
    """The local server over the model repository's models.config, and the proxy in front of it."""

    def __init__(self, model_repository: str, work: str, model: str, classes: Sequence[str]):
        self.model_repository, self.work, self.model, self.classes = model_repository, work, model, list(classes)
        self.log = os.path.join(work, "prediction_log.sqlite")
        self.processes: List[subprocess.Popen] = []
        self.port: Optional[int] = None

    def __enter__(self) -> "Serving":
        env = _python_env()
        rest = sandbox.free_port()
        out = open(os.path.join(self.work, "serving.log"), "w")
        self.processes.append(subprocess.Popen(
            [sys.executable, "-m", "serving.server", "--model_config_file",
             os.path.join(self.model_repository, "models.config"), "--rest_api_port", str(rest),
             "--port", str(sandbox.free_port()), "--allow_version_labels_for_unavailable_models"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
        port_file = os.path.join(self.work, "proxy.port")
        # A generous timeout: the first calls trace the model's functions, seconds on a loaded machine.
        proxy_env = dict(env, PROXY_BACKEND=f"http://127.0.0.1:{rest}", PROXY_MODEL=self.model, PROXY_RETRIES="1",
                         PROXY_TIMEOUT_SECONDS="60",
                         PROXY_VARIANTS=json.dumps({"stable": {"label": "stable", "weight": 1}}),
                         PROXY_CLASSES=json.dumps(self.classes), PROXY_HOLDBACK_SHARE=str(HOLDBACK_SHARE),
                         PROXY_HOLDBACK_POLICY="fallback",
                         PROXY_FALLBACK=json.dumps({"classes": self.classes[0], "class_ids": 0, "score": 0.0,
                                                    "probabilities": [1.0, 0.0]}))
        proxy_env.pop("PROXY_ENV_FILE", None)
        self.processes.append(subprocess.Popen(
            [sys.executable, "-m", "serving.proxy", "--port", "0", "--port_file", port_file, "--log", self.log],
            cwd=REPO, env=proxy_env, stdout=out, stderr=subprocess.STDOUT))
        try:
            self._wait(rest, port_file)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait(self, rest: int, port_file: str, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.processes):
                raise DemoError(f"a serving process exited early; see {os.path.join(self.work, 'serving.log')}")
            if os.path.exists(port_file):
                port = int(open(port_file).read().split()[0])
                status, _ = _get(port, "/readyz")  # ready once the `stable` label can answer
                if status == 200:
                    self.port = port
                    return
            time.sleep(0.5)
        raise DemoError(f"the server did not serve {self.model}/labels/stable behind the proxy within {timeout:.0f} s; "
                        f"see {os.path.join(self.work, 'serving.log')}")

    def __exit__(self, *exc) -> None:
        sandbox.stop(self.processes)
        self.processes = []


def _get(port: int, path: str):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    except OSError:
        return None, b""
    finally:
        conn.close()


def instance(row: Dict[str, str], spec: feature_spec.FeatureSpec) -> Dict[str, Any]:
    """A CSV row as a :predict instance: the features only; a missing value is "" or NaN on the wire."""
    values = {}
    for name, feature in spec.features.items():
        value = coerce(row.get(name, ""), feature.type)
        if value is None:
            value = "" if feature.type == "string" else float("nan")
        values[name] = value.decode() if isinstance(value, bytes) else value
    return values


def replay(port: int, rows: Sequence[Dict[str, str]], spec: feature_spec.FeatureSpec,
           label_column: str) -> List[Dict[str, Any]]:
    """Sends the rows through the proxy, one user per request; returns the ground truth to join later."""
    truth = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        for start in range(0, len(rows), BATCH_ROWS):
            batch, request_id = rows[start:start + BATCH_ROWS], f"demo-{start}"
            body = json.dumps({"instances": [instance(r, spec) for r in batch]})
            conn.request("POST", f"/v1/models/{spec.name}:predict", body=body,
                         headers={"Content-Type": "application/json", "X-Request-Id": request_id,
                                  "X-User-Id": f"user-{start}"})
            response = conn.getresponse()
            text = response.read()
            if response.status != 200:
                raise DemoError(f"replay: the proxy answered {response.status}: {text[:300]!r}")
            truth += [{"request_id": request_id, "row": i, "label": float(r[label_column])}
                      for i, r in enumerate(batch) if r[label_column] != ""]
    finally:
        conn.close()
    return truth


# --- the scenario ------------------------------------------------------------------------------

def scenario(work: str, spans: int = 2, rows_per_span: int = 2500, epochs: int = 6,
             measure_cache: bool = True, resume: bool = False) -> Dict[str, Any]:
    """The whole scenario in `work` (replaced; with resume, the runs on earlier spans that succeeded
    there already are kept)."""
    if os.path.exists(work) and not resume:
        shutil.rmtree(work)
    os.makedirs(work, exist_ok=True)
    work = os.path.abspath(work)
    spans_dir = os.path.join(work, "spans")
    taxi = feature_spec.load(TAXI_SPEC)
    header, rows = read_taxi(taxi)
    cut = cut_spans(rows, spans, rows_per_span)
    spec_path = write_spec(os.path.join(work, "spec.yaml"), spans_dir, window=spans, epochs=epochs)
    env_path = write_env(os.path.join(work, "env.yaml"), work)
    spec = feature_spec.load(spec_path)
    report: Dict[str, Any] = {"spans": spans, "rows_per_span": rows_per_span, "work": work, "runs": {}}

    for number, span_rows in enumerate(cut[:-1], start=1):  # the spans arrive one at a time
        summary_path = os.path.join(work, f"run-{number}.json")
        summary = _finished(summary_path) if resume else None
        if summary is None:
            write_span(spans_dir, number, header, span_rows)
            summary = run_pipeline(spec_path, env_path, summary_path)
        report["runs"][f"span-{number}"] = _run_figures(summary)
    version = summary.get("model_version")
    if not summary.get("pushed") or version is None:
        raise DemoError(f"the run on spans 1-{spans - 1} pushed no model (blessed: {summary.get('blessed')}); "
                        f"see {os.path.join(work, f'run-{spans - 1}.json')}")
    env = yaml.safe_load(open(env_path))
    release.promote(env["model_repository"], env["metadata_path"], spec.name, int(version), "stable",
                    who="demo-drift")
    report["promoted"] = int(version)

    shifted = shift(cut[-1])
    label = export_span.label_column(spec)
    started = time.time()
    with Serving(env["model_repository"], work, spec.name, spec.label.classes) as serving:
        truth = replay(serving.port, shifted, spec, label)
    labels_path = os.path.join(work, "labels.jsonl")
    with open(labels_path, "w") as f:
        f.writelines(json.dumps(t) + "\n" for t in truth)
    log = os.path.join(work, "prediction_log.sqlite")

    code = monitor.main(["--log", log, "--model", spec.name, "--spec", spec_path, "--env", env_path,
                         "--thresholds", json.dumps({"drift": _taxi_monitoring()["drift"]}),
                         "--start", str(started - 1), "--end", str(time.time() + 1),
                         "--out_dir", os.path.join(work, "monitor")])
    with open(os.path.join(work, "monitor", f"{spec.name}_monitor.json")) as f:
        watched = json.load(f)
    report["monitor"] = {"exit_code": code, "anomalous_features": watched["anomalous_features"],
                         "anomalies": [{k: a.get(k) for k in ("feature", "kind", "comparator", "value", "threshold")}
                                       for a in watched["anomalies"]],
                         "measurements": watched.get("measurements")}

    exported = export_span.export(log, labels_path, spans_dir, spec, start=started - 1, end=time.time() + 1,
                                  metadata=env["metadata_path"])
    report["exported_span"] = {k: exported[k] for k in ("span", "rows", "left_out", "policies")}

    if measure_cache:  # a copy of everything as it stands, for the same retraining without a cache
        if os.path.exists(work + "-nocache"):
            shutil.rmtree(work + "-nocache")
        shutil.copytree(work, work + "-nocache", symlinks=True,
                        ignore=shutil.ignore_patterns("*-nocache"))
    retrained = run_pipeline(spec_path, env_path, os.path.join(work, "retrain.json"), retrain=True)
    report["runs"]["retrain"] = _run_figures(retrained)
    report["runs"]["full"] = _full_run(work, spec_path, spec)
    report["incremental_vs_full"] = _incremental_vs_full(report["runs"]["retrain"], report["runs"]["full"])
    evaluation = retrained["artifacts"]["evaluation"]
    report["newest_span_holdout_auc"] = {"before_promoted_model": overall_auc(evaluation, "baseline"),
                                         "after_retraining": overall_auc(evaluation, "candidate")}
    if measure_cache:
        report["runs"]["retrain_without_analyzer_cache"] = _retrain_without_cache(work, spec_path)
        with_cache = report["runs"]["retrain"]["seconds_per_component"].get("Transform")
        without = report["runs"]["retrain_without_analyzer_cache"]["seconds_per_component"].get("Transform")
        report["transform_seconds"] = {"with_cache": with_cache, "without_cache": without,
                                       "speed_up": round(without / with_cache, 2) if with_cache else None}
    return report


def _finished(summary_path: str) -> Optional[Dict[str, Any]]:
    """A run's summary when it succeeded (its wall time is the runner's own total)."""
    if not os.path.exists(summary_path):
        return None
    with open(summary_path) as f:
        summary = json.load(f)
    return {**summary, "wall_seconds": summary["total_seconds"]} if summary.get("succeeded") else None


def _taxi_monitoring() -> Dict[str, Any]:
    """The taxi spec's own monitoring bounds: the demo spec opened only the data gate's span_drift bounds."""
    return feature_spec.read_yaml(TAXI_SPEC)[0]["monitoring"]


def _retrain_without_cache(work: str, spec_path: str) -> Dict[str, Any]:
    """The retraining run again, on the copy made before it, with every cached analyzer result removed:
    tf.Transform misses the cache and analyzes every span of the window."""
    copy_dir = work + "-nocache"
    for uri in mlmd.artifact_uris(os.path.join(copy_dir, "metadata.sqlite"), "TransformCache"):
        # The copy's store names the original's files: empty those; the original run is done.
        if os.path.isdir(uri):
            shutil.rmtree(uri)
            os.makedirs(uri)
    env_path = write_env(os.path.join(copy_dir, "env.yaml"), copy_dir)
    return _run_figures(run_pipeline(spec_path, env_path, os.path.join(copy_dir, "retrain.json"), retrain=True))


def _full_run(work: str, spec_path: str, spec: feature_spec.FeatureSpec) -> Dict[str, Any]:
    """The spans spec as one fresh pipeline in <work>-full (replaced): the reference the incremental
    retrain is measured against. Its empty store has ingested no span, so the run ingests every span
    of the window before it trains."""
    full = work + "-full"
    if os.path.exists(full):
        shutil.rmtree(full)
    os.makedirs(full)
    files = spec.csv_files()  # every span of the rolling window, as the spec resolves it on disk now
    env_path = write_env(os.path.join(full, "env.yaml"), full)
    figures = _run_figures(run_pipeline(spec_path, env_path, os.path.join(full, "run.json")))
    return {**figures, "spans": [os.path.relpath(f, work) for f in files]}


def _incremental_vs_full(incremental: Dict[str, Any], full: Dict[str, Any]) -> Dict[str, Any]:
    return {"incremental_wall_seconds": incremental["wall_seconds"], "full_wall_seconds": full["wall_seconds"],
            "ratio": round(incremental["wall_seconds"] / full["wall_seconds"], 3),
            "incremental_load_average": incremental["load_average"], "full_load_average": full["load_average"]}


def _run_figures(summary: Dict[str, Any]) -> Dict[str, Any]:
    return {"wall_seconds": summary["wall_seconds"], "load_average": summary.get("load_average"),
            "total_seconds": summary.get("total_seconds"),
            "seconds_per_component": summary.get("seconds_per_component", {}),
            "pushed_version": summary.get("model_version"), "blessed": summary.get("blessed"),
            "auc": (summary.get("metrics", {}).get("overall") or {}).get("auc")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spans", type=int, default=2, help="spans cut from the taxi rows; the last is shifted")
    parser.add_argument("--rows_per_span", type=int, default=2500)
    parser.add_argument("--epochs", type=int, default=6, help="training epochs per run")
    parser.add_argument("--work", default="build/demo_drift", help="spans, store, runs (replaced)")
    parser.add_argument("--json", default="build/demo_drift.json")
    parser.add_argument("--resume", action="store_true", help="keep --work and the runs on earlier spans "
                        "that succeeded there")
    parser.add_argument("--no_cache_measurement", action="store_true",
                        help="skip the second retraining run without the analyzer cache")
    args = parser.parse_args(argv)
    if args.spans < 2:
        parser.error("--spans must be at least 2: earlier spans to train on and a last one that drifts")
    try:
        report = scenario(args.work, args.spans, args.rows_per_span, args.epochs, not args.no_cache_measurement,
                          args.resume)
    except (DemoError, export_span.ExportError, release.ReleaseError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2, sort_keys=True)
    print(json.dumps({k: report.get(k) for k in ("newest_span_holdout_auc", "transform_seconds",
                                                 "incremental_vs_full")}, indent=2))
    print(f"monitor: {report['monitor']['anomalous_features']} -> {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
