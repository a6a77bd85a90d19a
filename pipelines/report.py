"""What a person sees after a run: the JSON summary, a printed digest and HTML reports.

Everything is read back from ML Metadata and the run's artifacts, so the summary
describes what the pipeline recorded, cached components included.
"""

import html
import json
import math
import os
from typing import Any, Dict, List, Optional, Tuple

from components.feature_spec import FeatureSpec
from pipelines.mlmd import custom_property, latest_run_node, latest_run_record


def _from_node(artifacts: Dict[str, List[Any]], type_name: str, node_id: str) -> List[Any]:
    """Artifacts of a type written by one node (TFX lays out <root>/<node>/<output>/<id>)."""
    return [a for a in artifacts.get(type_name, [])
            if os.path.normpath(a.uri).split(os.sep)[-3:-2] == [node_id]]


def _slice_name(slice_key) -> str:
    return "Overall" if not slice_key else ", ".join(f"{k}={v}" for k, v in slice_key)


def _baseline_models(evaluation_uri: str) -> set:
    """Names of the baseline models in an Evaluator output (their metrics are not the candidate's)."""
    path = os.path.join(evaluation_uri, "eval_config.json")
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        specs = json.load(f).get("evalConfig", {}).get("modelSpecs", [])
    return {s.get("name", "") for s in specs if s.get("isBaseline")}


def _number(metric_value) -> Optional[float]:
    """A MetricValue as a float; None for NaN (TFMA's "cannot compute") and non-scalar values."""
    kind = metric_value.WhichOneof("type")
    if kind == "double_value":
        number = metric_value.double_value.value
    elif kind == "bounded_value":
        number = metric_value.bounded_value.value.value
    else:
        return None
    return number if math.isfinite(number) else None


def _curves(plot_data) -> Dict[str, Any]:
    """ROC and precision-recall points, class counts and calibration buckets of one plot."""
    out: Dict[str, Any] = {}
    matrices = plot_data.confusion_matrix_at_thresholds.matrices
    if matrices:
        first = matrices[0]
        out["positives"] = first.true_positives + first.false_negatives
        out["negatives"] = first.true_negatives + first.false_positives
        at_half = min(matrices, key=lambda m: abs(m.threshold - 0.5))  # TFMA's precision threshold
        out["predicted_positives"] = at_half.true_positives + at_half.false_positives
        out["roc"] = [(m.false_positive_rate, m.recall) for m in matrices]
        out["precision_recall"] = [(m.recall, m.precision) for m in matrices if m.true_positives + m.false_positives > 0]
    buckets = [b for b in plot_data.calibration_histogram_buckets.buckets if b.num_weighted_examples.value > 0]
    if buckets:
        out["calibration"] = [(b.total_weighted_refined_prediction.value / b.num_weighted_examples.value,
                               b.total_weighted_label.value / b.num_weighted_examples.value,
                               b.num_weighted_examples.value) for b in buckets]
    return out


# A metric that needs both classes in a slice (or, for recall, the positive one); on a slice
# without them TFMA reports a number (AUC 0.0) that means nothing.
_NEEDS_BOTH_CLASSES = ("auc", "auc_precision_recall")
_NEEDS_POSITIVES = ("recall",)


def _undefined(name: str, counts: Dict[str, Tuple[float, float]]) -> bool:
    """Whether metric `name` is undefined on a slice with these {class group: (positives,
    negatives)}; group "" is the binary label, "class_k" one class against the rest."""
    base, _, group = name.partition("_class_")
    group = f"class_{group}" if group else ""
    macro = base.startswith("macro_")
    base = base[len("macro_"):] if macro else base
    groups = [g for g in counts if g] if macro else [group]
    for g in groups:
        if g not in counts:
            continue
        positives, negatives = counts[g]
        if base in _NEEDS_BOTH_CLASSES and (positives == 0 or negatives == 0):
            return True
        if base in _NEEDS_POSITIVES and positives == 0:
            return True
    return False


CONFIDENCE = 0.95


