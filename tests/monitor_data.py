"""Served traffic for the monitor's tests: taxi rows sent the way clients send them, logged the
way the proxy logs them (serving/logstore.py's table), without a proxy or a model."""

import json
import random
from typing import Any, Dict, Iterable, List, Sequence, Tuple

from serving import logstore
from tests.conftest import read_rows, taxi_csv_path

TRAINING_ROWS = 10000
HOUR = 3600.0
# Two adjacent one-hour windows: "previous" then "current".
PREVIOUS_START = 1_700_000_000.0
CURRENT_START = PREVIOUS_START + HOUR
CURRENT_END = CURRENT_START + HOUR


def split_rows(spec, seed: int = 0) -> Tuple[List[Dict[str, str]], List[Dict[str, str]], List[Dict[str, str]]]:
    """(training, previous window, current window): disjoint random draws of the taxi CSV.

    Random, because the CSV is stored in blocks (its first and last 5,000 rows differ in
    pickup_community_area by 13 points): a slice of it would be real drift, not a clean replay."""
    rows = read_rows(taxi_csv_path(spec))
    random.Random(seed).shuffle(rows)
    rest = rows[TRAINING_ROWS:]
    half = len(rest) // 2
    return rows[:TRAINING_ROWS], rest[:half], rest[half:]


def shifted(rows: Iterable[Dict[str, str]]) -> List[Dict[str, str]]:
    """Payment mix inverted (Cash <-> Credit Card) and fares tripled."""
    swap = {"Cash": "Credit Card", "Credit Card": "Cash"}
    out = []
    for row in rows:
        row = dict(row, payment_type=swap.get(row["payment_type"], row["payment_type"]))
        if row["fare"] != "":
            row["fare"] = repr(float(row["fare"]) * 3)
        out.append(row)
    return out


def as_instances(rows: Sequence[Dict[str, str]], spec) -> List[Dict[str, Any]]:
    """CSV rows as clients' JSON rows: ints as JSON numbers (every third as 5.0, since the model
    takes float64), and a missing value left out, or sent as "" (string) / NaN (number)."""
    out = []
    for i, row in enumerate(rows):
        instance = {}
        for name, feature in spec.features.items():
            text = row[name]
            if text == "":
                if i % 2:
                    instance[name] = "" if feature.type == "string" else float("nan")
                continue
            if feature.type == "int":
                instance[name] = float(int(text)) if i % 3 == 0 else int(text)
            elif feature.type == "float":
                instance[name] = float(text)
            else:
                instance[name] = text
        out.append(instance)
    return out


def _inputs_body(instances: List[Dict[str, Any]]) -> str:
    """TF Serving's `inputs` form: one list per feature; a value a row left out goes as null."""
    names = sorted({k for r in instances for k in r})
    return json.dumps({"inputs": {n: [r.get(n) for r in instances] for n in names}})


def log_records(instances: Sequence[Dict[str, Any]], start: float, end: float, model: str = "taxi",
                batch: int = 10, status: int = 200, shadow: int = 0, prefix: str = "r") -> List[tuple]:
    """Rows of the predictions table: `batch` instances per request, spread over [start, end)."""
    chunks = [list(instances[i:i + batch]) for i in range(0, len(instances), batch)]
    records = []
    for n, chunk in enumerate(chunks):
        ts = start + (end - start) * n / max(len(chunks), 1)
        # Every seventh request in the `inputs` form.
        request = _inputs_body(chunk) if n % 7 == 3 else json.dumps({"instances": chunk})
        response = json.dumps({"predictions": [[0.5] for _ in chunk]} if status == 200 else {"error": "x"})
        record = {"request_id": f"{prefix}{n}" + (":shadow" if shadow else ""), "client_request_id": None,
                  "ts": ts, "model": model, "variant": "a", "model_version": 1, "shadow": shadow, "api": "predict",
                  "status": status, "latency_ms": 3.0, "routing_key": None, "request": request, "response": response}
        records.append(tuple(record.get(c) for c in logstore.COLUMNS))
    return records


def write_log(url: str, records: Iterable[tuple]) -> str:
    """The records into the log at url (a SQLite path or a PostgreSQL URL); returns url."""
    records = list(records)
    with logstore.open_store(url) as store:
        assert store.insert(records) == len(records), "two records share a request_id: the store keeps one"
    return url
