"""What a person sees after a run: the JSON summary, a printed digest and HTML reports.

Everything is read back from ML Metadata and the run's artifacts, so the summary
describes what the pipeline recorded, cached components included.
"""

import html
import json
import math
import os
from typing import Any, Dict, List, Optional

from components.feature_spec import FeatureSpec
from pipelines.mlmd import custom_property, latest_run_record


def _from_node(artifacts: Dict[str, List[Any]], type_name: str, node_id: str) -> List[Any]:
    """Artifacts of a type written by one node (TFX lays out <root>/<node>/<output>/<id>)."""
    return [a for a in artifacts.get(type_name, [])
            if os.path.normpath(a.uri).split(os.sep)[-3:-2] == [node_id]]


def _slice_name(slice_key) -> str:
    return "Overall" if not slice_key else ", ".join(f"{k}={v}" for k, v in slice_key)


def load_metrics(evaluation_uri: str) -> Dict[str, Dict[str, float]]:
    """{slice name: {metric: value}} from an Evaluator output."""
    import tensorflow_model_analysis as tfma

    result = tfma.load_eval_result(evaluation_uri)
    out = {}
    for slice_key, by_output in result.slicing_metrics:
        metrics = {}
        for sub_keys in by_output.values():
            for sub_key, values in sub_keys.items():
                for name, value in values.items():
                    if "doubleValue" in value:
                        label = name if not sub_key else f"{name}[{sub_key}]"
                        number = float(value["doubleValue"])  # "NaN" arrives as a string
                        metrics[label] = number if math.isfinite(number) else None
        out[_slice_name(slice_key)] = metrics
    return out


def build_summary(spec: FeatureSpec, env: Dict, environment, order: List[str], seconds: Dict[str, float],
                  total_seconds: float, error: Optional[BaseException]) -> Dict[str, Any]:
    artifacts, baseline = latest_run_record(environment.metadata_connection_config)
    pushed = _from_node(artifacts, "PushedModel", "Pusher")
    blessing = _from_node(artifacts, "ModelBlessing", "Evaluator")
    evaluation = _from_node(artifacts, "ModelEvaluation", "Evaluator")
    stats = _from_node(artifacts, "ExampleStatistics", "StatisticsGen")
    anomalies = _from_node(artifacts, "ExampleAnomalies", "ExampleValidator")
    model = _from_node(artifacts, "Model", "Trainer")
    infra = _from_node(artifacts, "InfraBlessing", "sandbox_validator")
    is_pushed = bool(pushed and custom_property(pushed[-1], "pushed", 0))
    metrics = load_metrics(evaluation[-1].uri) if evaluation and not error else {}
    return {
        "pipeline_name": spec.name,
        "data_path": spec.data_path,
        "succeeded": error is None,
        "error": None if error is None else f"{type(error).__name__}: {error}",
        "pushed": is_pushed,
        "model_path": custom_property(pushed[-1], "pushed_destination") if is_pushed else None,
        "model_version": custom_property(pushed[-1], "pushed_version") if is_pushed else None,
        "blessed": bool(blessing and custom_property(blessing[-1], "blessed", 0)),
        "sandbox": sandbox_result(infra[-1].uri) if infra else None,
        "baseline_model": baseline,  # the blessed model the candidate was compared with
        "metrics": {"overall": metrics.get("Overall", {}),
                    "slices": {k: v for k, v in metrics.items() if k != "Overall"}},
        "seconds_per_component": {node: round(seconds[node], 2) for node in order if node in seconds},
        "total_seconds": round(total_seconds, 2),
        "artifacts": {"model": model[-1].uri if model else None,
                      "statistics": stats[-1].uri if stats else None,
                      "anomalies": anomalies[-1].uri if anomalies else None,
                      "evaluation": evaluation[-1].uri if evaluation else None},
        "model_repository": env["model_repository"],
    }


