"""Continuous evaluation: the A/B go/no-go report, from the prediction log and late ground truth.

    python -m ops.ab_report --log build/prediction_log.sqlite --labels labels.csv [--model taxi]
        [--a stable] [--b canary] [--start T] [--end T] [--window_hours H] [--include_shadow]
        [--primary METRIC] [--guardrails M1,M2|none] [--alpha 0.05] [--margin 0.01] [--min_samples 200]
        [--classes no,yes] [--json report.json]

The proxy logs every request with the variant that answered it (serving/predlog.py; --log is a
SQLite file or a postgresql:// URL, see serving/logstore.py). Ground truth arrives later as CSV
or JSON lines with `request_id`, `label` and an optional `row` (the row of a multi-row request, 0
by default). `request_id` is the proxy's id (the X-Request-Id of its answer) or the X-Request-Id
the client sent, if that names one request in the window; the label is a class name or id, or a number for
regression. Every labelled row is scored against the answer the client got (the served
`class_ids`, so a threshold the proxy applied counts), per variant:

  binary      accuracy, AUC, log loss, predicted positive rate
  multiclass  accuracy, log loss
  regression  RMSE, MAE

beside requests, rows, labelled and unlabelled rows, errors (non-200 answers and 200 answers
whose predictions cannot be read) and latency p50/p99 of the answered requests.

B (the candidate) is then compared with A (the baseline). Two live variants see different
requests (independent samples); a shadow variant (--include_shadow, named "<variant>:shadow")
answers copies of the same requests, so B against the live variant is a paired comparison on the
rows both answered, which is far more sensitive:

  accuracy        two-proportion z-test, Newcombe (Wilson) CI  | McNemar exact test, Wald CI
  AUC             DeLong test                                   | paired DeLong test
  log loss, MAE   Welch t-test on per-row losses                | paired t-test
  RMSE            Welch t-test on squared errors                | paired t-test on squared errors
  error rate      Fisher exact test, one-sided (B higher)

The primary metric (--primary; AUC, accuracy or RMSE by default) decides; the task's other
metrics are guardrails (--guardrails): a significant loss on one of them blocks the release.
The decision, first match wins (printed with every report; --margin is absolute for accuracy
and AUC, relative to A's value for log loss, MAE and RMSE):

  NO-GO            B's error rate is higher than A's and Fisher's one-sided p < alpha
  NOT ENOUGH DATA  A or B has fewer than --min_samples labelled rows (paired: pairs), or the
                   primary metric is undefined (AUC with one class only)
  NO-GO            B is significantly worse on the primary metric (p < alpha)
  NO-GO            B is significantly worse on a guardrail metric (p < alpha / number of guardrails)
  GO               B is significantly better on the primary metric (p < alpha)
  GO               not significant, and the CI's worst case is within the margin (non-inferior)
  NOT ENOUGH DATA  not significant, and the CI still allows a loss larger than the margin

Exit codes: 0 GO, 1 NO-GO, 3 NOT ENOUGH DATA, 2 input error (the message names the file,
column or line at fault).
"""

import argparse
import csv
import datetime as dt
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from scipy import stats

from serving import logstore

GO, NO_GO, NOT_ENOUGH_DATA = "GO", "NO-GO", "NOT ENOUGH DATA"
EXIT_CODES = {GO: 0, NO_GO: 1, NOT_ENOUGH_DATA: 3}
INPUT_ERROR_EXIT = 2
SHADOW_SUFFIX = ":shadow"  # the proxy's request id of a shadow answer, and our variant name for it

METRICS = {"binary": ("auc", "accuracy", "log_loss"), "multiclass": ("accuracy", "log_loss"),
           "regression": ("rmse", "mae")}
DEFAULT_PRIMARY = {"binary": "auc", "multiclass": "accuracy", "regression": "rmse"}
HIGHER_IS_BETTER = {"accuracy": True, "auc": True, "log_loss": False, "rmse": False, "mae": False}
METRIC_NAMES = {"accuracy": "accuracy", "auc": "AUC", "log_loss": "log loss", "rmse": "RMSE", "mae": "MAE"}
RELATIVE_MARGIN = {"log_loss", "rmse", "mae"}  # losses have no natural scale: the margin is a share of A's value
PROBABILITY_FLOOR = 1e-15  # log loss of a probability of exactly 0 is clipped here


