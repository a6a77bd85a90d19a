"""Prediction log: every request and response the proxy answers, in SQLite (WAL) by default.

Schema (one row per client request; a shadow copy's answer is a second row):

    request_id    TEXT PRIMARY KEY   the proxy's id (X-Request-Id if the client sent one);
                                     a shadow answer is "<request_id>:shadow"
    ts            REAL               unix seconds when the proxy received the request
    model         TEXT               model name in the URL
    variant       TEXT               who answered: an A/B variant name, or "fallback"
    model_version INTEGER            the version that answered (NULL when unknown or fallback)
    shadow        INTEGER            1 for a shadow copy's answer (never returned to the client)
    api           TEXT               predict | classify | regress
    status        INTEGER            HTTP status returned
    latency_ms    REAL               proxy receipt to response, milliseconds
    routing_key   TEXT               the sticky key the split used (NULL if none)
    request       TEXT               the JSON body as received: raw features
    response      TEXT               the JSON body returned: outputs (or {"error": ...})

Durability, without putting the database on the request path: `log()` appends the record as one
JSON line to a spool segment (one write(2): survives a crash of the process) and queues it; a
writer thread inserts queued records in batches and deletes a spool segment once every record
in it is committed. At start, leftover segments are replayed (INSERT OR IGNORE: idempotent), so a
crash loses nothing that was acknowledged. The queue is bounded: when it is full, or the database
is unavailable, requests are still served, the records wait in the spool for the next start, and
the counts are reported (metrics below and `stats()`).

Production sink: the same records as JSON lines to a log shipper or Pub/Sub, loaded into
BigQuery (the `request`/`response` columns as JSON); `read_records` is the only reader the
monitoring jobs need, so a BigQuery reader with the same output replaces it.
"""

import collections
import glob
import json
import logging
import os
import sqlite3
import threading
import time
from typing import Any, Deque, Dict, Iterator, List, Optional

import prometheus_client as prom

COLUMNS = ("request_id", "ts", "model", "variant", "model_version", "shadow", "api", "status", "latency_ms",
           "routing_key", "request", "response")
SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    request_id TEXT PRIMARY KEY,
    ts REAL NOT NULL,
    model TEXT NOT NULL,
    variant TEXT NOT NULL,
    model_version INTEGER,
    shadow INTEGER NOT NULL DEFAULT 0,
    api TEXT NOT NULL,
    status INTEGER NOT NULL,
    latency_ms REAL NOT NULL,
    routing_key TEXT,
    request TEXT NOT NULL,
    response TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS predictions_ts ON predictions (ts);