def proportion_interval(value: float, trials: float) -> Optional[List[float]]:
    """Wilson score interval of a proportion (accuracy, precision, recall) seen over `trials`."""
    from scipy import stats

    if not trials:
        return None
    found = stats.binomtest(int(round(value * trials)), int(round(trials))).proportion_ci(CONFIDENCE, method="wilson")
    return [float(found.low), float(found.high)]


def auc_interval(auc: float, positives: float, negatives: float) -> Optional[List[float]]:
    """Normal interval of an AUC with Hanley and McNeil's (1982) standard error, from the class
    counts alone: TFMA's own (jackknife) intervals cost 6.5 times the Evaluator's CPU here."""
    from scipy import stats

    if not (positives and negatives):
        return None
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    variance = (auc * (1 - auc) + (positives - 1) * (q1 - auc * auc)
                + (negatives - 1) * (q2 - auc * auc)) / (positives * negatives)
    half = stats.norm.ppf(0.5 + CONFIDENCE / 2) * math.sqrt(max(variance, 0.0))
    return [max(auc - half, 0.0), min(auc + half, 1.0)]


def _interval(name: str, value: float, examples: Optional[int], plots: Dict[str, Dict[str, Any]]):
    base, _, group = name.partition("_class_")
    counts = plots.get(f"class_{group}" if group else "", {})
    if base in ("binary_accuracy", "sparse_categorical_accuracy"):
        return proportion_interval(value, examples or 0)
    if base == "recall":
        return proportion_interval(value, counts.get("positives", 0))
    if base == "precision":
        return proportion_interval(value, counts.get("predicted_positives", 0))
    if base == "auc" and "positives" in counts:
        return auc_interval(value, counts["positives"], counts["negatives"])
    return None


def read_evaluation(evaluation_uri: str) -> Dict[str, Any]:
    """The candidate's metrics, confidence intervals, changes against the baseline and plots per
    slice, Overall first and then by size, and TFMA's validation result.

    {"slices": {name: {"examples", "metrics", "intervals": {metric: [lower, upper]}, "diffs", "baseline",
    "plots": {group: {"roc", "precision_recall", "calibration", "positives", "negatives",
    "predicted_positives"}}}},
     "validation": {"ok", "rubber_stamp", "failures": [{"slice", "metric", "kind", "value", "message"}]}}
    With a baseline model, "baseline" holds its metrics (TFMA keys them by the baseline's model_name)
    and "diffs" TFMA's candidate minus baseline (the candidate's key with is_diff; TFMA 0.47
    evaluators/metrics_plots_and_validations_evaluator.py:628-657 add_diff_metrics, metric_types.py:361-366
    make_diff_key and make_baseline_key); a change either side cannot define is None. Metric names
    come from components.evaluation.metric_name; a metric a slice cannot define
    (AUC with one class present) is None, never 0. Intervals (95%) are Wilson's for proportions
    and Hanley-McNeil's for AUC, from the counts in TFMA's confusion matrices."""
    import tensorflow_model_analysis as tfma
    from tensorflow_model_analysis.slicer import slicer_lib

    from components.evaluation import metric_name

    baselines = _baseline_models(evaluation_uri)
    slices: Dict[str, Dict[str, Any]] = {}

    def entry(slice_key) -> Dict[str, Any]:
        name = _slice_name(slicer_lib.deserialize_slice_key(slice_key))
        return slices.setdefault(name, {"examples": None, "metrics": {}, "intervals": {}, "diffs": {}, "baseline": {},
                                        "plots": {}})

    for for_slice in tfma.load_metrics(evaluation_uri):
        e = entry(for_slice.slice_key)
        for kv in for_slice.metric_keys_and_values:
            name, value = metric_name(kv.key), _number(kv.value)
            if kv.key.model_name in baselines:  # TFMA keys the baseline's own figures by its model name
                e["baseline"][name] = value
                continue
            if kv.key.is_diff:
                e["diffs"][name[:-len("_diff")]] = value
                continue
            if name in e["metrics"]:
                raise ValueError(f"{evaluation_uri}: two metrics on one slice are both named {name!r} "
                                 f"({kv.key.name!r}): give components/evaluation.py's EvalConfig one of each")
            e["metrics"][name] = value
            if kv.HasField("confidence_interval"):
                lower, upper = _number(kv.confidence_interval.lower_bound), _number(kv.confidence_interval.upper_bound)
                if lower is not None and upper is not None:
                    e["intervals"][name] = [lower, upper]
    for for_slice in tfma.load_plots(evaluation_uri):
        e = entry(for_slice.slice_key)
        for kv in for_slice.plot_keys_and_values:
            if kv.key.model_name in baselines:
                continue
            group = metric_name(kv.key).split("_plot", 1)[-1].lstrip("_")  # "" or "class_2"
            e["plots"].setdefault(group, {}).update(_curves(kv.value))
    for e in slices.values():
        count = e["metrics"].get("example_count")
        e["examples"] = int(count) if count is not None else None
        counts = {g: (p["positives"], p["negatives"]) for g, p in e["plots"].items() if "positives" in p}
        if "" not in counts and e["metrics"].get("mean_label") in (0.0, 1.0) and e["examples"]:
            label = e["metrics"]["mean_label"]  # binary without plots: the label's mean tells
            counts[""] = (label * e["examples"], (1 - label) * e["examples"])
        for name in [n for n in e["baseline"] if _undefined(n, counts)]:  # the same rows, so the same counts
            e["baseline"][name] = None
            if name in e["diffs"]:
                e["diffs"][name] = None
        for name, value in list(e["metrics"].items()):
            if _undefined(name, counts):
                e["metrics"][name] = None
                e["intervals"].pop(name, None)
                if name in e["diffs"]:
                    e["diffs"][name] = None
            elif value is not None and name not in e["intervals"]:  # TFMA's, when its options ask for them
                found = _interval(name, value, e["examples"], e["plots"])
                if found:
                    e["intervals"][name] = found
    ordered = dict(sorted(slices.items(), key=lambda kv: (kv[0] != "Overall", -(kv[1]["examples"] or 0), kv[0])))
    return {"slices": ordered, "validation": _validation(evaluation_uri, baselines)}