class InputError(ValueError):
    """Bad input: the message names the file, column or line at fault (exit code 2)."""


class NotTestable(ValueError):
    """A comparison that the data cannot support (one class only, fewer than two rows)."""


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
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _scalar(x: Any) -> Any:
    """TF Serving writes an output of shape [n, 1] as one-element lists."""
    return x[0] if isinstance(x, list) and len(x) == 1 else x


def _classified(probabilities: Sequence[Any], class_id: Any = None, class_name: Any = None,
                names: Tuple[Tuple[str, int], ...] = ()) -> Optional[RowOutput]:
    if len(probabilities) < 2 or not all(_number(p) for p in probabilities):
        return None
    probabilities = tuple(float(p) for p in probabilities)
    class_id = _scalar(class_id)
    if class_id is None:
        class_id = int(np.argmax(probabilities))
    if not (_number(class_id) and float(class_id).is_integer() and 0 <= class_id < len(probabilities)):
        return None
    class_name = _scalar(class_name)
    if isinstance(class_name, str):
        names += ((class_name, int(class_id)),)
    return RowOutput(probabilities=probabilities, class_id=int(class_id), names=names)


def _row(item: Any) -> Optional[RowOutput]:
    item = _scalar(item)
    if _number(item):
        return RowOutput(value=float(item))  # a single-output model: bare values
    if isinstance(item, list):
        if item and all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in item):
            return _classified([p[1] for p in item], names=tuple((p[0], i) for i, p in enumerate(item)))  # :classify
        return _classified(item)
    if not isinstance(item, dict):
        return None
    if "value" in item:
        value = _scalar(item["value"])
        return RowOutput(value=float(value)) if _number(value) else None
    probabilities = item.get("probabilities")
    score = _scalar(item.get("score"))
    if probabilities is None and _number(score):  # e.g. a proxy fallback answer with a score only
        probabilities = [1.0 - score, score]
    if not isinstance(probabilities, list):
        return None
    return _classified(probabilities, item.get("class_ids"), item.get("classes"))


def _columns_to_rows(outputs: Any) -> Any:
    if isinstance(outputs, dict) and outputs and all(isinstance(v, list) for v in outputs.values()):
        return [dict(zip(outputs, values)) for values in zip(*outputs.values())]
    return outputs


def parse_outputs(response: Any) -> Optional[List[RowOutput]]:
    """The rows of a 200 answer (:predict rows or columns, :classify, :regress), or None if unreadable."""
    if not isinstance(response, dict):
        return None
    for key in ("predictions", "outputs", "results"):
        if key in response:
            items = _columns_to_rows(response[key]) if key == "outputs" else response[key]
            break
    else:
        return None
    if not isinstance(items, list):
        return None
    rows = [_row(item) for item in items]
    return None if any(r is None for r in rows) else rows


# --- variants -----------------------------------------------------------------------------

Key = Tuple[str, int]  # (the proxy's request id, row)


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


# --- metrics ------------------------------------------------------------------------------

@dataclass
class Sample:
    """The labelled rows of one variant, in key order."""
    keys: List[Key]
    y: np.ndarray                        # class ids or true values
    predicted: np.ndarray                # served class ids or predicted values
    probabilities: Optional[np.ndarray]  # rows x classes (classification)

    @classmethod
    def of(cls, variant: Variant, truth: Dict[Key, float], task: str, n_classes: int) -> "Sample":
        keys = sorted(k for k in variant.outputs if k in truth)
        outputs = [variant.outputs[k] for k in keys]
        y = np.array([truth[k] for k in keys], dtype=np.float64)
        if task == "regression":
            return cls(keys, y, np.array([o.value for o in outputs], dtype=np.float64), None)
        probabilities = np.array([o.probabilities for o in outputs], dtype=np.float64).reshape(len(keys), n_classes)
        return cls(keys, y.astype(np.int64), np.array([o.class_id for o in outputs], dtype=np.int64), probabilities)

    @classmethod
    def empty(cls) -> "Sample":
        return cls([], np.zeros(0), np.zeros(0), None)

    def subset(self, keys: List[Key]) -> "Sample":
        index = {k: i for i, k in enumerate(self.keys)}
        rows = np.array([index[k] for k in keys], dtype=np.int64)
        return Sample(list(keys), self.y[rows], self.predicted[rows],
                      None if self.probabilities is None else self.probabilities[rows])

    def __len__(self) -> int:
        return len(self.keys)


