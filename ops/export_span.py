"""Served traffic becomes a span: a window of the prediction log joined with the ground truth that
arrived later, written in the spec's raw CSV format, ready for the pipeline as new data.

    python -m ops.export_span --log build/prediction_log.sqlite --labels labels.csv \
        --spans build/spans [--spec configs/taxi.yaml] [--model taxi] [--window_hours 24 | --start T --end T]

What goes in: answers the proxy served (status 200, :predict), one CSV row per request row. Left
out, and counted: shadow answers (never served), fallback answers (the switch was off: the model
did not decide), rows with no label yet, and a client's retry (the same client X-Request-Id and
row, answered again: the first is kept). Held-back answers are kept: they are the unbiased part.

The ground truth (CSV or JSON lines with request_id, label[, row], read and joined as the A/B
report does: the proxy's id or the client's X-Request-Id) holds the raw value of the spec's label
column: `label.column`, or for a derived label its `derive.column` (taxi: `tips`); the other
columns come from the request as it was served. A missing value is an empty cell, as in the raw
CSVs: NaN and "" (the one wire form of a missing value) both become empty.

The span folder (`<spans>/span-<n>/`, n one more than the newest there unless --span):
    data.csv          the spec's columns (its schema's, in the schema's order: the training CSV's),
                      one row per served row; with the spec's `served` block also its policy and
                      propensity columns. Taken from the spec, not from data on disk, so the first
                      span of an empty folder is written as the next ones are
    served.jsonl      per row, aligned with data.csv: request_id, row, model_version, variant,
                      policy, propensity (1 / propensity is the row's inverse-propensity weight);
                      JSON lines, not CSV, so a spec reading every *.csv of span-{SPAN}/ reads data.csv only
    provenance.json   window, log, labels, counts (rows, left out by reason), versions, variants, policies
With --metadata, the span is also recorded in ML Metadata (an artifact of type ServedSpan with the
provenance as custom properties), next to the runs that will train on it.
"""

import argparse
import collections
import csv
import json
import math
import os
import re
import sys
import time
from typing import Any, Dict, List, Optional

from components import feature_spec
from ops import ab_report
from ops.ab import report as ab
from pipelines import mlmd
from serving import logstore

SPAN = re.compile(r"^span-(\d+)$")
SERVED_ROWS = "served.jsonl"  # beside data.csv; not *.csv, which a span-{SPAN}/ data.path reads


class ExportError(ValueError):
    """The export cannot be made; the message names the input and the fix."""


def raw_header(spec: feature_spec.FeatureSpec) -> List[str]:
    """The span's columns, from the spec alone, so the first span of an empty spans folder can be
    written: the features of the spec's schema in the schema's order (the schema describes every
    column the data holds and each span is validated against it; TFDV infers it in the CSV's column
    order), then any declared column it lacks; without a schema, the spec's declared columns. With
    `served:`, a schema that does not list its two columns is refused: the span would fail validation."""
    columns = list(spec.columns)
    if not spec.schema_path:
        return columns
    from google.protobuf import text_format
    from tensorflow_metadata.proto.v0 import schema_pb2

    try:
        with open(spec.schema_path) as f:
            schema = text_format.Parse(f.read(), schema_pb2.Schema())
    except OSError as e:
        raise ExportError(f"{spec.source}: schema: cannot read {spec.schema_path} ({e.strerror}): the span's "
                          "columns are the schema's; write it with make schema or leave `schema` out") from None
    except text_format.ParseError as e:
        raise ExportError(f"{spec.schema_path}: not a text Schema proto ({e})") from None
    header = [feature.name for feature in schema.feature]
    unlisted = [c for c in ((spec.served.policy_column, spec.served.propensity_column) if spec.served else ())
                if c not in header]
    if unlisted:  # TFDV reports each as "New column", and the data gate stops the run on it
        raise ExportError(
            f"{spec.schema_path}: the schema lacks {', '.join(unlisted)}, which the span's data.csv carries for "
            f"{spec.source}'s served: block, so the data gate would stop the run on TFDV's 'New column' anomaly. "
            f"List each in the schema as optional and absent at serving, e.g. feature {{ name: "
            f"\"{unlisted[0]}\" type: BYTES (FLOAT for the propensity) presence {{ min_count: 0 }} "
            "not_in_environment: \"SERVING\" } (ops/demo_drift.py write_schema writes such a copy of a schema), "
            "or leave served: out of the spec")
    return header + [c for c in columns if c not in header]


def span_folder(spans: str, number: int, spec: feature_spec.FeatureSpec) -> str:
    """<spans>/span-<number>, refused when the spec reads spans elsewhere: its next run would not see it."""
    folder = os.path.join(spans, f"span-{number}")
    if spec.has_spans:  # the folder data.path names up to its {SPAN} part (span-{SPAN}/ or span-{SPAN}/data.csv)
        parts = spec.data_path.split("/")
        first = next(i for i, part in enumerate(parts) if feature_spec.SPAN_TOKEN in part)
        read = "/".join(parts[:first + 1]).replace(feature_spec.SPAN_TOKEN, str(number))
        if os.path.abspath(read) != os.path.abspath(folder):
            raise ExportError(f"{spec.source}: data.path '{spec.data_path}' reads span {number} from {read}, not "
                              f"{folder}: pass --spans {os.path.dirname(read)} (make export-span SPANS=...), or a "
                              "spec whose data.path is <spans>/span-{SPAN}/")
    return folder


def label_column(spec: feature_spec.FeatureSpec) -> str:
    """The raw column the ground truth's `label` fills."""
    return spec.label.column or spec.label.derive["column"]


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return ""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, dict)):
        raise ExportError(f"a served value {value!r} is not a scalar: only one value per raw column fits a CSV cell")
    return str(value)