def _validation(evaluation_uri: str, baselines: set) -> Dict[str, Any]:
    import tensorflow_model_analysis as tfma
    from tensorflow_model_analysis.slicer import slicer_lib

    from components.evaluation import metric_name

    if not os.path.exists(os.path.join(evaluation_uri, "validations.tfrecord")):
        return {"ok": None, "rubber_stamp": None, "failures": []}
    result = tfma.load_validation_result(evaluation_uri)
    failures = []
    for per_slice in result.metric_validations_per_slice:
        name = _slice_name(slicer_lib.deserialize_slice_key(per_slice.slice_key))
        for failure in per_slice.failures:
            metric = metric_name(failure.metric_key)
            failures.append({"slice": name, "metric": metric[:-len("_diff")] if failure.metric_key.is_diff else metric,
                             "kind": "change" if failure.metric_threshold.HasField("change_threshold") else "value",
                             "value": _number(failure.metric_value), "message": failure.message})
    return {"ok": result.validation_ok, "rubber_stamp": result.rubber_stamp, "failures": failures}


def load_metrics(evaluation_uri: str) -> Dict[str, Dict[str, Optional[float]]]:
    """{slice name: {metric: value}} of the candidate in an Evaluator output (read_evaluation)."""
    return {name: e["metrics"] for name, e in read_evaluation(evaluation_uri)["slices"].items()}


def versus_baseline(evaluation: Dict[str, Any]) -> Dict[str, Dict[str, Dict[str, Optional[float]]]]:
    """{slice: {metric: {"candidate", "baseline", "difference"}}} of every metric the baseline model was
    evaluated on, per slice in read_evaluation's order; the difference is TFMA's (candidate minus
    baseline). Empty without a baseline model; None where a value is not defined."""
    return {name: {metric: {"candidate": e["metrics"].get(metric), "baseline": value,
                            "difference": e["diffs"].get(metric)}
                   for metric, value in e["baseline"].items() if metric != "example_count"}
            for name, e in evaluation["slices"].items() if e.get("baseline")}


