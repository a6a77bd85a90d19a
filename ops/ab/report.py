"""The A/B report: the prediction log and late ground truth read, scored per variant, B compared
with A and the go/no-go decision (the rule and its reasons), as a JSON-ready dict and as text.

The statistics are in ops/ab/statistics.py; the command line is ops/ab_report.py.
"""

import csv
import datetime as dt
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ops.ab.statistics import (Key, NotTestable, Sample, delong_paired_test, delong_test, error_rate_test,
                               mcnemar_test, metric_value, paired_t_test, row_losses, two_proportion_test,
                               welch_test)
from serving import logstore, wire

GO, NO_GO, NOT_ENOUGH_DATA = "GO", "NO-GO", "NOT ENOUGH DATA"
EXIT_CODES = {GO: 0, NO_GO: 1, NOT_ENOUGH_DATA: 3}
SHADOW_SUFFIX = ":shadow"  # the proxy's request id of a shadow answer, and our variant name for it

METRICS = {"binary": ("auc", "accuracy", "log_loss"), "multiclass": ("accuracy", "log_loss"),
           "regression": ("rmse", "mae")}
DEFAULT_PRIMARY = {"binary": "auc", "multiclass": "accuracy", "regression": "rmse"}
HIGHER_IS_BETTER = {"accuracy": True, "auc": True, "log_loss": False, "rmse": False, "mae": False}
METRIC_NAMES = {"accuracy": "accuracy", "auc": "AUC", "log_loss": "log loss", "rmse": "RMSE", "mae": "MAE"}
RELATIVE_MARGIN = {"log_loss", "rmse", "mae"}  # losses have no natural scale: the margin is a share of A's value


class InputError(ValueError):
    """Bad input: the message names the file, column or line at fault (exit code 2)."""



# --- the prediction log -------------------------------------------------------------------

def log_url(url: str) -> str:
    """The log's URL as reports and messages show it (password masked); InputError for a bad one."""
    try:
        return logstore.masked_url(url)
    except ValueError as e:
        raise InputError(f"--log: {e}") from None


def read_log(url: str, start: Optional[float], end: Optional[float], model: Optional[str],
             include_shadow: bool) -> Tuple[str, List[Dict[str, Any]]]:
    """(model, records) of the window, bodies decoded; one that is not JSON (a client's malformed
    request, logged as received) reads as None."""
    shown = log_url(url)
    try:
        with logstore.open_store(url, readonly=True) as store:
            models = Counter(store.models(start, end, include_shadow))
            if model is None:
                if len(models) != 1:
                    raise InputError(f"prediction log {shown}: " + (
                        f"several models in the window, choose one with --model: {_counts(models)}" if models
                        else f"no records in {_window_text(start, end)}"))
                model = next(iter(models))
            elif model not in models:
                present = f"; models present: {_counts(models)}" if models else ""
                raise InputError(f"prediction log {shown}: no records of model '{model}' in "
                                 f"{_window_text(start, end)}{present}")
            return model, [logstore.decode(r) for r in store.read(start, end, model, include_shadow)]
    except logstore.StoreError as e:
        raise InputError(str(e)) from None


# --- answers: one RowOutput per row of a response -----------------------------------------

@dataclass
class RowOutput:
    probabilities: Optional[Tuple[float, ...]] = None  # classification
    class_id: Optional[int] = None                     # the class the client was given
    value: Optional[float] = None                      # regression
    names: Tuple[Tuple[str, int], ...] = ()            # (class name, id) pairs the answer shows

    @property
    def task(self) -> str:
        if self.value is not None:
            return "regression"
        return "binary" if len(self.probabilities) == 2 else "multiclass"


def _number(x: Any) -> bool:
    return wire.is_number(x) and math.isfinite(x)


def _classified(probabilities: Sequence[Any], class_id: Any = None, class_name: Any = None,
                names: Tuple[Tuple[str, int], ...] = ()) -> Optional[RowOutput]:
    if len(probabilities) < 2 or not all(_number(p) for p in probabilities):
        return None
    probabilities = tuple(float(p) for p in probabilities)
    class_id = wire.one_element(class_id)
    if class_id is None:
        class_id = int(np.argmax(probabilities))
    if not (_number(class_id) and float(class_id).is_integer() and 0 <= class_id < len(probabilities)):
        return None
    class_name = wire.one_element(class_name)
    if isinstance(class_name, str):
        names += ((class_name, int(class_id)),)
    return RowOutput(probabilities=probabilities, class_id=int(class_id), names=names)


