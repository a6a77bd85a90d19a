"""`make review VERSION=n`: the page a person reads before promoting a pushed version.

    python -m ops.review --version N [--model taxi] [--label stable] [--spec configs/taxi.yaml]
        [--model_repository build/model_repository] [--metadata build/metadata/<model>.sqlite]
        [--ab_report build/ab_report.json] [--parity build/parity.json] [--out_dir build/reports]

It puts the candidate beside the version the label (`stable`) points at in models.config, or says
there is none yet, and writes build/reports/review_<model>_v<n>.html (self-contained, through
pipelines/pages.py) with the figures as JSON beside it:

  metrics      overall and per slice, each version's Evaluator output (found by lineage from the
               pushed model, read by pipelines/report.py) with its confidence intervals; candidate
               minus stable (each on its own run's eval split) and the Evaluator's own candidate
               minus baseline on the candidate's rows (like for like)
  blessing     every threshold's value, bound and verdict, the baseline the Evaluator compared
               with, and the sandbox's verdict
  A/B          the A/B report (`make ab-report` writes build/ab_report.json) when one of its variants
               was answered by the candidate
  drift        the candidate's training statistics against the stable's, with TFDV's drift
               comparators and the monitor's drift bounds (components/spans.py)
  parity       `make parity VERSION=n` (build/parity.json) when it checked the candidate
  sandbox      each version's latency and throughput as measured before its push
  lineage      data, its fingerprint, schema, transform graph, model, code commit
  warmup       the version folder's warmup file: present, records
  promote      the exact command to run

Every ML Metadata query goes through pipelines/mlmd.py; models.config through serving/model_config.py.
Exit codes: 0 written, 2 input error (the message names the version, file or flag at fault).
"""

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional

from ops.release import read_log
from pipelines import mlmd
from serving import model_config

INPUT_ERROR_EXIT = 2


class ReviewError(RuntimeError):
    """The review cannot be made; the message names the version, file or flag at fault and the fix."""


# --- one version ----------------------------------------------------------------------------------

def warmup(version_dir: str) -> Dict[str, Any]:
    """The version's warmup file (TF Serving replays it before serving): present, and its records."""
    from serving.repository import MAX_WARMUP_RECORDS, WARMUP_FILE  # imports TensorFlow

    path = os.path.join(version_dir, WARMUP_FILE)
    if not os.path.exists(path):
        return {"path": path, "present": False, "records": 0, "max_records": MAX_WARMUP_RECORDS}
    import tensorflow as tf

    records = sum(1 for _ in tf.data.TFRecordDataset(path))
    return {"path": path, "present": True, "records": records, "max_records": MAX_WARMUP_RECORDS}


def evaluation_facts(evaluation_uri: str, spec) -> Dict[str, Any]:
    """An Evaluator output as the review shows it (pipelines/report.py reads it): {slice: {metric:
    {value, lower, upper}}} (bounds None without a confidence interval), the changes the Evaluator
    measured against its baseline on the same rows, and the verdict per threshold."""
    from pipelines.report import read_evaluation, threshold_verdicts

    evaluation = read_evaluation(evaluation_uri)
    metrics = {name: {m: {"value": v, "lower": e["intervals"].get(m, [None, None])[0],
                          "upper": e["intervals"].get(m, [None, None])[1]} for m, v in e["metrics"].items()}
               for name, e in evaluation["slices"].items()}
    diffs = {name: e["diffs"] for name, e in evaluation["slices"].items() if e["diffs"]}
    validation = evaluation["validation"]
    return {"metrics": metrics, "diffs": diffs,
            "blessing": {"blessed": validation["ok"], "failures": validation["failures"],
                         "verdicts": threshold_verdicts(spec, evaluation)}}


def version_facts(store, model_repository: str, model: str, version: int, spec) -> Dict[str, Any]:
    """What one pushed version is, from ML Metadata (lineage) and its version folder."""
    from pipelines.report import sandbox_result

    try:
        evidence = mlmd.lineage_in(store, model, version)
    except mlmd.MetadataError as e:
        pushed = model_config.complete_versions(os.path.join(model_repository, model))
        raise ReviewError(f"{e} (pushed versions of '{model}': {', '.join(map(str, pushed)) or 'none'}; "
                          "a version the pipeline did not push after both blessings cannot be reviewed)") from None
    return {
        "version": version,
        "lineage": evidence,
        **evaluation_facts(evidence["evaluation"], spec),
        "sandbox": sandbox_result(evidence["sandbox"]) if evidence["sandbox"] else None,
        "warmup": warmup(model_config.version_path(os.path.join(model_repository, model), version)),
        "training_statistics": mlmd.statistics_for_examples(store, evidence["examples"]).uri,
    }