def threshold_verdicts(spec: FeatureSpec, evaluation: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Every bound of every threshold in the spec with the Overall value it was checked on and
    TFMA's verdict: {"metric", "name", "kind" (lower/upper/change), "bound", "value", "passed",
    "note"}. passed is None for a change bound without a baseline (the first run) and for a
    metric the Evaluator did not compute."""
    from components.evaluation import threshold_metric_names

    names = threshold_metric_names(spec)
    overall = evaluation["slices"].get("Overall", {"metrics": {}, "diffs": {}})
    validation = evaluation["validation"]
    failed = {(f["metric"], f["kind"]): f for f in validation["failures"] if f["slice"] == "Overall"}
    verdicts = []
    for t in spec.thresholds:
        name = names[t.metric]
        value = overall["metrics"].get(name)
        value_failure = failed.get((name, "value"))
        for kind, bound in (("lower", t.lower), ("upper", t.upper)):
            if bound is None:
                continue
            # TFMA reports one failure per value threshold; the bound it broke is the one the value is past.
            broke = value_failure is not None and (value is None or (value < bound if kind == "lower" else value > bound))
            verdicts.append({"metric": t.metric, "name": name, "kind": kind, "bound": bound, "value": value,
                             "passed": None if validation["ok"] is None else not broke,
                             "note": value_failure["message"] if broke else ""})
        if t.change is not None:
            diff = overall["diffs"].get(name)
            checked = diff is not None and validation["ok"] is not None
            verdicts.append({"metric": t.metric, "name": name, "kind": "change", "bound": t.change, "value": diff,
                             "passed": (name, "change") not in failed if checked else None,
                             "note": failed[(name, "change")]["message"] if (name, "change") in failed else
                             "" if checked else "no baseline (no other blessed model to compare with): the change "
                             "is not checked"})
    return verdicts


def describe_verdict(v: Dict[str, Any]) -> str:
    """One threshold bound in words: "auc 0.8412 >= lower bound 0.9: FAIL"."""
    outcome = {True: "pass", False: "FAIL", None: "not checked"}[v["passed"]]
    if v["kind"] == "change":
        value = "no baseline" if v["value"] is None else f"{v['value']:+.4f}"
        text = f"{v['name']} change vs baseline {value}, allowed >= {v['bound']:+g}: {outcome}"
    else:
        value = "not defined" if v["value"] is None else f"{v['value']:.4f}"
        text = f"{v['name']} {value}, {v['kind']} bound {v['bound']:g}: {outcome}"
    return text + (f" ({v['note']})" if v["note"] and v["passed"] is not True else "")


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
    evaluated = read_evaluation(evaluation[-1].uri) if evaluation and not error else None
    metrics = {name: e["metrics"] for name, e in evaluated["slices"].items()} if evaluated else {}
    intervals = {name: e["intervals"] for name, e in evaluated["slices"].items() if e["intervals"]} if evaluated else {}
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
        # Why (not) blessed: each threshold bound, its value and TFMA's verdict.
        "thresholds": threshold_verdicts(spec, evaluated) if evaluated else [],
        "metrics": {"overall": metrics.get("Overall", {}),
                    "slices": {k: v for k, v in metrics.items() if k != "Overall"},
                    "intervals": intervals},  # {slice: {metric: [lower, upper]}} where computed
        "versus_baseline": versus_baseline(evaluated) if evaluated else {},
        "span_drift": span_drift(spec, environment.metadata_connection_config),
        "seconds_per_component": {node: round(seconds[node], 2) for node in order if node in seconds},
        "total_seconds": round(total_seconds, 2),
        "artifacts": {"model": model[-1].uri if model else None,
                      "statistics": stats[-1].uri if stats else None,
                      "anomalies": anomalies[-1].uri if anomalies else None,
                      "evaluation": evaluation[-1].uri if evaluation else None},
        "model_repository": env["model_repository"],
    }


def span_drift(spec: FeatureSpec, connection_config) -> Optional[Dict[str, Any]]:
    """With spans: the run's newest span against the previous one, as the data gate measures it
    (components.data_gate.measure_span_drift, on the inputs ML Metadata recorded for the gate's latest
    execution, so a gate that stopped the run is reported too): {"span", "previous_span" (None on the
    first span), "measurements": [{"split", "feature", "comparator", "value" (the distance), "threshold"
    (the bound), "drifted"}], "not_judged": [{"split", "feature", "why"}] (too few values, or ignored)}. None
    without spans or when the run did not reach the gate."""
    if not spec.has_spans:
        return None
    gate = latest_run_node(connection_config, "data_gate")
    if not gate.get("inputs", {}).get("statistics"):
        return None
    from tfx.types import artifact_utils

    from components.data_gate import measure_span_drift

    inputs = {key: artifacts[-1] for key, artifacts in gate["inputs"].items() if artifacts}
    statistics, previous, schema = (inputs.get(k) for k in ("statistics", "previous_statistics", "schema"))
    measurements, not_judged = [], []
    if previous is not None and schema is not None:
        for split in artifact_utils.decode_split_names(statistics.properties["split_names"].string_value):
            measured, unjudged = measure_span_drift(statistics.uri, previous.uri, schema.uri, split, spec)
            measurements += [{"split": split, **m} for m in measured]
            not_judged += [{"split": split, "feature": f, "why": why} for f, why in sorted(unjudged.items())]
    return {"span": gate["spans"].get(statistics.id),
            "previous_span": gate["spans"].get(previous.id) if previous is not None else None,
            "measurements": measurements, "not_judged": not_judged}


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
    for verdict in summary.get("thresholds", []):
        print(f"threshold: {describe_verdict(verdict)}")
    overall = summary["metrics"]["overall"]
    if overall:
        print("overall: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(overall.items()) if v is not None))
    for name, path in (summary.get("reports") or {}).items():
        print(f"{name} report: {path}")
    print(f"full log: {summary.get('log')}")


def write_html(summary: Dict[str, Any], spec: FeatureSpec, report_dir: str) -> Dict[str, str]:
    """The data report (statistics train vs eval, anomalies) and the evaluation report (metrics
    per slice with intervals, plots, thresholds): self-contained pages made with pipelines.pages."""
    os.makedirs(report_dir, exist_ok=True)
    written = {}
    stats_uri, anomalies_uri = summary["artifacts"]["statistics"], summary["artifacts"]["anomalies"]
    if stats_uri:
        written["data"] = _data_html(summary, stats_uri, anomalies_uri, os.path.join(report_dir, f"{spec.name}_data.html"))
    if summary["metrics"]["overall"]:
        evaluated = read_evaluation(summary["artifacts"]["evaluation"])
        written["evaluation"] = _evaluation_html(summary, spec, evaluated,
                                                 os.path.join(report_dir, f"{spec.name}_evaluation.html"))
    return written


# --- data report ---------------------------------------------------------------------------

def load_statistics(path: str):
    """The DatasetFeatureStatistics of one split's FeatureStats.pb (StatisticsGen's output)."""
    import tensorflow_data_validation as tfdv

    stats = tfdv.load_stats_binary(path)
    return stats.datasets[0]


def _feature_name(feature) -> str:
    return feature.name or ".".join(feature.path.step)


def _common(feature):
    kind = feature.WhichOneof("stats")
    return getattr(feature, kind).common_stats if kind in ("num_stats", "string_stats", "bytes_stats") else None


def missing_rate(feature, num_examples: int) -> Optional[float]:
    """Share of examples without a value for the feature. TFDV counts an example whose value list
    is empty (CsvExampleGen's empty cell) as present, so for a feature of at most one value per
    example the missing ones are the examples minus the values."""
    common = _common(feature)
    if common is None or not num_examples:
        return None
    if common.max_num_values <= 1:
        return (num_examples - common.tot_num_values) / num_examples
    return common.num_missing / num_examples


def _rebinned(histogram, edges) -> List[float]:
    """A TFDV histogram's counts spread over common bucket edges (uniform within each bucket),
    so two splits with different ranges can be drawn side by side."""
    import numpy as np

    counts = np.zeros(len(edges) - 1)
    for b in histogram.buckets:
        if b.high_value <= b.low_value:
            index = min(max(int(np.searchsorted(edges, b.low_value, side="right")) - 1, 0), len(counts) - 1)
            counts[index] += b.sample_count
            continue
        overlap = np.clip(np.minimum(edges[1:], b.high_value) - np.maximum(edges[:-1], b.low_value), 0, None)
        counts += b.sample_count * overlap / (b.high_value - b.low_value)
    total = counts.sum()
    return list(counts / total) if total else list(counts)


def _standard_histogram(feature):
    from tensorflow_metadata.proto.v0 import statistics_pb2

    for h in feature.num_stats.histograms:
        if h.type == statistics_pb2.Histogram.STANDARD and h.buckets:
            return h
    return None


def distribution(feature_a, feature_b, buckets: int = 10) -> Optional[Tuple[List[str], List[float], List[float]]]:
    """(category labels, shares in a, shares in b) of one feature in two datasets: common
    equal-width buckets for numbers, a's most frequent values (and the rest) for strings."""
    import numpy as np

    kind = feature_a.WhichOneof("stats")
    if kind == "num_stats":
        hists = [_standard_histogram(f) if f is not None else None for f in (feature_a, feature_b)]
        present = [h for h in hists if h is not None]
        if not present:
            return None
        low = min(h.buckets[0].low_value for h in present)
        high = max(h.buckets[-1].high_value for h in present)
        edges = np.linspace(low, high, buckets + 1) if high > low else np.array([low, low + 1.0])
        shares = [_rebinned(h, edges) if h is not None else [0.0] * (len(edges) - 1) for h in hists]
        labels = [f"{edges[i]:.4g}–{edges[i + 1]:.4g}" for i in range(len(edges) - 1)]
        return labels, shares[0], shares[1]
    if kind == "string_stats":
        def frequencies(feature):
            if feature is None or feature.WhichOneof("stats") != "string_stats":
                return {}, 0.0
            values = {v.value: v.frequency for v in feature.string_stats.top_values}
            return values, float(feature.string_stats.common_stats.tot_num_values) or 1.0
        (fa, na), (fb, nb) = frequencies(feature_a), frequencies(feature_b)
        top = [v for v, _ in sorted(fa.items(), key=lambda kv: -kv[1])][:buckets]
        labels = top + (["(other)"] if len(fa) > len(top) or set(fb) - set(top) else [])
        a = [fa.get(v, 0.0) / na for v in top]
        b = [fb.get(v, 0.0) / nb for v in top]
        if len(labels) > len(top):
            a.append(max(1.0 - sum(a), 0.0))
            b.append(max(1.0 - sum(b), 0.0))
        return labels, a, b
    return None


def statistics_section(a, b, a_name: str, b_name: str, heading: str, anchor: str = "distributions"):
    """Per-feature distributions (inline SVG bars) and missing rates of two datasets' statistics
    (DatasetFeatureStatistics), e.g. train vs eval, or served traffic vs training."""
    from pipelines import pages

    by_name_b = {_feature_name(f): f for f in b.features}
    rows, plots = [], []
    for feature in sorted(a.features, key=_feature_name):
        name = _feature_name(feature)
        other = by_name_b.get(name)
        rows.append([name, feature.WhichOneof("stats").replace("_stats", ""), missing_rate(feature, a.num_examples),
                     missing_rate(other, b.num_examples) if other is not None else None])
        shown = distribution(feature, other)
        if shown and shown[0]:
            labels, share_a, share_b = shown
            plots.append(pages.bars(name, labels, {a_name: share_a, b_name: share_b}, y_label="share of values"))
    missing_head = ["feature", "type", f"missing in {a_name}", f"missing in {b_name}"]
    return pages.section(
        heading,
        pages.paragraph(f"{a_name}: {a.num_examples} examples; {b_name}: {b.num_examples} examples."),
        pages.section("Missing values", pages.table(missing_head, rows), level=3),
        pages.section("Distributions", pages.paragraph(
            f"Share of the present values per bucket (numbers) or value (strings: {a_name}'s most frequent)."),
            pages.plots(*plots), level=3),
        anchor=anchor)


def read_anomalies(anomalies_uri: Optional[str], split: str) -> List[Dict[str, str]]:
    """[{"feature", "reason", "description"}] of ExampleValidator's anomalies for one split."""
    from tensorflow_metadata.proto.v0 import anomalies_pb2

    path = os.path.join(anomalies_uri or "", f"Split-{split}", "SchemaDiff.pb")
    if not anomalies_uri or not os.path.exists(path):
        return []
    anomalies = anomalies_pb2.Anomalies()
    with open(path, "rb") as f:
        anomalies.ParseFromString(f.read())
    found = []
    for feature, info in sorted(anomalies.anomaly_info.items()):
        for reason in info.reason or [info]:
            found.append({"feature": feature, "reason": reason.short_description or info.short_description,
                          "description": reason.description or info.description})
    for reason in anomalies.dataset_anomaly_info.reason:
        found.append({"feature": "(dataset)", "reason": reason.short_description, "description": reason.description})
    return found


def span_drift_section(drift: Dict[str, Any]):
    """span_drift's measurements: per feature and split, TFDV's comparator, the distance, the spec's
    bound and whether the gate found it drifted (flagged)."""
    from pipelines import pages

    if drift["previous_span"] is None:
        return pages.section("Span to span drift", f"Span {drift['span']} is the first: no previous span to "
                             "compare with.", anchor="span-drift")
    found = drift["measurements"]
    rows = [[m["feature"], m["split"], m["comparator"], m["value"], m["threshold"],
             "DRIFTED" if m["drifted"] else "within bound"] for m in found]
    rows += [[n["feature"], n["split"], "", "", "", f"not judged: {n['why']}"] for n in drift.get("not_judged", [])]
    return pages.section(
        "Span to span drift", f"Span {drift['span']} against span {drift['previous_span']} (TFDV's drift "
        "comparators; bounds from the spec's monitoring.span_drift). A drifted feature stops the run at the data "
        "gate.",
        pages.table(["feature", "split", "comparator", "distance", "bound", "verdict"], rows,
                    flagged=[m["drifted"] for m in found] + [False] * (len(rows) - len(found))) if rows else
        "No feature has a span-to-span bound (the spec sets no monitoring.span_drift).", anchor="span-drift")


def _data_html(summary: Dict[str, Any], stats_uri: str, anomalies_uri: Optional[str], path: str) -> str:
    from pipelines import pages

    train = load_statistics(os.path.join(stats_uri, "Split-train", "FeatureStats.pb"))
    evaluation = load_statistics(os.path.join(stats_uri, "Split-eval", "FeatureStats.pb"))
    parts = [statistics_section(train, evaluation, "train", "eval", "Distributions: train vs eval")]
    if summary.get("span_drift"):
        parts.append(span_drift_section(summary["span_drift"]))
    for split in ("train", "eval"):
        found = read_anomalies(anomalies_uri, split)
        parts.append(pages.section(
            f"Anomalies ({split})",
            pages.table(["feature", "reason", "description"], [[a["feature"], a["reason"], a["description"]]
                                                              for a in found]) if found else "No anomalies found.",
            anchor=f"anomalies-{split}"))
    return pages.write(path, f"Data report: {summary['pipeline_name']}", *parts,
                       subtitle=f"data: {summary['data_path']}; statistics: {stats_uri}")


# --- evaluation report -----------------------------------------------------------------------

def thresholds_section(summary: Dict[str, Any]):
    """The thresholds table (metric, bound, value, verdict) and the blessing it led to."""
    from pipelines import pages

    verdicts = summary.get("thresholds", [])
    failed = [v for v in verdicts if v["passed"] is False]
    if summary["blessed"]:
        headline = "Blessed: every threshold passed."
    elif failed:
        headline = "Not blessed: " + "; ".join(describe_verdict(v) for v in failed) + "."
    else:
        headline = "Not blessed."
    rows = [[v["name"], {"lower": "value ≥", "upper": "value ≤", "change": "change vs baseline ≥"}[v["kind"]],
             v["bound"], "no baseline" if v["kind"] == "change" and v["value"] is None else v["value"],
             pages.verdict(v["passed"]), v["note"]] for v in verdicts]
    return pages.section("Thresholds", headline,
                         pages.table(["metric", "bound", "limit", "value", "verdict", "note"], rows, row_headers=False,
                                     flagged=[v["passed"] is False for v in verdicts])
                         if rows else "The spec sets no thresholds.", anchor="thresholds")


def _metric_table(evaluated: Dict[str, Any]):
    from pipelines import pages

    names = []
    for e in evaluated["slices"].values():
        names += [n for n in e["metrics"] if n not in names and n != "example_count"]
    rows = []
    for slice_name, e in evaluated["slices"].items():
        cells = [slice_name, e["examples"]]
        for n in names:
            lower, upper = e["intervals"].get(n, (None, None))
            value = e["metrics"].get(n)
            cells.append(pages.interval(value, lower, upper) if n in e["metrics"] else "")
        rows.append(cells)
    return pages.table(["slice", "examples"] + names, rows)


def _baseline_section(evaluated: Dict[str, Any]) -> List[Any]:
    """Per slice and metric: the candidate's value, the baseline model's and TFMA's difference."""
    from pipelines import pages

    compared = versus_baseline(evaluated)
    if not compared:
        return []
    rows = [[slice_name, metric, v["candidate"], v["baseline"], v["difference"]]
            for slice_name, metrics in compared.items() for metric, v in metrics.items()]
    return [pages.section(
        "Candidate vs baseline by slice", "The baseline is the model the Evaluator compared the candidate with "
        "(the facts above); difference = candidate − baseline, as TFMA computes it. \"not defined\": a metric "
        "the slice cannot define.",
        pages.table(["slice", "metric", "candidate", "baseline", "difference"], rows), anchor="baseline")]


def _plot_sections(evaluated: Dict[str, Any], spec: FeatureSpec) -> List[Any]:
    from pipelines import pages

    overall = evaluated["slices"].get("Overall", {}).get("plots", {})
    if not overall:
        return []
    classes = list(spec.label.classes)

    def title(group: str) -> str:
        if not group:
            return ""
        index = int(group.split("_")[-1])
        return f" ({classes[index] if index < len(classes) else group} vs rest)"

    svgs = []
    for group, p in sorted(overall.items()):
        if p.get("roc"):
            svgs.append(pages.lines(f"ROC{title(group)}", {"model": p["roc"]}, "false positive rate",
                                    "true positive rate", diagonal=True))
        if p.get("precision_recall"):
            svgs.append(pages.lines(f"Precision-recall{title(group)}", {"model": p["precision_recall"]},
                                    "recall", "precision"))
        if p.get("calibration"):
            svgs.append(pages.lines(f"Calibration{title(group)}", {"model": [(x, y) for x, y, _ in p["calibration"]]},
                                    "mean prediction", "observed rate", diagonal=True))
    return [pages.section("Plots (Overall)", pages.plots(*svgs), anchor="plots")]


def _evaluation_html(summary: Dict[str, Any], spec: FeatureSpec, evaluated: Dict[str, Any], path: str) -> str:
    from pipelines import pages

    facts = pages.definitions([("blessed", str(summary["blessed"])), ("pushed", str(summary["pushed"])),
                               ("version", summary["model_version"] or "not pushed"),
                               ("baseline", summary["baseline_model"] or "none (no other blessed model to compare with)")])
    metrics = pages.section(
        "Metrics by slice", "Slices from the largest. In brackets: 95% confidence intervals (Wilson's for "
        "accuracy, precision and recall; Hanley and McNeil's for AUC). \"not defined\": a metric the slice "
        "cannot define (e.g. AUC with one class present).",
        _metric_table(evaluated), anchor="metrics")
    return pages.write(path, f"Evaluation of {summary['pipeline_name']}", facts, thresholds_section(summary),
                       metrics, *_baseline_section(evaluated), *_plot_sections(evaluated, spec),
                       subtitle=f"evaluation: {summary['artifacts']['evaluation']}")