def _row(item: Any) -> Optional[RowOutput]:
    item = wire.one_element(item)
    if _number(item):
        return RowOutput(value=float(item))  # a single-output model: bare values
    if isinstance(item, list):
        if item and all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in item):
            return _classified([p[1] for p in item], names=tuple((p[0], i) for i, p in enumerate(item)))  # :classify
        return _classified(item)
    if not isinstance(item, dict):
        return None
    if "value" in item:
        value = wire.one_element(item["value"])
        return RowOutput(value=float(value)) if _number(value) else None
    probabilities = item.get("probabilities")
    score = wire.one_element(item.get("score"))
    if probabilities is None and _number(score):  # e.g. a proxy fallback answer with a score only
        probabilities = [1.0 - score, score]
    if not isinstance(probabilities, list):
        return None
    return _classified(probabilities, item.get("class_ids"), item.get("classes"))


def parse_outputs(response: Any) -> Optional[List[RowOutput]]:
    """The rows of a 200 answer (:predict rows or columns, :classify, :regress), or None if unreadable."""
    items = wire.answer_rows(response)
    if items is None:
        return None
    rows = [_row(item) for item in items]
    return None if any(r is None for r in rows) else rows


# --- variants -----------------------------------------------------------------------------

@dataclass
class Variant:
    name: str
    requests: int = 0
    rows: int = 0
    answered_rows: int = 0
    errors: Counter = field(default_factory=Counter)    # "503" -> requests, "unreadable" -> 200s we cannot read
    latencies_ms: List[float] = field(default_factory=list)  # answered requests
    versions: Counter = field(default_factory=Counter)
    outputs: Dict[Key, RowOutput] = field(default_factory=dict)
    failed_ids: set = field(default_factory=set)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def _base_id(record: Dict[str, Any]) -> str:
    """The proxy's id of the client request a record answers (a shadow answer's without its suffix)."""
    request_id = record["request_id"]
    return request_id[:-len(SHADOW_SUFFIX)] if record["shadow"] and request_id.endswith(SHADOW_SUFFIX) else request_id


def collect(records: List[Dict[str, Any]]) -> Dict[str, Variant]:
    variants: Dict[str, Variant] = {}
    for r in records:
        name = r["variant"] + (SHADOW_SUFFIX if r["shadow"] else "")
        base_id = _base_id(r)
        v = variants.setdefault(name, Variant(name))
        v.requests += 1
        v.versions[r["model_version"]] += 1
        outputs = parse_outputs(r["response"]) if r["status"] == 200 else None
        if outputs is None:
            v.errors["unreadable" if r["status"] == 200 else str(r["status"])] += 1
            v.failed_ids.add(base_id)
            v.rows += len(logstore.instances(r["request"])) if isinstance(r["request"], dict) else 0
            continue
        v.rows += len(outputs)
        v.answered_rows += len(outputs)
        v.latencies_ms.append(float(r["latency_ms"]))
        for i, output in enumerate(outputs):
            v.outputs[(base_id, i)] = output
    return variants


def task_of(variants: Sequence[Variant]) -> Tuple[Optional[str], int]:
    """(task, number of classes) the variants answer as; they must agree."""
    seen: Dict[Tuple[str, int], str] = {}
    for v in variants:
        for output in v.outputs.values():
            kind = (output.task, len(output.probabilities) if output.probabilities else 0)
            seen.setdefault(kind, v.name)
    if len(seen) > 1:
        described = "; ".join(f"{name} answers as {task}" + (f" with {k} classes" if k else "")
                              for (task, k), name in seen.items())
        raise InputError(f"the compared variants do not answer the same kind of model: {described}")
    return next(iter(seen)) if seen else (None, 0)


def _answers_as(variant: Variant, task: Optional[str], n_classes: int) -> bool:
    """Whether every answer of the variant is of the compared kind (a variant beside A and B may not be)."""
    if task is None:
        return False
    try:
        return task_of([variant]) in ((task, n_classes), (None, 0))
    except InputError:
        return False