def sandbox_result(uri: str) -> Optional[Dict[str, Any]]:
    """The sandbox validator's verdict and figures (components/sandbox.py writes the report)."""
    path = os.path.join(uri, "sandbox_report.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        report = json.load(f)
    latency, throughput = report.get("latency", {}), report.get("throughput", {})
    return {"blessed": report["blessed"], "reasons": report["reasons"],
            "rows_compared": report.get("predictions", {}).get("rows"),
            "rows_differing": report.get("predictions", {}).get("rows_differing"),
            "p50_ms": latency.get("p50_ms"), "p99_ms": latency.get("p99_ms"),
            "requests_per_second": throughput.get("requests_per_second"),
            "warmup_records": report.get("warmup_records")}


def write_summary(summary: Dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(summary, f, indent=2, sort_keys=False)


def print_summary(summary: Dict[str, Any]) -> None:
    print(f"\n== {summary['pipeline_name']}: {'succeeded' if summary['succeeded'] else 'FAILED'} "
          f"in {summary['total_seconds']:.0f} s ==")
    if summary["error"]:
        print(summary["error"])
    sandbox = summary.get("sandbox")
    if sandbox and sandbox.get("p50_ms") is not None:
        print(f"sandbox: blessed={sandbox['blessed']}  rows differing {sandbox['rows_differing']}/"
              f"{sandbox['rows_compared']}  p50 {sandbox['p50_ms']:.2f} ms  p99 {sandbox['p99_ms']:.2f} ms  "
              f"{sandbox['requests_per_second']:.0f} requests/s")
    for reason in (sandbox or {}).get("reasons", []):
        print(f"sandbox: not blessed: {reason}")
    print(f"blessed: {summary['blessed']}   pushed: {summary['pushed']}"
          + (f" -> {summary['model_path']} (version {summary['model_version']})" if summary["pushed"] else ""))
    overall = summary["metrics"]["overall"]
    if overall:
        print("overall: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(overall.items()) if v is not None))
    for name, path in (summary.get("reports") or {}).items():
        print(f"{name} report: {path}")
    print(f"full log: {summary.get('log')}")


def write_html(summary: Dict[str, Any], spec: FeatureSpec, report_dir: str) -> Dict[str, str]:
    """Data statistics + anomalies (TFDV's HTML display) and evaluation per slice."""
    os.makedirs(report_dir, exist_ok=True)
    written = {}
    stats_uri, anomalies_uri = summary["artifacts"]["statistics"], summary["artifacts"]["anomalies"]
    if stats_uri:
        written["data"] = _data_html(stats_uri, anomalies_uri, os.path.join(report_dir, f"{spec.name}_data.html"))
    if summary["metrics"]["overall"]:
        written["evaluation"] = _evaluation_html(summary, os.path.join(report_dir, f"{spec.name}_evaluation.html"))
    return written


def _data_html(stats_uri: str, anomalies_uri: Optional[str], path: str) -> str:
    import tensorflow_data_validation as tfdv
    from tensorflow_data_validation.utils import display_util
    from tensorflow_metadata.proto.v0 import anomalies_pb2

    train = tfdv.load_stats_binary(os.path.join(stats_uri, "Split-train", "FeatureStats.pb"))
    evaluation = tfdv.load_stats_binary(os.path.join(stats_uri, "Split-eval", "FeatureStats.pb"))
    parts = ["<h1>Data statistics: train vs eval</h1>",
             display_util.get_statistics_html(train, evaluation, lhs_name="train", rhs_name="eval")]
    for split in ("train", "eval"):
        file = os.path.join(anomalies_uri or "", f"Split-{split}", "SchemaDiff.pb")
        if anomalies_uri and os.path.exists(file):
            anomalies = anomalies_pb2.Anomalies()
            with open(file, "rb") as f:
                anomalies.ParseFromString(f.read())
            table = display_util.get_anomalies_dataframe(anomalies)
            parts.append(f"<h2>Anomalies ({split})</h2>"
                         + (table.to_html() if len(table) else "<p>No anomalies found.</p>"))
    with open(path, "w") as f:
        f.write("<!doctype html><meta charset='utf-8'><title>data report</title>" + "\n".join(parts))
    return path


def _evaluation_html(summary: Dict[str, Any], path: str) -> str:
    rows = {"Overall": summary["metrics"]["overall"], **summary["metrics"]["slices"]}
    names = sorted({m for metrics in rows.values() for m in metrics})
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    body = "".join(
        f"<tr><th>{html.escape(s)}</th>" + "".join(
            f"<td>{metrics[n]:.4f}</td>" if metrics.get(n) is not None else "<td></td>" for n in names) + "</tr>"
        for s, metrics in rows.items())
    with open(path, "w") as f:
        f.write("<!doctype html><meta charset='utf-8'><title>evaluation</title>"
                "<style>td,th{padding:2px 8px;text-align:right}</style>"
                f"<h1>Evaluation of {html.escape(summary['pipeline_name'])}</h1>"
                f"<p>blessed: {summary['blessed']}, pushed: {summary['pushed']}, "
                f"version: {summary['model_version']}</p>"
                f"<table border=1><tr><th>slice</th>{head}</tr>{body}</table>")
    return path