# --- the two side by side -----------------------------------------------------------------------

def compare_metrics(candidate: Dict[str, Dict[str, Dict]], stable: Optional[Dict[str, Dict[str, Dict]]],
                    evaluator_diffs: Optional[Dict[str, Dict[str, Optional[float]]]] = None) -> List[Dict]:
    """One row per slice and metric: both values with their intervals, candidate - stable (each on
    its own eval rows) and the Evaluator's candidate - baseline on the candidate's rows. Overall
    first, then slices by the candidate's example count, largest first."""
    stable, evaluator_diffs = stable or {}, evaluator_diffs or {}

    def size(name: str) -> float:
        return (candidate.get(name) or stable.get(name) or {}).get("example_count", {}).get("value") or 0

    slices = sorted(set(candidate) | set(stable), key=lambda s: (s != "Overall", -size(s), s))
    rows = []
    for name in slices:
        for metric in sorted(set(candidate.get(name, {})) | set(stable.get(name, {}))):
            c, s = candidate.get(name, {}).get(metric), stable.get(name, {}).get(metric)
            both = c is not None and s is not None and c["value"] is not None and s["value"] is not None
            rows.append({"slice": name, "metric": metric, "candidate": c, "stable": s,
                         "delta": c["value"] - s["value"] if both else None,
                         "evaluator_diff": evaluator_diffs.get(name, {}).get(metric)})
    return rows


def training_drift(candidate: Dict[str, Any], stable: Dict[str, Any], spec) -> Dict[str, Any]:
    """The candidate's training split against the stable's, with TFDV's drift comparators
    (components/spans.py, as the data gate compares spans) and the monitor's drift bounds."""
    from tfx.utils import io_utils

    from components.spans import drift_measurements
    from ops.monitor import load_statistics_file, load_thresholds

    def train_split(uri: str):
        return load_statistics_file(os.path.join(uri, "Split-train", "FeatureStats.pb"))

    schema_uri = candidate["lineage"]["schema"]
    schema = io_utils.SchemaReader().read(io_utils.get_only_uri_in_dir(schema_uri))
    bounds = load_thresholds(spec)["drift"]
    same = candidate["lineage"]["examples"] == stable["lineage"]["examples"]
    measurements = drift_measurements(train_split(candidate["training_statistics"]),
                                      train_split(stable["training_statistics"]), schema, bounds)
    return {"same_examples": same, "bounds": bounds, "features": measurements,
            "drifted": [m["feature"] for m in measurements if m["drifted"]]}