def class_names(variants: Sequence[Variant], given: Optional[List[str]], n_classes: int) -> Dict[str, int]:
    """Class name -> id, from --classes and the (name, id) pairs the answers show; conflicts are errors."""
    names: Dict[str, int] = {}
    ids: Dict[int, str] = {}
    where: Dict[Any, str] = {}  # name or id -> where it was first seen
    if given:
        if len(given) != n_classes:
            raise InputError(f"--classes names {len(given)} classes but the model answers with {n_classes} "
                             "probabilities")
        for i, name in enumerate(given):
            names[name], ids[i], where[name], where[i] = i, name, "--classes", "--classes"
    for v in variants:
        for output in v.outputs.values():
            for name, i in output.names:
                if names.setdefault(name, i) != i:
                    raise InputError(f"class '{name}' has id {i} in the answers of '{v.name}' but id {names[name]} "
                                     f"in {where[name]}: the variants do not share one class order")
                if ids.setdefault(i, name) != name:
                    raise InputError(f"class id {i} is '{name}' in the answers of '{v.name}' but '{ids[i]}' "
                                     f"in {where[i]}: the variants do not share one class order")
                where.setdefault(name, f"the answers of '{v.name}'")
                where.setdefault(i, f"the answers of '{v.name}'")
    return names


# --- ground truth -------------------------------------------------------------------------

@dataclass
class Labels:
    path: str
    values: Dict[Key, Tuple[Any, int]]  # key -> (raw label, line number)
    lines: int = 0
    blank: int = 0


def _label_format(path: str) -> str:
    extension = os.path.splitext(path)[1].lower()
    if extension in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if extension == ".csv":
        return "csv"
    with open(path, encoding="utf-8-sig") as f:
        head = f.read(4096).lstrip()
    return "jsonl" if head.startswith("{") else "csv"


def _label_rows(path: str) -> Iterator[Tuple[int, Dict[str, Any]]]:
    if _label_format(path) == "jsonl":
        with open(path, encoding="utf-8-sig") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise InputError(f"labels file {path} line {number}: not JSON ({e})") from None
                if not isinstance(row, dict):
                    raise InputError(f"labels file {path} line {number}: expected an object with 'request_id' "
                                     f"and 'label', got {type(row).__name__}")
                if "request_id" not in row:
                    raise InputError(f"labels file {path} line {number}: no 'request_id' field "
                                     f"(fields: {', '.join(row) or 'none'})")
                if "label" not in row:
                    raise InputError(f"labels file {path} line {number}: no 'label' field "
                                     f"(fields: {', '.join(row)})")
                yield number, row
        return
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        if not columns:
            raise InputError(f"labels file {path}: empty (expected a header with request_id,label[,row])")
        for needed in ("request_id", "label"):
            if needed not in columns:
                raise InputError(f"labels file {path}: no '{needed}' column (columns: {', '.join(columns)})")
        reader.fieldnames = columns
        for row in reader:
            yield reader.line_num, row