def auc(y: np.ndarray, score: np.ndarray) -> Optional[float]:
    """Area under the ROC curve (Mann-Whitney, ties count one half); None with one class only."""
    positive = y == 1
    m, n = int(positive.sum()), int((~positive).sum())
    if m == 0 or n == 0:
        return None
    ranks = stats.rankdata(score)
    return float((ranks[positive].sum() - m * (m + 1) / 2) / (m * n))


def row_losses(sample: Sample, metric: str) -> np.ndarray:
    """The per-row quantity whose mean is the metric (or, for RMSE, its square)."""
    if metric == "accuracy":
        return (sample.predicted == sample.y).astype(np.float64)
    if metric == "log_loss":
        p_true = sample.probabilities[np.arange(len(sample)), sample.y]
        return -np.log(np.clip(p_true, PROBABILITY_FLOOR, 1.0))
    if metric == "rmse":
        return (sample.predicted - sample.y) ** 2
    if metric == "mae":
        return np.abs(sample.predicted - sample.y)
    raise KeyError(metric)


def metric_value(sample: Sample, metric: str) -> Optional[float]:
    if len(sample) == 0:
        return None
    if metric == "auc":
        return auc(sample.y, sample.probabilities[:, 1])
    value = float(np.mean(row_losses(sample, metric)))
    return math.sqrt(value) if metric == "rmse" else value


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


# --- significance tests: B - A, a two-sided p-value and a (1 - alpha) confidence interval ---

@dataclass
class Difference:
    estimate: float
    ci_low: float
    ci_high: float
    p_value: float
    method: str


def _normal_difference(estimate: float, se: float, alpha: float, method: str,
                       p_value: Optional[float] = None) -> Difference:
    if not se > 0:  # every row agrees: nothing varies, the estimate is exact
        return Difference(estimate, estimate, estimate, 1.0 if estimate == 0 else 0.0, method)
    half = stats.norm.ppf(1 - alpha / 2) * se
    if p_value is None:
        p_value = float(2 * stats.norm.sf(abs(estimate) / se))
    return Difference(estimate, estimate - half, estimate + half, p_value, method)


def _wilson(successes: int, n: int, alpha: float) -> Tuple[float, float]:
    z = stats.norm.ppf(1 - alpha / 2)
    centre = (successes + z * z / 2) / (n + z * z)
    half = z * math.sqrt(successes * (n - successes) / n + z * z / 4) / (n + z * z)
    return centre - half, centre + half


def two_proportion_test(successes_a: int, n_a: int, successes_b: int, n_b: int, alpha: float) -> Difference:
    """Pooled two-proportion z-test (the chi-square test of the 2x2 table) with Newcombe's hybrid
    Wilson score interval for p_b - p_a."""
    if n_a < 1 or n_b < 1:
        raise NotTestable("no rows")
    p_a, p_b = successes_a / n_a, successes_b / n_b
    pooled = (successes_a + successes_b) / (n_a + n_b)
    se0 = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    estimate = p_b - p_a
    p_value = float(2 * stats.norm.sf(abs(estimate) / se0)) if se0 > 0 else 1.0
    low_a, high_a = _wilson(successes_a, n_a, alpha)
    low_b, high_b = _wilson(successes_b, n_b, alpha)
    return Difference(estimate, estimate - math.hypot(p_b - low_b, high_a - p_a),
                      estimate + math.hypot(high_b - p_b, p_a - low_a), p_value,
                      "two-proportion z-test, Newcombe CI")