def ab_evidence(path: str, model: str, version: int) -> Dict[str, Any]:
    """The A/B report at `path` when a variant of it was answered by this version."""
    if not os.path.exists(path):
        return {"path": path, "found": False, "note": f"no A/B report at {path} (make ab-report LABELS=file writes one)"}
    try:
        with open(path) as f:
            report = json.load(f)
        variants = report["variants"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ReviewError(f"--ab_report {path}: not an A/B report written by `make ab-report` ({e}); "
                          "rerun make ab-report or pass another --ab_report") from None
    answered = {name for name, v in variants.items() if str(version) in v.get("model_versions", {})}
    if report.get("model") not in (None, model) or not answered:
        seen = sorted({f"{n}: {', '.join(v.get('model_versions', {})) or 'none'}" for n, v in variants.items()})
        return {"path": path, "found": False,
                "note": f"{path} is not about version {version} of '{model}' (model '{report.get('model')}', "
                        f"versions per variant: {'; '.join(seen) or 'none'})"}
    return {"path": path, "found": True, "candidate_variants": sorted(answered), "report": report}


def parity_evidence(path: str, model: str, version: int) -> Dict[str, Any]:
    """The parity report at `path` when it checked this version."""
    hint = f"make parity VERSION={version} writes it to build/parity.json"
    if not os.path.exists(path):
        return {"path": path, "found": False, "note": f"no parity report at {path} ({hint})"}
    try:
        with open(path) as f:
            report = json.load(f)
        checked = (report["model"], int(report["version"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ReviewError(f"--parity {path}: not a report of `make parity` ({e}); {hint}") from None
    if checked != (model, version):
        return {"path": path, "found": False,
                "note": f"{path} checked version {checked[1]} of '{checked[0]}', not version {version} ({hint})"}
    return {"path": path, "found": True, "report": report}


def promote_command(model: str, version: int, label: str) -> str:
    if model == "taxi":  # the Makefile's promote target acts on the default model
        return f"make promote VERSION={version} LABEL={label}"
    return f"python -m ops.release promote --model {model} --version {version} --label {label}"


def gather(model: str, version: int, spec, model_repository: str = "build/model_repository",
           metadata: Optional[str] = None, label: str = "stable", ab_report: str = "build/ab_report.json",
           parity: str = "build/parity.json") -> Dict[str, Any]:
    """Everything the review page shows, as plain data."""
    metadata = metadata or f"build/metadata/{model}.sqlite"
    try:
        store = mlmd.connect(metadata)
    except mlmd.MetadataError as e:
        raise ReviewError(f"--metadata: {e}") from None
    try:
        labels = model_config.repository_labels(model_repository, model)
    except model_config.ConfigError as e:
        raise ReviewError(str(e)) from None
    candidate = version_facts(store, model_repository, model, version, spec)
    from components.evaluation import threshold_metric_names  # imports TensorFlow: after the cheap checks

    stable_version = labels.get(label)
    stable = (version_facts(store, model_repository, model, stable_version, spec)
              if stable_version is not None and stable_version != version else None)
    baseline = candidate["lineage"]["baseline_model"]
    released = [e for e in read_log(os.path.join(model_repository, model))
                if e["label"] == label and e["version"] == stable_version]
    return {
        "model": model, "label": label, "labels": labels,
        "candidate": candidate,
        "stable": stable,
        "stable_version": stable_version,
        "stable_release": {k: released[-1].get(k) for k in ("action", "who", "when")} if released else None,
        "already_labelled": stable_version == version,
        "baseline_is_stable": bool(stable and baseline == stable["lineage"]["model"]),
        "metrics": compare_metrics(candidate["metrics"], stable["metrics"] if stable else None, candidate["diffs"]),
        "gated_metrics": sorted(threshold_metric_names(spec).values()),
        "drift": training_drift(candidate, stable, spec) if stable else None,
        "ab": ab_evidence(ab_report, model, version),
        "parity": parity_evidence(parity, model, version),
        "promote_command": promote_command(model, version, label),
    }


# --- the page -------------------------------------------------------------------------------------

def _delta(value: Optional[float]) -> str:
    return "" if value is None else f"{value:+.4f}"


def _bounds(entry: Optional[Dict[str, Optional[float]]], count: bool = False):
    from pipelines import pages

    if entry is None:
        return pages.NOT_DEFINED
    if count and entry["value"] is not None:
        return pages.number(int(entry["value"]))
    return pages.interval(entry["value"], entry["lower"], entry["upper"])


def _summary_section(data: Dict[str, Any]):
    from pipelines import pages

    candidate, stable = data["candidate"], data["stable"]
    version = candidate["version"]
    if data["already_labelled"]:
        against = f"version {version} already carries the label '{data['label']}': nothing to compare it with"
    elif stable is None:
        against = (f"no version is labelled '{data['label']}' yet: this would be the first release, and the "
                   "figures below are the candidate's alone")
    else:
        against = f"version {stable['version']}, labelled '{data['label']}' in models.config"
        if data["stable_release"]:
            against += " ({action} by {who}, {when})".format(**data["stable_release"])
    sandbox = candidate["sandbox"]
    drift = data["drift"]
    facts = [
        ("candidate", f"version {version}"),
        (f"compared with ({data['label']})", against),
        ("Evaluator", pages.verdict(candidate["blessing"]["blessed"])),
        ("sandbox", pages.verdict(sandbox["blessed"]) if sandbox else "no sandbox report"),
        ("A/B", data["ab"]["report"]["decision"]["outcome"] if data["ab"]["found"] else data["ab"]["note"]),
        ("training data drift", "not compared (no stable version)" if drift is None else
         f"{len(drift['drifted'])} of {len(drift['features'])} features past their bound"
         + (f": {', '.join(drift['drifted'])}" if drift["drifted"] else "")),
        ("parity", _parity_line(data["parity"])),
        ("promote", pages.code(data["promote_command"])),
    ]
    return pages.section("Summary", pages.definitions(facts), anchor="summary")


def _parity_line(parity: Dict[str, Any]) -> str:
    if not parity["found"]:
        return parity["note"]
    report = parity["report"]
    over = sum(p["rows_over_tolerance"] for p in report["paths"].values())
    return (f"{over} rows over {report['tolerance']:g} on {len(report['paths'])} paths, {report['rows']} rows, "
            f"{report['training_path_unmatched_rows']} unmatched")


def _metric_rows(data: Dict[str, Any], rows: List[Dict], with_slice: bool) -> List[List[Any]]:
    out = []
    for row in rows:
        count = row["metric"] == "example_count"  # a count, not a fraction
        cells = ([row["slice"]] if with_slice else []) + [row["metric"], _bounds(row["candidate"], count)]
        if data["stable"]:
            cells += [_bounds(row["stable"], count), f"{row['delta']:+.0f}" if count and row["delta"] is not None
                      else _delta(row["delta"])]
        if _has_evaluator_diffs(data):
            cells.append(_delta(row["evaluator_diff"]))
        out.append(cells)
    return out


def _has_evaluator_diffs(data: Dict[str, Any]) -> bool:
    return any(r["evaluator_diff"] is not None for r in data["metrics"])


def _metrics_section(data: Dict[str, Any]):
    """Overall: every metric. Per slice: the metrics the thresholds gate, and the example count."""
    from pipelines import pages

    stable = data["stable"]
    versions = [f"candidate v{data['candidate']['version']}"]
    versions += [f"{data['label']} v{stable['version']}", "delta"] if stable else []
    versions += ["Evaluator: vs its baseline, same rows"] if _has_evaluator_diffs(data) else []
    overall = [r for r in data["metrics"] if r["slice"] == "Overall"]
    gated = set(data["gated_metrics"]) | {"example_count"}
    slices = [r for r in data["metrics"] if r["slice"] != "Overall" and r["metric"] in gated]
    intervals = any(r["candidate"] and r["candidate"]["lower"] is not None for r in data["metrics"])
    note = ("Values with their confidence intervals [lower, upper] as the Evaluator output gives them." if intervals
            else "The Evaluator output gives no confidence intervals.")
    note += " Delta is candidate minus stable." if stable else ""
    note += (" Each version was evaluated on its own run's eval split; the last column is the Evaluator's "
             "candidate minus its baseline model on the candidate's eval rows (the like-for-like comparison"
             + (", and the baseline is the stable version)." if data["baseline_is_stable"] else ").")
             if _has_evaluator_diffs(data) else "")
    return pages.section(
        "Metrics, overall and per slice", note, _slice_plots(data, slices),
        pages.table(["metric"] + versions, _metric_rows(data, overall, with_slice=False), caption="Overall"),
        pages.table(["slice", "metric"] + versions, _metric_rows(data, slices, with_slice=True),
                    caption=f"Per slice, largest first: {', '.join(sorted(gated))}"),
        anchor="metrics")


def _slice_plots(data: Dict[str, Any], rows: List[Dict], most: int = 10):
    """Bars per gated metric: the largest slices where the candidate defines it, both versions."""
    from pipelines import pages

    series = {"candidate": "candidate", **({data["label"]: "stable"} if data["stable"] else {})}
    svgs = []
    for metric in data["gated_metrics"]:
        defined = [r for r in rows if r["metric"] == metric and r["candidate"] and r["candidate"]["value"] is not None]
        defined = defined[:most]
        if defined:
            svgs.append(pages.bars(f"{metric} per slice", [r["slice"] for r in defined],
                                   {name: [(r[role] or {}).get("value") for r in defined] for name, role in series.items()},
                                   y_label=metric))
    return pages.plots(*svgs)


def _blessing_section(data: Dict[str, Any]):
    from pipelines import pages
    from pipelines.report import describe_verdict

    rows = []
    for role, facts in (("candidate", data["candidate"]), (data["label"], data["stable"])):
        if facts is None:
            continue
        name, sandbox = f"v{facts['version']} ({role})", facts["sandbox"]
        for v in facts["blessing"]["verdicts"]:
            rows.append([name, "Evaluator", describe_verdict(v), pages.verdict(v["passed"])])
        rows.append([name, "Evaluator", f"validation result of {facts['lineage']['evaluation']}",
                     pages.verdict(facts["blessing"]["blessed"])])
        if sandbox:
            rows.append([name, "sandbox", "; ".join(sandbox["reasons"]) or "every sandbox threshold met",
                         pages.verdict(sandbox["blessed"])])
    baseline = data["candidate"]["lineage"]["baseline_model"]
    if data["baseline_is_stable"]:
        said = "The Evaluator judged the candidate's change thresholds against the stable version's model."
    elif baseline is None:
        said = "The Evaluator had no baseline model (no earlier blessed model): change thresholds were not checked."
    else:
        said = f"The Evaluator's baseline was {baseline}, not the stable version's model."
    return pages.section("Why blessed", said, pages.table(["version", "by", "threshold", "verdict"], rows),
                         anchor="blessing")


def _ab_section(data: Dict[str, Any]):
    from pipelines import pages

    ab = data["ab"]
    if not ab["found"]:
        return pages.section("A/B report", ab["note"], anchor="ab")
    report = ab["report"]
    decision, comparison = report["decision"], report["comparison"]
    rows = [[c["metric"], c.get("a"), c.get("b"),
             pages.interval(c.get("estimate"), c.get("ci_low"), c.get("ci_high")) if "estimate" in c
             else c.get("not_testable", ""), "" if c.get("p_value") is None else f"{c['p_value']:.3g}"]
            for c in comparison["metrics"]]
    return pages.section(
        "A/B report",
        f"{ab['path']}: A = '{report['a']}', B = '{report['b']}', {report['window']['text']}; the candidate "
        f"answered as {', '.join(ab['candidate_variants'])}.",
        pages.definitions([("decision", decision["outcome"]), ("reasons", "; ".join(decision["reasons"]) or "none")]),
        pages.table(["metric", "A", "B", "B - A [CI]", "p-value"], rows), anchor="ab")


def _drift_section(data: Dict[str, Any]):
    from pipelines import pages

    drift = data["drift"]
    if drift is None:
        return pages.section("Drift between the training data", "Not compared: there is no stable version.",
                             anchor="drift")
    rows = [[m["feature"], m["comparator"], m["value"], m["threshold"], pages.verdict(not m["drifted"])]
            for m in drift["features"]]
    same = " Both versions were trained on the same examples." if drift["same_examples"] else ""
    return pages.section(
        "Drift between the training data",
        "The candidate's training split against the stable's: TFDV's drift comparators, as the data gate compares "
        "spans, with the monitor's drift bounds (the spec's monitoring.drift, else the monitor's defaults)."
        f"{same}", pages.table(["feature", "comparator", "distance", "bound", "within bound"], rows),
        anchor="drift")


def _parity_section(data: Dict[str, Any]):
    from pipelines import pages

    parity = data["parity"]
    if not parity["found"]:
        return pages.section("Parity", parity["note"], anchor="parity")
    report = parity["report"]
    # Differences of 1e-7 are the point of the report: in 4 decimals they would all read 0.0000.
    rows = [[name, None if p["max_abs_diff"] is None else f"{p['max_abs_diff']:.2e}", p["rows_over_tolerance"]]
            for name, p in report["paths"].items()]
    parts = [_parity_line(parity), pages.table(["path vs training path", "max |diff|", "rows over tolerance"], rows)]
    metrics = report.get("metrics")
    if metrics:
        online, offline = metrics["online_from_rest"], metrics["offline_evaluator"]
        parts.append(pages.table(["metric", "online (REST)", "offline (Evaluator)"],
                                 [[k, online[k], offline.get(k)] for k in online]))
    return pages.section("Parity", *parts, anchor="parity")


def _side_by_side(data: Dict[str, Any], title: str, anchor: str, items):
    """A table of figures, one column per version: items are (name, function of a version's facts)."""
    from pipelines import pages

    versions = [(f"candidate v{data['candidate']['version']}", data["candidate"])]
    if data["stable"]:
        versions.append((f"{data['label']} v{data['stable']['version']}", data["stable"]))
    rows = [[name] + [get(facts) for _, facts in versions] for name, get in items]
    return pages.section(title, pages.table([""] + [v for v, _ in versions], rows), anchor=anchor)


def _sandbox(key: str):
    return lambda facts: (facts["sandbox"] or {}).get(key)


def render(data: Dict[str, Any]) -> str:
    from pipelines import pages

    import time

    version = data["candidate"]["version"]
    stable = data["stable"]
    subtitle = (f"candidate version {version} beside version {stable['version']} ({data['label']})" if stable
                else f"candidate version {version}; no version is labelled '{data['label']}' yet")
    lineage = [("data", lambda f: f["lineage"]["data"]), ("data fingerprint", lambda f: f["lineage"]["data_fingerprint"]),
               ("examples", lambda f: f["lineage"]["examples"]), ("schema", lambda f: f["lineage"]["schema"]),
               ("transform graph", lambda f: f["lineage"]["transform_graph"]),
               ("model", lambda f: f["lineage"]["model"]),
               ("code commit", lambda f: f["lineage"]["code_commit"] or "not recorded"),
               ("pushed at", lambda f: time.strftime("%Y-%m-%d %H:%M:%SZ",
                                                     time.gmtime(f["lineage"]["pushed_at_ms"] / 1000)))]
    sandbox = [("p50 latency (ms)", _sandbox("p50_ms")), ("p99 latency (ms)", _sandbox("p99_ms")),
               ("throughput (requests/s)", _sandbox("requests_per_second")),
               ("rows compared", _sandbox("rows_compared")), ("rows differing", _sandbox("rows_differing"))]
    warm = [("warmup file", lambda f: "present" if f["warmup"]["present"] else "absent"),
            ("records", lambda f: f["warmup"]["records"]),
            ("most TF Serving reads", lambda f: f["warmup"]["max_records"]),
            ("path", lambda f: f["warmup"]["path"])]
    return pages.document(
        f"Release review: {data['model']} version {version}",
        _summary_section(data), _metrics_section(data), _blessing_section(data), _ab_section(data),
        _drift_section(data), _parity_section(data),
        _side_by_side(data, "Sandbox latency and throughput (measured before each push)", "sandbox", sandbox),
        _side_by_side(data, "Lineage", "lineage", lineage),
        _side_by_side(data, "Warmup", "warmup", warm),
        pages.section("Promote", "After reading this page, to release the candidate:",
                      pages.code(data["promote_command"]), anchor="promote"),
        subtitle=subtitle)


def page_path(out_dir: str, model: str, version: int) -> str:
    return os.path.join(out_dir, f"review_{model}_v{version}.html")


def write(data: Dict[str, Any], out_dir: str) -> Dict[str, str]:
    """Writes the page and the figures beside it as JSON; returns both paths."""
    os.makedirs(out_dir, exist_ok=True)
    html_path = page_path(out_dir, data["model"], data["candidate"]["version"])
    with open(html_path, "w", encoding="utf-8") as f:
        f.write(render(data))
    json_path = html_path[:-len(".html")] + ".json"
    with open(json_path, "w") as f:
        json.dump(data, f, indent=2, default=str)
    return {"html": html_path, "json": json_path}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--version", type=int, required=True, help="the pushed version to review")
    parser.add_argument("--model", default="taxi")
    parser.add_argument("--label", default="stable", help="the label the candidate would take (default: stable)")
    parser.add_argument("--spec", default="configs/taxi.yaml", help="the dataset spec (its monitoring.drift bounds)")
    parser.add_argument("--model_repository", default="build/model_repository")
    parser.add_argument("--metadata", help="ML Metadata SQLite file (default: build/metadata/<model>.sqlite)")
    parser.add_argument("--ab_report", default="build/ab_report.json", help="the JSON `make ab-report` writes")
    parser.add_argument("--parity", default="build/parity.json", help="the JSON `make parity` writes")
    parser.add_argument("--out_dir", default="build/reports")
    args = parser.parse_args(argv)
    from components import feature_spec

    try:
        spec = feature_spec.load(args.spec)
        data = gather(args.model, args.version, spec, args.model_repository, args.metadata, args.label,
                      args.ab_report, args.parity)
    except (ReviewError, feature_spec.SpecError) as e:
        print(f"error: {e}", file=sys.stderr)
        return INPUT_ERROR_EXIT
    paths = write(data, args.out_dir)
    stable = data["stable"]
    print(f"review of {args.model} version {args.version} beside "
          + (f"version {stable['version']} ({args.label})" if stable else f"no '{args.label}' version (none yet)")
          + f": {paths['html']}")
    print(f"to release it: {data['promote_command']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