def _row_index(value: Any) -> Optional[int]:
    """The row of a label: absent or empty is 0; 2, "2" and 2.0 (a spreadsheet's float column) are 2."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return 0
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if number.is_integer() and number >= 0 else None


def load_labels(path: str) -> Labels:
    if not os.path.isfile(path):
        raise InputError(f"labels file {path}: no such file")
    labels = Labels(path, {})
    for number, row in _label_rows(path):
        labels.lines += 1
        request_id = row["request_id"]
        if isinstance(request_id, int) and not isinstance(request_id, bool):
            request_id = str(request_id)
        if not isinstance(request_id, str) or not request_id.strip():
            raise InputError(f"labels file {path} line {number}: request_id must be a non-empty string, "
                             f"got {request_id!r}")
        index = _row_index(row.get("row"))
        if index is None:
            raise InputError(f"labels file {path} line {number}: row {row['row']!r} is not a non-negative integer")
        label = row["label"]
        if label is None or (isinstance(label, str) and not label.strip()):
            labels.blank += 1  # ground truth not known yet for this row
            continue
        label = label.strip() if isinstance(label, str) else label
        _add_label(labels.values, (request_id.strip(), index), label, number, path, f"'{request_id.strip()}'")
    return labels


def _add_label(values: Dict[Key, Tuple[Any, int]], key: Key, label: Any, line: int, path: str, named: str) -> None:
    if key in values and values[key][0] != label:
        earlier, earlier_line = values[key]
        raise InputError(f"labels file {path}: request_id {named} row {key[1]} has two labels "
                         f"({earlier!r} at line {earlier_line}, {label!r} at line {line})")
    values.setdefault(key, (label, line))


def by_proxy_id(labels: Labels, records: List[Dict[str, Any]]) -> Labels:
    """The labels keyed by the proxy's request id. A label's request_id is the proxy's (the
    X-Request-Id of its answer) or the X-Request-Id the client sent, which must then name one
    request of the window; an id that matches neither stays as it is (counted as unmatched)."""
    proxy_ids = {_base_id(r) for r in records}
    by_client: Dict[str, set] = {}
    for r in records:
        if r["client_request_id"] is not None:
            by_client.setdefault(r["client_request_id"], set()).add(_base_id(r))
    values: Dict[Key, Tuple[Any, int]] = {}
    for (given, row), (label, line) in sorted(labels.values.items(), key=lambda kv: kv[1][1]):
        request_id, named = given, f"'{given}'"
        if given not in proxy_ids and given in by_client:
            matches = by_client[given]
            if len(matches) > 1:
                raise InputError(f"labels file {labels.path} line {line}: request_id '{given}' is the client's "
                                 f"X-Request-Id of {len(matches)} requests in the log's window: label them by the "
                                 "proxy's request id (the X-Request-Id of its answer) instead")
            request_id = next(iter(matches))
            named = f"'{request_id}' (the client's '{given}')"
        _add_label(values, (request_id, row), label, line, labels.path, named)
    return replace(labels, values=values)


def code_label(raw: Any, task: str, n_classes: int, names: Dict[str, int]) -> float:
    """A label as the class id (classification) or number (regression); ValueError says why not."""
    if task == "regression":
        if _number(raw):
            return float(raw)
        if isinstance(raw, str):
            try:
                value = float(raw)
            except ValueError:
                value = math.nan
            if math.isfinite(value):
                return value
        raise ValueError(f"label {raw!r} is not a number (the model is a regression)")
    if isinstance(raw, str) and raw in names:
        return names[raw]
    if isinstance(raw, bool) or (isinstance(raw, str) and raw.lower() in ("true", "false")):
        class_id = int(raw if isinstance(raw, bool) else raw.lower() == "true")
    else:
        try:
            class_id = float(raw)
        except (TypeError, ValueError):
            class_id = math.nan
    if not (math.isfinite(class_id) and float(class_id).is_integer() and 0 <= class_id < n_classes):
        known = ", ".join(f"{n}={i}" for n, i in sorted(names.items(), key=lambda kv: kv[1])) or "none seen"
        raise ValueError(f"label {raw!r} is neither a class name (known: {known}) nor a class id 0..{n_classes - 1}"
                         "; --classes names classes the answers never showed")
    return int(class_id)


def code_labels(labels: Labels, task: str, n_classes: int, names: Dict[str, int]) -> Dict[Key, float]:
    coded = {}
    for key, (raw, line) in labels.values.items():
        try:
            coded[key] = code_label(raw, task, n_classes, names)
        except ValueError as e:
            raise InputError(f"labels file {labels.path} line {line}: {e}") from None
    return coded


def variant_summary(variant: Variant, sample: Sample, task: Optional[str], label_ids: set) -> Dict[str, Any]:
    answered = list(variant.outputs.values())
    latencies = np.array(variant.latencies_ms) if variant.latencies_ms else None
    summary = {
        "requests": variant.requests,
        "rows": variant.rows,
        "labelled_rows": len(sample),
        "unlabelled_rows": variant.answered_rows - len(sample),
        "labels_on_failed_requests": len(variant.failed_ids & label_ids),
        "errors": variant.error_count,
        "error_rate": variant.error_count / variant.requests if variant.requests else None,
        "errors_by_status": dict(sorted(variant.errors.items())),
        "latency_ms_p50": float(np.percentile(latencies, 50)) if latencies is not None else None,
        "latency_ms_p99": float(np.percentile(latencies, 99)) if latencies is not None else None,
        "model_versions": {str(k): n for k, n in sorted(variant.versions.items(), key=lambda kv: str(kv[0]))},
        "metrics": {},
    }
    if task is None:
        return summary
    metrics = {m: metric_value(sample, m) for m in METRICS[task]}
    if task == "binary":
        metrics["predicted_positive_rate"] = (sum(o.class_id == 1 for o in answered) / len(answered)
                                              if answered else None)
        metrics["label_positive_rate"] = float(np.mean(sample.y == 1)) if len(sample) else None
    summary["metrics"] = metrics
    return summary


# --- the comparison -----------------------------------------------------------------------

TESTED = {"accuracy": "accuracy", "auc": "AUC", "log_loss": "mean log loss", "rmse": "mean squared error",
          "mae": "mean absolute error"}


def compare_metric(metric: str, a: Sample, b: Sample, paired: bool, alpha: float) -> Dict[str, Any]:
    """One metric of B against A: values, the tested difference (B - A), its CI and p-value."""
    entry: Dict[str, Any] = {"metric": metric, "a": metric_value(a, metric), "b": metric_value(b, metric),
                             "tested": TESTED[metric], "higher_is_better": HIGHER_IS_BETTER[metric]}
    try:
        if metric == "auc":
            difference = (delong_paired_test(a.y, a.probabilities[:, 1], b.probabilities[:, 1], alpha) if paired
                          else delong_test(a.y, a.probabilities[:, 1], b.y, b.probabilities[:, 1], alpha))
        elif metric == "accuracy":
            correct_a, correct_b = a.predicted == a.y, b.predicted == b.y
            difference = (mcnemar_test(correct_a, correct_b, alpha) if paired else
                          two_proportion_test(int(correct_a.sum()), len(a), int(correct_b.sum()), len(b), alpha))
        else:
            losses_a, losses_b = row_losses(a, metric), row_losses(b, metric)
            difference = (paired_t_test(losses_a, losses_b, alpha) if paired
                          else welch_test(losses_a, losses_b, alpha))
    except NotTestable as e:
        entry["not_testable"] = str(e)
        return entry
    entry.update(estimate=difference.estimate, ci_low=difference.ci_low, ci_high=difference.ci_high,
                 p_value=difference.p_value, method=difference.method, significant=difference.p_value < alpha)
    return entry


def margin_in_tested_units(metric: str, margin: float, value_a: Optional[float]) -> float:
    """The largest acceptable loss, as a difference of the tested quantity (RMSE: of the MSE)."""
    if metric not in RELATIVE_MARGIN:
        return margin
    if value_a is None:
        return 0.0
    if metric == "rmse":
        return value_a ** 2 * ((1 + margin) ** 2 - 1)  # RMSE_b <= (1 + m) RMSE_a  <=>  MSE_b - MSE_a <= this
    return margin * value_a


def _gain(entry: Dict[str, Any]) -> Tuple[float, float, float]:
    """(estimate, ci_low, ci_high) oriented so that positive means B is better."""
    if entry["higher_is_better"]:
        return entry["estimate"], entry["ci_low"], entry["ci_high"]
    return -entry["estimate"], -entry["ci_high"], -entry["ci_low"]


def rule_text(primary: Optional[str], guardrails: Sequence[str], alpha: float, margin: float,
              min_samples: int) -> List[str]:
    name = METRIC_NAMES.get(primary, "the primary metric")
    margin_text = (f"B's {name} at most {margin:.1%} worse than A's" if primary in RELATIVE_MARGIN
                   else f"B - A >= -{margin:g} on {name}")
    guarded = [f"NO-GO            if B is significantly worse on a guardrail metric, "
               f"{' or '.join(METRIC_NAMES[g] for g in guardrails)} (p < {alpha / len(guardrails):.3g}: "
               f"{alpha:g} / {len(guardrails)}, Bonferroni)"] if guardrails else []
    return [
        f"NO-GO            if B's error rate is higher than A's and Fisher's one-sided p < {alpha:g}",
        f"NOT ENOUGH DATA  if A or B has fewer than {min_samples} labelled rows (paired comparison: pairs)"
        + (", or AUC has one class only" if primary == "auc" else ""),
        f"NO-GO            if B is significantly worse on {name} (p < {alpha:g})",
        *guarded,
        f"GO               if B is significantly better on {name} (p < {alpha:g})",
        f"GO               if not significant and the {1 - alpha:.0%} CI's worst case is within the margin "
        f"({margin_text})",
        "NOT ENOUGH DATA  otherwise: the CI still allows a loss larger than the margin",
    ]


def decide(primary_entry: Optional[Dict[str, Any]], guardrail_entries: Sequence[Dict[str, Any]],
           errors: Dict[str, Any], n_compared: Tuple[int, int], paired: bool, alpha: float, margin_tested: float,
           min_samples: int) -> Tuple[str, List[str]]:
    """(outcome, reasons) by the rule of rule_text()."""
    if errors["b_rate"] > errors["a_rate"] and errors["p_value"] < alpha:
        return NO_GO, [f"B's error rate {errors['b_rate']:.2%} is significantly higher than A's "
                       f"{errors['a_rate']:.2%} (Fisher one-sided p = {errors['p_value']:.3g})"]
    n_a, n_b = n_compared
    if paired and n_a < min_samples:
        return NOT_ENOUGH_DATA, [f"{n_a} labelled rows answered by both A and B; at least {min_samples} needed"]
    if not paired and min(n_a, n_b) < min_samples:
        return NOT_ENOUGH_DATA, [f"labelled rows: A {n_a}, B {n_b}; at least {min_samples} per variant needed"]
    if primary_entry is None or "estimate" not in primary_entry:
        why = primary_entry.get("not_testable") if primary_entry else "no predictions to score"
        return NOT_ENOUGH_DATA, [f"the primary metric cannot be compared: {why}"]
    name = METRIC_NAMES[primary_entry["metric"]]
    gain, gain_low, gain_high = _gain(primary_entry)
    figures = (f"{name} A {primary_entry['a']:.4f}, B {primary_entry['b']:.4f}; {primary_entry['tested']} B - A "
               f"{primary_entry['estimate']:+.4g} [{primary_entry['ci_low']:+.4g}, {primary_entry['ci_high']:+.4g}], "
               f"p = {primary_entry['p_value']:.3g}")
    if primary_entry["significant"] and gain < 0:
        return NO_GO, [f"B is significantly worse on {name}: {figures}"]
    guard_alpha = alpha / max(len(guardrail_entries), 1)
    broken = [g for g in guardrail_entries if "estimate" in g and g["p_value"] < guard_alpha and _gain(g)[0] < 0]
    if broken:
        return NO_GO, [f"B is significantly worse on guardrail {METRIC_NAMES[g['metric']]}: A {g['a']:.4f}, "
                       f"B {g['b']:.4f}; {g['tested']} B - A {g['estimate']:+.4g} [{g['ci_low']:+.4g}, "
                       f"{g['ci_high']:+.4g}], p = {g['p_value']:.3g} < {guard_alpha:.3g}" for g in broken]
    if primary_entry["significant"]:
        return GO, [f"B is significantly better on {name}: {figures}"]
    if gain_low >= -margin_tested:
        return GO, [f"B is not significantly different on {name} and its worst case is within the margin "
                    f"(a loss of at most {-gain_low:.4g} <= {margin_tested:.4g}): {figures}"]
    reasons = [f"not significant on {name}, but the CI allows a loss of {-gain_low:.4g} > margin "
               f"{margin_tested:.4g}: {figures}"]
    half_width = (gain_high - gain_low) / 2
    if gain + margin_tested > 0 and half_width > 0:
        factor = (half_width / (gain + margin_tested)) ** 2
        reasons.append(f"if the difference stays at {primary_entry['estimate']:+.4g}, about "
                       f"{math.ceil(factor * min(n_a, n_b)):,} labelled rows "
                       f"{'in pairs' if paired else 'per variant'} would settle it")
    else:
        reasons.append("the observed difference is itself beyond the margin: more data is unlikely to make B pass")
    return NOT_ENOUGH_DATA, reasons


# --- the report ---------------------------------------------------------------------------

def _check_variants(variants: Dict[str, Variant], a: str, b: str, model: str, log_path: str,
                    start: Optional[float], end: Optional[float], include_shadow: bool) -> None:
    if a == b:
        raise InputError(f"--a and --b are both '{a}': compare two different variants")
    present = ", ".join(f"{name} ({v.requests} requests)" for name, v in sorted(variants.items()))
    for flag, name in (("--a", a), ("--b", b)):
        if name not in variants:
            hint = ("" if include_shadow else
                    f"; shadow answers are left out: --include_shadow adds them as '<variant>{SHADOW_SUFFIX}'")
            raise InputError(f"{flag} '{name}': no such variant for model '{model}' in "
                             f"{_window_text(start, end)} of {log_path}; variants present: {present}{hint}")


def _compare(variant_a: Variant, variant_b: Variant, sample_a: Sample, sample_b: Sample, task: Optional[str],
             alpha: float) -> Dict[str, Any]:
    """Every metric and the error rate of B against A; paired on the rows both answered, if any."""
    common = sorted(set(sample_a.keys) & set(sample_b.keys))
    paired = bool(common)
    if paired:
        sample_a, sample_b = sample_a.subset(common), sample_b.subset(common)
    errors_a, errors_b = variant_a.error_count, variant_b.error_count
    errors = {"a_errors": errors_a, "b_errors": errors_b,
              "a_rate": errors_a / variant_a.requests, "b_rate": errors_b / variant_b.requests,
              "p_value": error_rate_test(errors_a, variant_a.requests, errors_b, variant_b.requests),
              "method": "Fisher exact test, one-sided (B higher)"}
    return {"paired": paired, "rows_a": len(sample_a), "rows_b": len(sample_b), "alpha": alpha,
            "metrics": [compare_metric(m, sample_a, sample_b, paired, alpha) for m in METRICS[task]] if task else [],
            "errors": errors}


def build_report(log_path: str, labels_path: Optional[str], model: Optional[str], a: str, b: str,
                 start: Optional[float] = None, end: Optional[float] = None, include_shadow: bool = False,
                 primary: Optional[str] = None, alpha: float = 0.05, margin: float = 0.01, min_samples: int = 200,
                 classes: Optional[List[str]] = None, guardrails: Optional[List[str]] = None) -> Dict[str, Any]:
    """The report as a JSON-ready dict; guardrails=None guards every metric of the task but the primary."""
    model, records = read_log(log_path, start, end, model, include_shadow)
    log_path = log_url(log_path)  # from here on what the report shows: never the password
    variants = collect(records)
    _check_variants(variants, a, b, model, log_path, start, end, include_shadow)
    task, n_classes = task_of([variants[a], variants[b]])
    if task is not None:
        primary = primary or DEFAULT_PRIMARY[task]
        for flag, metric in [("--primary", primary)] + [("--guardrails", g) for g in guardrails or []]:
            if metric not in METRICS[task]:
                raise InputError(f"{flag} {metric}: not a metric of a {task} model (choose from "
                                 f"{', '.join(METRICS[task])})")
        guardrails = [m for m in (METRICS[task] if guardrails is None else guardrails) if m != primary]
    names = class_names([variants[a], variants[b]], classes, n_classes) if task in ("binary", "multiclass") else {}
    labels = by_proxy_id(load_labels(labels_path), records) if labels_path else None
    truth = code_labels(labels, task, n_classes, names) if labels and task else {}
    label_ids = {k[0] for k in labels.values} if labels else set()
    logged_ids = set().union(*({k[0] for k in v.outputs} | v.failed_ids for v in variants.values()))
    samples = {name: Sample.of(v, truth, task, n_classes) if _answers_as(v, task, n_classes) else Sample.empty()
               for name, v in variants.items()}

    comparison = _compare(variants[a], variants[b], samples[a], samples[b], task, alpha)
    primary_entry = next((c for c in comparison["metrics"] if c["metric"] == primary), None)
    margin_tested = margin_in_tested_units(primary, margin, primary_entry["a"]) if primary_entry else margin
    comparison.update(primary=primary, margin=margin, margin_tested=margin_tested)
    guardrails = guardrails or []
    comparison["guardrails"] = guardrails
    outcome, reasons = decide(primary_entry, [c for c in comparison["metrics"] if c["metric"] in guardrails],
                              comparison["errors"], (comparison["rows_a"], comparison["rows_b"]),
                              comparison["paired"], alpha, margin_tested, min_samples)
    warnings = [f"B is significantly worse on {METRIC_NAMES[c['metric']]} (p = {c['p_value']:.3g}), "
                "which neither decides nor guards" for c in comparison["metrics"]
                if c["metric"] != primary and c["metric"] not in guardrails and c.get("significant")
                and _gain(c)[0] < 0]
    warnings += [f"'{name}' answered with several model versions ({_counts(variants[name].versions)}): "
                 "narrow the window to compare one of them" for name in (a, b) if len(variants[name].versions) > 1]
    return {
        "log": log_path, "labels": labels_path, "model": model,
        "window": {"start": start, "end": end, "text": _window_text(start, end)},
        "task": task, "classes": [n for n, _ in sorted(names.items(), key=lambda kv: kv[1])],
        "a": a, "b": b, "include_shadow": include_shadow,
        "labels_file": None if labels is None else {
            "lines": labels.lines, "labelled": len(labels.values), "blank": labels.blank,
            "matched_requests": len(label_ids & logged_ids), "unmatched_requests": len(label_ids - logged_ids)},
        "variants": {name: variant_summary(v, samples[name], task if _answers_as(v, task, n_classes) else None,
                                           label_ids) for name, v in sorted(variants.items())},
        "comparison": comparison,
        "decision": {"outcome": outcome, "exit_code": EXIT_CODES[outcome], "reasons": reasons, "warnings": warnings,
                     "rule": rule_text(primary, guardrails, alpha, margin, min_samples)},
    }


def _counts(counter: Counter) -> str:
    return ", ".join(f"{k} ({n})" for k, n in sorted(counter.items(), key=lambda kv: str(kv[0])))


def _time_text(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _window_text(start: Optional[float], end: Optional[float]) -> str:
    if start is None and end is None:
        return "the whole log"
    since = _time_text(start) if start is not None else "the beginning"
    until = _time_text(end) if end is not None else "now"
    return f"[{since}, {until})"


# --- text ---------------------------------------------------------------------------------

def _fmt(value: Optional[float], spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def render(report: Dict[str, Any]) -> str:
    a, b, comparison, decision = report["a"], report["b"], report["comparison"], report["decision"]
    lines = [f"A/B report: model '{report['model']}', {report['window']['text']}, log {report['log']}"]
    task = report["task"]
    lines.append(f"task: {task or 'unknown (no readable answers)'}"
                 + (f"; classes: {', '.join(report['classes'])}" if report["classes"] else ""))
    lf = report["labels_file"]
    if lf is None:
        lines.append("labels: none given (--labels): only traffic, errors and latency can be compared")
    else:
        lines.append(f"labels: {report['labels']}: {lf['labelled']} labelled rows ({lf['blank']} blank), "
                     f"{lf['matched_requests']} requests found in the log, {lf['unmatched_requests']} not "
                     "(outside the window, another model, or never logged)")
    metric_columns = list(METRICS[task]) + (["predicted_positive_rate"] if task == "binary" else []) if task else []
    header = ["variant", "requests", "rows", "labelled", "unlabelled", "errors", "p50 ms", "p99 ms"] + [
        METRIC_NAMES.get(m, "pred. pos. rate") for m in metric_columns]
    table = [header]
    for name, v in report["variants"].items():
        role = " (A)" if name == a else " (B)" if name == b else ""
        table.append([name + role, str(v["requests"]), str(v["rows"]), str(v["labelled_rows"]),
                      str(v["unlabelled_rows"]), f"{v['errors']} ({_fmt(v['error_rate'], '.2%')})",
                      _fmt(v["latency_ms_p50"], ".1f"), _fmt(v["latency_ms_p99"], ".1f")]
                     + [_fmt(v["metrics"].get(m)) for m in metric_columns])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines.append("")
    lines += ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
              for row in table]
    for name, v in report["variants"].items():
        if v["errors"]:
            by_status = ", ".join(f"{status}: {n}" for status, n in v["errors_by_status"].items())
            lines.append(f"  {name} errors by status: {by_status}")
    lines.append("")
    kind = (f"paired: {comparison['rows_a']} labelled rows answered by both" if comparison["paired"] else
            f"independent samples: {comparison['rows_a']} and {comparison['rows_b']} labelled rows")
    lines.append(f"B ({b}) vs A ({a}), {kind}; {1 - comparison['alpha']:.0%} CIs of B - A:")
    for c in comparison["metrics"]:
        star = ("*" if c["metric"] == comparison["primary"] else
                "+" if c["metric"] in comparison["guardrails"] else " ")
        name = METRIC_NAMES[c["metric"]] + star
        values = f"A {_fmt(c['a'])}  B {_fmt(c['b'])}"
        if "estimate" not in c:
            lines.append(f"  {name:<10} {values}  not testable: {c['not_testable']}")
            continue
        better = "higher" if c["higher_is_better"] else "lower"
        lines.append(f"  {name:<10} {values}  {c['tested']} {c['estimate']:+.4g} [{c['ci_low']:+.4g}, "
                     f"{c['ci_high']:+.4g}]  p = {c['p_value']:.3g}  ({c['method']}; {better} is better)")
    e = comparison["errors"]
    lines.append(f"  {'errors':<10} A {e['a_rate']:.2%}  B {e['b_rate']:.2%}  p = {e['p_value']:.3g}  ({e['method']})")
    primary = comparison["primary"]
    if primary in RELATIVE_MARGIN:
        lines.append(f"  * primary metric; margin: {comparison['margin']:.1%} of A's {METRIC_NAMES[primary]}, "
                     f"{comparison['margin_tested']:.4g} in {TESTED[primary]}")
    elif primary:
        lines.append(f"  * primary metric; margin: {comparison['margin']:g} {METRIC_NAMES[primary]}")
    if comparison["guardrails"]:
        lines.append("  + guardrail metric")
    lines.append("")
    lines.append("Rule, first match wins:")
    lines += [f"  {line}" for line in decision["rule"]]
    lines.append("")
    lines.append(f"Decision: {decision['outcome']} (exit code {decision['exit_code']})")
    lines += [f"  {reason}" for reason in decision["reasons"]]
    lines += [f"  warning: {w}" for w in decision["warnings"]]
    return "\n".join(lines)