def next_span(spans: str) -> int:
    numbers = [int(m.group(1)) for m in (SPAN.match(n) for n in (os.listdir(spans) if os.path.isdir(spans) else []))
               if m]
    return max(numbers, default=0) + 1


def export(log: str, labels_path: str, spans: str, spec: feature_spec.FeatureSpec, model: Optional[str] = None,
           start: Optional[float] = None, end: Optional[float] = None, span: Optional[int] = None,
           metadata: Optional[str] = None) -> Dict[str, Any]:
    model = model or spec.name
    header, target = raw_header(spec), label_column(spec)
    # With spec `served`, training reads each row's policy and propensity from data.csv itself.
    served_columns = [c for c in ((spec.served.policy_column, spec.served.propensity_column) if spec.served else ())
                      if c not in header]
    header = header + served_columns
    try:
        records = [r for r in logstore.read_records(log, start, end, model, include_shadow=True)]
    except logstore.StoreError as e:
        raise ExportError(str(e)) from None
    left_out = collections.Counter()
    served = []
    for r in records:
        if r["shadow"]:
            left_out["shadow"] += 1
        elif r["variant"] == "fallback" or r.get("policy") == "fallback":
            left_out["fallback"] += 1
        elif r["status"] != 200 or r["api"] != "predict":
            left_out["not_a_served_prediction"] += 1
        else:
            served.append(r)
    labels = ab.by_proxy_id(ab.load_labels(labels_path), served)
    seen = set()
    rows, provenance_rows = [], []
    for r in served:
        for index, features in enumerate(logstore.instances(r["request"])):
            if r["client_request_id"] is not None:
                retry = (r["client_request_id"], index)
                if retry in seen:
                    left_out["client_retry"] += 1
                    continue
                seen.add(retry)
            label = labels.values.get((r["request_id"], index))
            if label is None:
                left_out["no_label"] += 1
                continue
            row = {**features, target: label[0]}
            if spec.served:
                row.update({spec.served.policy_column: r.get("policy"),
                            spec.served.propensity_column: r.get("propensity")})
            rows.append([_cell(row.get(c)) for c in header])
            provenance_rows.append([r["request_id"], index, r["model_version"], r["variant"], r.get("policy"),
                                    r.get("propensity")])
    if not rows:
        raise ExportError(f"no labelled served row in {logstore.masked_url(log)} for model '{model}' in the window "
                          f"({dict(left_out)} left out): widen the window or wait for more ground truth")
    number = span if span is not None else next_span(spans)
    folder = span_folder(spans, number, spec)
    if os.path.exists(folder):
        raise ExportError(f"{folder} exists: a span is written once; pass another --span or leave it out")
    os.makedirs(folder + ".tmp", exist_ok=False)
    with open(os.path.join(folder + ".tmp", "data.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    with open(os.path.join(folder + ".tmp", SERVED_ROWS), "w") as f:
        for p in provenance_rows:
            f.write(json.dumps(dict(zip(("request_id", "row", "model_version", "variant", "policy", "propensity"), p)))
                    + "\n")
    provenance = {
        "span": number, "model": model, "log": logstore.masked_url(log), "labels": os.path.abspath(labels_path),
        "window": {"start": start, "end": end}, "rows": len(rows), "left_out": dict(sorted(left_out.items())),
        "model_versions": _counts(p[2] for p in provenance_rows), "variants": _counts(p[3] for p in provenance_rows),
        "policies": _counts(p[4] for p in provenance_rows), "label_column": target, "written_at": time.time(),
    }
    with open(os.path.join(folder + ".tmp", "provenance.json"), "w") as f:
        json.dump(provenance, f, indent=2, sort_keys=True)
    os.replace(folder + ".tmp", folder)  # a span appears whole or not at all (ExampleGen may be watching)
    if metadata:
        provenance["mlmd_artifact_id"] = mlmd.record_artifact(
            metadata, "ServedSpan", folder, {k: v if isinstance(v, (int, str)) else json.dumps(v, sort_keys=True)
                                             for k, v in provenance.items() if v is not None})
    provenance["folder"] = folder
    return provenance


def _counts(values) -> Dict[str, int]:
    return dict(sorted(collections.Counter(str(v) for v in values).items()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--log", default="build/prediction_log.sqlite", help=f"the proxy's prediction log: {logstore.ACCEPTED_FORMS}")
    parser.add_argument("--labels", required=True, help="ground truth: CSV or JSON lines with request_id, label[, row]")
    parser.add_argument("--spans", default="build/spans", help="the folder of spans (span-<n>/ inside)")
    parser.add_argument("--spec", default="configs/taxi.yaml")
    parser.add_argument("--model", help="model name in the log (default: the spec's name)")
    parser.add_argument("--span", type=int, help="span number (default: one more than the newest)")
    parser.add_argument("--start", type=ab_report.parse_time, help="window start (unix seconds or ISO 8601)")
    parser.add_argument("--end", type=ab_report.parse_time, help="window end (unix seconds or ISO 8601)")
    parser.add_argument("--window_hours", type=float, help="the last N hours (instead of --start/--end)")
    parser.add_argument("--metadata", help="an ML Metadata SQLite file to record the span in")
    args = parser.parse_args(argv)
    try:
        spec = feature_spec.load(args.spec)
        start, end = ab_report.window(args.start, args.end, args.window_hours)
        result = export(args.log, args.labels, args.spans, spec, args.model, start, end, args.span, args.metadata)
    except (ExportError, ab.InputError, feature_spec.SpecError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"span {result['span']}: {result['rows']} rows -> {result['folder']} (left out: {result['left_out']}; "
          f"policies {result['policies']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