"""
_INSERT = f"INSERT OR IGNORE INTO predictions ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
_SEGMENT_DONE = object()


def connect(path: str, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    db = sqlite3.connect(path, timeout=10, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a process crash loses no commit
    db.executescript(SCHEMA)
    return db


class PredictionLog:
    """Bounded, batched, crash-safe writer. log() is cheap and never raises."""

    def __init__(self, path: str, registry: Optional[prom.CollectorRegistry] = None, queue_size: int = 10000,
                 batch_size: int = 500, flush_seconds: float = 0.2, segment_records: int = 5000,
                 retry_seconds: float = 1.0):
        self.path = path
        self.spool_dir = path + ".spool"
        self.batch_size, self.flush_seconds = batch_size, flush_seconds
        self.segment_records, self.retry_seconds = segment_records, retry_seconds
        # A deque, not a queue.Queue: the writer wakes every flush_seconds and takes what is there,
        # so a request never pays for waking it (measured: a Condition.notify per record).
        self._queue: Deque[tuple] = collections.deque()
        self.queue_size = queue_size
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._counts = {"logged": 0, "written": 0, "deferred": 0, "lost": 0, "recovered": 0}
        self._last_error: Optional[str] = None
        registry = registry if registry is not None else prom.REGISTRY
        self._metric_written = prom.Counter("skewless_prediction_log_written", "Records committed to the store.",
                                            registry=registry)
        self._metric_deferred = prom.Counter(
            "skewless_prediction_log_deferred", "Records not written now (queue full or store unavailable); "
            "kept in the spool for the next start.", registry=registry)
        self._metric_lost = prom.Counter("skewless_prediction_log_lost",
                                         "Records neither written nor spooled (spool unwritable).", registry=registry)
        self._metric_queue = prom.Gauge("skewless_prediction_log_queue_depth", "Records waiting for the writer.",
                                        registry=registry)
        os.makedirs(self.spool_dir, exist_ok=True)
        self._recover()
        self._segment = max([self._segment_number(p) for p in self._segments()] + [0]) + 1
        self._first_segment = self._segment
        self._segment_fd: Optional[int] = None
        self._segment_count = 0
        self._segment_clean = True  # every record of the current segment reached the queue
        self._open_segment()
        self._thread = threading.Thread(target=self._write_loop, daemon=True, name="prediction-log")
        self._thread.start()

    # --- request path ----------------------------------------------------------------------
    def log(self, record: Dict[str, Any]) -> None:
        row = tuple(record.get(c) for c in COLUMNS)
        line = (json.dumps(dict(zip(COLUMNS, row))) + "\n").encode()
        with self._lock:
            self._counts["logged"] += 1
            try:
                if self._segment_fd is None:
                    raise OSError("the prediction log is closed")
                os.write(self._segment_fd, line)  # one append: on disk (page cache) before we answer
            except OSError as e:
                self._counts["lost"] += 1
                self._metric_lost.inc()
                self._last_error = f"spool: {e}"
                spooled = False
            else:
                spooled = True
                self._segment_count += 1
            if len(self._queue) < self.queue_size:
                self._queue.append(row)
            else:
                self._segment_clean = False  # keep this segment: it holds records the writer never saw
                if spooled:
                    self._counts["deferred"] += 1
                    self._metric_deferred.inc()
            if self._segment_count >= self.segment_records:
                self._rotate()

    # --- segments --------------------------------------------------------------------------
    def _segments(self) -> List[str]:
        return sorted(glob.glob(os.path.join(self.spool_dir, "segment-*.jsonl")), key=self._segment_number)

    @staticmethod
    def _segment_number(path: str) -> int:
        return int(os.path.basename(path)[len("segment-"):-len(".jsonl")])

    def _segment_path(self, number: int) -> str:
        return os.path.join(self.spool_dir, f"segment-{number:09d}.jsonl")

    def _open_segment(self) -> None:
        self._segment_fd = os.open(self._segment_path(self._segment), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._segment_count, self._segment_clean = 0, True

    def _rotate(self) -> None:
        """Under self._lock: close the segment; the writer deletes it after committing what precedes the marker."""
        os.close(self._segment_fd)
        done = (self._segment, self._segment_clean)
        self._segment += 1
        self._open_segment()
        self._queue.append((_SEGMENT_DONE, done))  # markers are few: not bounded

    def _recover(self) -> None:
        """Replays spool segments a previous process left (it crashed, or its store was down)."""
        segments = self._segments()
        if not segments:
            return
        rows = []
        for path in segments:
            with open(path, "rb") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except ValueError:  # a torn last line from a crash mid-write: it was never acknowledged
                        continue
                    rows.append(tuple(record.get(c) for c in COLUMNS))
        try:
            db = connect(self.path)
            with db:
                before = db.total_changes
                db.executemany(_INSERT, rows)
                self._counts["recovered"] = db.total_changes - before
            db.close()
        except sqlite3.Error as e:
            self._last_error = f"recovery: {e}"
            logging.error("prediction log: cannot replay %d spooled records into %s: %s (kept in %s)",
                          len(rows), self.path, e, self.spool_dir)
            return
        for path in segments:
            os.remove(path)
        logging.info("prediction log: replayed %d spooled records, %d were not yet in %s",
                     len(rows), self._counts["recovered"], self.path)

    # --- writer ----------------------------------------------------------------------------
    def _write_loop(self) -> None:
        db = None
        pending: List[tuple] = []
        finished_segments: List[tuple] = []
        while True:
            stopping = self._stop.is_set()
            if not pending and not stopping:
                self._stop.wait(self.flush_seconds)
            while len(pending) < self.batch_size:
                try:
                    item = self._queue.popleft()
                except IndexError:
                    break
                if isinstance(item, tuple) and item and item[0] is _SEGMENT_DONE:
                    finished_segments.append(item[1])
                    if not pending:
                        self._delete_finished(finished_segments)
                    continue
                pending.append(item)
            self._metric_queue.set(len(self._queue))
            if pending:
                try:
                    db = db or connect(self.path)
                    with db:
                        db.executemany(_INSERT, pending)
                except sqlite3.Error as e:
                    self._last_error = f"store: {e}"
                    logging.error("prediction log: %s unavailable (%s); %d records wait in the spool",
                                  self.path, e, len(pending))
                    db = None
                    if stopping:
                        self._defer(pending)
                        pending = []
                        break
                    self._stop.wait(self.retry_seconds)
                    continue
                with self._lock:
                    self._counts["written"] += len(pending)
                self._metric_written.inc(len(pending))
                pending = []
                self._delete_finished(finished_segments)
            elif stopping:
                break
        self._defer(list(self._drain()))
        if db is not None:
            db.close()

    def _drain(self) -> Iterator[tuple]:
        while True:
            try:
                item = self._queue.popleft()
            except IndexError:
                return
            if not (isinstance(item, tuple) and item and item[0] is _SEGMENT_DONE):
                yield item

    def _defer(self, rows: List[tuple]) -> None:
        if rows:
            with self._lock:
                self._counts["deferred"] += len(rows)
            self._metric_deferred.inc(len(rows))

    def _delete_finished(self, finished: List[tuple]) -> None:
        while finished:
            number, clean = finished.pop(0)
            if clean:
                try:
                    os.remove(self._segment_path(number))
                except OSError:
                    pass

    # --- lifecycle -------------------------------------------------------------------------
    def close(self, timeout: float = 30.0) -> Dict[str, Any]:
        """Graceful stop: everything queued is written (or left in the spool, counted); returns stats()."""
        self._stop.set()
        self._thread.join(timeout)
        with self._lock:
            if self._segment_fd is not None:
                os.close(self._segment_fd)
                self._segment_fd = None
                late = [r for r in self._drain()]  # logged after the writer's last look: spooled only
                if late:
                    self._counts["deferred"] += len(late)
                    self._metric_deferred.inc(len(late))
                if self._counts["deferred"] == 0 and self._counts["lost"] == 0 and self._segment_clean:
                    # Everything this process logged is committed: no segment needs to survive it.
                    for path in self._segments():
                        if self._segment_number(path) >= self._first_segment:
                            os.remove(path)
        stats = self.stats()
        if stats["deferred"] or stats["lost"]:
            logging.error("prediction log: %d records deferred to the spool, %d lost (%s)",
                          stats["deferred"], stats["lost"], stats["last_error"])
        return stats

    def stats(self) -> Dict[str, Any]:
        with self._lock:
            return {**self._counts, "queued": len(self._queue), "last_error": self._last_error}


def read_records(path: str, start: Optional[float] = None, end: Optional[float] = None,
                 model: Optional[str] = None, include_shadow: bool = False) -> Iterator[Dict[str, Any]]:
    """Records with start <= ts < end, oldest first; request/response decoded from JSON."""
    where, args = ["1=1"], []
    if start is not None:
        where.append("ts >= ?")
        args.append(start)
    if end is not None:
        where.append("ts < ?")
        args.append(end)
    if model is not None:
        where.append("model = ?")
        args.append(model)
    if not include_shadow:
        where.append("shadow = 0")
    db = connect(path, readonly=True)
    try:
        for row in db.execute(f"SELECT {', '.join(COLUMNS)} FROM predictions WHERE {' AND '.join(where)} "
                              "ORDER BY ts, request_id", args):
            record = dict(zip(COLUMNS, row))
            # A body that was not JSON (the client's mistake, answered 400) is logged as sent: None here.
            record["request"], record["response"] = _decode(record["request"]), _decode(record["response"])
            yield record
    finally:
        db.close()


def _decode(text: Optional[str]) -> Any:
    try:
        return json.loads(text) if text is not None else None
    except ValueError:
        return None


def instances(request: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The rows of a logged :predict body (`instances` rows or `inputs` columns) as feature dicts."""
    if not isinstance(request, dict):
        return []
    if "instances" in request:
        return [dict(r) for r in request["instances"] if isinstance(r, dict)]
    inputs = request.get("inputs")
    if isinstance(inputs, dict) and inputs:
        n = max(len(v) if isinstance(v, list) else 1 for v in inputs.values())
        return [{k: (v[i] if isinstance(v, list) else v) for k, v in inputs.items()
                 if not isinstance(v, list) or i < len(v)} for i in range(n)]
    if "examples" in request:  # :classify / :regress
        context = request.get("context", {})
        return [{**context, **e} for e in request["examples"] if isinstance(e, dict)]
    return []