def mcnemar_test(correct_a: np.ndarray, correct_b: np.ndarray, alpha: float) -> Difference:
    """Paired accuracy: McNemar's exact test on the discordant rows, Wald CI of the paired difference."""
    n = len(correct_a)
    if n < 1:
        raise NotTestable("no paired rows")
    b_only = int(np.sum(correct_b & ~correct_a))
    a_only = int(np.sum(correct_a & ~correct_b))
    discordant = a_only + b_only
    estimate = (b_only - a_only) / n
    p_value = float(stats.binomtest(b_only, discordant, 0.5).pvalue) if discordant else 1.0
    se = math.sqrt(max(discordant - (b_only - a_only) ** 2 / n, 0.0)) / n
    return _normal_difference(estimate, se, alpha, "McNemar exact test, Wald CI", p_value)


def delong_placements(y: np.ndarray, score: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components via midranks (Sun & Xu 2014): for each positive the share of
    negatives it outranks, for each negative the share of positives that outrank it (ties: one half)."""
    positives, negatives = score[y == 1], score[y == 0]
    m, n = len(positives), len(negatives)
    if m < 2 or n < 2:
        raise NotTestable(f"AUC needs at least two rows of each class (positives {m}, negatives {n})")
    ranks = stats.rankdata(np.concatenate([positives, negatives]))
    v10 = (ranks[:m] - stats.rankdata(positives)) / n
    v01 = 1.0 - (ranks[m:] - stats.rankdata(negatives)) / m
    return v10, v01


def delong_test(y_a: np.ndarray, score_a: np.ndarray, y_b: np.ndarray, score_b: np.ndarray,
                alpha: float) -> Difference:
    """DeLong test of AUC_b - AUC_a on independent samples."""
    auc_and_variance = []
    for y, score in ((y_a, score_a), (y_b, score_b)):
        v10, v01 = delong_placements(y, score)
        auc_and_variance.append((v10.mean(), v10.var(ddof=1) / len(v10) + v01.var(ddof=1) / len(v01)))
    (auc_a, var_a), (auc_b, var_b) = auc_and_variance
    return _normal_difference(float(auc_b - auc_a), math.sqrt(var_a + var_b), alpha, "DeLong test")


def delong_paired_test(y: np.ndarray, score_a: np.ndarray, score_b: np.ndarray, alpha: float) -> Difference:
    """DeLong test of AUC_b - AUC_a when both scored the same rows (correlated AUCs)."""
    (a10, a01), (b10, b01) = delong_placements(y, score_a), delong_placements(y, score_b)
    s = np.cov(np.vstack([a10, b10])) / len(a10) + np.cov(np.vstack([a01, b01])) / len(a01)
    variance = s[0, 0] + s[1, 1] - 2 * s[0, 1]
    return _normal_difference(float(b10.mean() - a10.mean()), math.sqrt(max(variance, 0.0)), alpha,
                              "paired DeLong test")


def welch_test(values_a: np.ndarray, values_b: np.ndarray, alpha: float) -> Difference:
    """Welch's t-test of mean(values_b) - mean(values_a), unequal variances."""
    if len(values_a) < 2 or len(values_b) < 2:
        raise NotTestable("Welch's t-test needs at least two rows per variant")
    estimate = float(values_b.mean() - values_a.mean())
    if values_a.var() == 0 and values_b.var() == 0:
        return _normal_difference(estimate, 0.0, alpha, "Welch t-test")
    result = stats.ttest_ind(values_b, values_a, equal_var=False)
    ci = result.confidence_interval(1 - alpha)
    return Difference(estimate, float(ci.low), float(ci.high), float(result.pvalue), "Welch t-test")


def paired_t_test(values_a: np.ndarray, values_b: np.ndarray, alpha: float) -> Difference:
    if len(values_a) < 2:
        raise NotTestable("a paired t-test needs at least two paired rows")
    differences = values_b - values_a
    estimate = float(differences.mean())
    if differences.var() == 0:
        return _normal_difference(estimate, 0.0, alpha, "paired t-test")
    result = stats.ttest_rel(values_b, values_a)
    ci = result.confidence_interval(1 - alpha)
    return Difference(estimate, float(ci.low), float(ci.high), float(result.pvalue), "paired t-test")


def error_rate_test(errors_a: int, requests_a: int, errors_b: int, requests_b: int) -> float:
    """One-sided Fisher exact p-value that B's error rate is higher than A's."""
    table = [[errors_b, requests_b - errors_b], [errors_a, requests_a - errors_a]]
    return float(stats.fisher_exact(table, alternative="greater").pvalue)


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


# --- command line -------------------------------------------------------------------------

def parse_time(text: str) -> float:
    """Unix seconds or ISO 8601 (a time without a zone is UTC)."""
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise argparse.ArgumentTypeError(f"'{text}' is not a time")
        return seconds
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is neither unix seconds nor an ISO 8601 time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return moment.timestamp()


def window(start: Optional[float], end: Optional[float], hours: Optional[float],
           now: Optional[float] = None) -> Tuple[Optional[float], Optional[float]]:
    if hours is None:
        return start, end
    if start is not None and end is not None:
        raise InputError("--window_hours with both --start and --end: give at most two of the three")
    if start is not None:
        return start, start + hours * 3600
    end = end if end is not None else (time.time() if now is None else now)
    return end - hours * 3600, end


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _metric_list(text: str) -> List[str]:
    return [] if text.strip() == "none" else [m.strip() for m in text.split(",") if m.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--log", default="build/prediction_log.sqlite",
                        help="the proxy's prediction log: a file path or sqlite: URL, or postgresql://user:pw@host/db")
    parser.add_argument("--labels", help="ground truth: CSV or JSON lines with request_id, label[, row]")
    parser.add_argument("--model", help="model name in the log (default: the only one in the window)")
    parser.add_argument("--a", default="stable", help="baseline variant (default: stable)")
    parser.add_argument("--b", default="canary", help="candidate variant (default: canary); "
                        f"with --include_shadow a shadow variant is '<name>{SHADOW_SUFFIX}'")
    parser.add_argument("--start", type=parse_time, help="window start: unix seconds or ISO 8601 (UTC if no zone)")
    parser.add_argument("--end", type=parse_time, help="window end (exclusive)")
    parser.add_argument("--window_hours", type=_positive(float), help="window length; ends at --end or now")
    parser.add_argument("--include_shadow", action="store_true",
                        help=f"add shadow answers as variants named '<variant>{SHADOW_SUFFIX}'")
    parser.add_argument("--primary", choices=sorted(HIGHER_IS_BETTER),
                        help="the metric that decides (default: auc binary, accuracy multiclass, rmse regression)")
    parser.add_argument("--guardrails", type=_metric_list,
                        help="metrics on which a significant loss is a NO-GO (Bonferroni over them), comma-separated, "
                             "or 'none' (default: every metric of the task but the primary)")
    parser.add_argument("--alpha", type=_positive(float), default=0.05, help="significance level (default 0.05)")
    parser.add_argument("--margin", type=float, default=0.01,
                        help="largest acceptable loss on the primary metric: absolute for accuracy/AUC, a share of "
                             "A's value for log_loss/rmse/mae (default 0.01)")
    parser.add_argument("--min_samples", type=_positive(int), default=200,
                        help="labelled rows per variant (paired: pairs) needed for a decision (default 200)")
    parser.add_argument("--classes", type=lambda s: [c.strip() for c in s.split(",")],
                        help="class names in id order, for labels naming classes the answers never showed")
    parser.add_argument("--json", help="also write the report as JSON here")
    args = parser.parse_args(argv)
    if not 0 < args.alpha < 1:
        parser.error(f"--alpha must be between 0 and 1, got {args.alpha}")
    if args.margin < 0:
        parser.error(f"--margin must be >= 0, got {args.margin}")
    try:
        start, end = window(args.start, args.end, args.window_hours)
        report = build_report(args.log, args.labels, args.model, args.a, args.b, start, end, args.include_shadow,
                              args.primary, args.alpha, args.margin, args.min_samples, args.classes,
                              args.guardrails)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return INPUT_ERROR_EXIT
    print(render(report))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nreport written to {args.json}")
    return report["decision"]["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
