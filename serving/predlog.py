"""Prediction log writer: every request and response the proxy answers, kept exactly under faults.

The records and where they are stored (SQLite by default, PostgreSQL for several replicas, by
URL) belong to serving/logstore.py; this module is the proxy's writer in front of it.

Path of one record. `log()` runs on the request path, before the answer leaves:
  1. it appends the record as one JSON line to the current spool segment (one write(2) to a
     descriptor this writer opened and still owns: a crash of the process loses nothing
     acknowledged), and
  2. it queues the record for the writer thread, which inserts queued records in batches and
     deletes a spool segment once nothing in it waits.
Neither step ever raises into the request: the answer is sent whatever the storage does.

Exact accounting. Every record this process receives is, at every moment, in exactly one of
    written   committed to the store (by this process);
    queued    in memory, waiting for the writer;
    deferred  not queued (the queue was full, or the writer gave up at a stop with the store down),
              but whole in a spool segment: replayed into the store once it answers again (in
              this process, or the next one at start);
    lost      neither queued nor spooled (spool unwritable or full and the queue full, or the
              store down at a stop): counted once, here and in skewless_prediction_log_lost.
so `received == written + queued + deferred + lost` always holds, and after a graceful stop
with the store up, `received == written + lost`. Torn spool lines (a crash mid-write, or a
short write when the disk filled) are skipped at replay and counted in `torn`: never fatal,
never an acknowledged record (a record whose line was cut short stays queued).

The spool never writes to a descriptor it does not own: a segment that cannot be rotated
leaves the writer without a segment (records go to the queue alone) until a new one opens.
The memory the queue may hold is bounded by records and by bytes.
"""

import collections
import glob
import json
import logging
import os
import threading
import time
from typing import Any, Deque, Dict, List, Optional, Tuple

import prometheus_client as prom

from serving import logstore
from serving.logstore import COLUMNS, instances, read_records  # noqa: F401  (the log's readers import them here)


class _Segment:
    """Bookkeeping of one spool segment: records in it still queued, records only in it (deferred)."""

    __slots__ = ("number", "queued", "deferred", "closed", "torn")

    def __init__(self, number: int):
        self.number, self.queued, self.deferred, self.closed, self.torn = number, 0, 0, False, False


class PredictionLog:
    """Bounded, batched, crash-safe writer in front of a logstore URL. log() is cheap and never raises."""

    def __init__(self, url: str, registry: Optional[prom.CollectorRegistry] = None, queue_size: int = 10000,
                 queue_bytes: int = 256 * 1024 * 1024, batch_size: int = 1000, flush_seconds: float = 0.5,
                 segment_records: int = 5000, retry_seconds: float = 1.0, spool_dir: Optional[str] = None):
        self.url = url
        self.spool_dir = spool_dir or _default_spool(url)
        self.batch_size, self.flush_seconds = batch_size, flush_seconds
        self.segment_records, self.retry_seconds = segment_records, retry_seconds
        self.queue_size, self.queue_bytes = queue_size, queue_bytes
        # A deque, not a queue.Queue: the writer wakes every flush_seconds and takes what is there,
        # so a request never pays for waking it. Waking seldom, with big batches, is what keeps the
        # writer's cost low (it shares the GIL with the request path): 0.2 s and 500 rows cost it 17-20 us
        # of CPU per record at 400 records/s here, 1 s and 2000 rows 10-13 us. A record is in the spool
        # before it is queued, so the wait risks nothing.
        self._queue: Deque[Tuple[tuple, Optional[_Segment], int]] = collections.deque()
        self._queued_bytes = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._counts = {"received": 0, "written": 0, "deferred": 0, "lost": 0, "recovered": 0, "torn": 0}
        self._problems: Dict[str, str] = {}  # part ("spool", "store") -> the last error while it is failing
        self._last_error: Optional[str] = None
        self._closed = False
        self._in_writer = 0  # records the writer has taken from the queue and not yet committed
        registry = registry if registry is not None else prom.REGISTRY
        self._m_received = prom.Counter("skewless_prediction_log_received", "Records the proxy asked to log "
                                        "(one per answer, shadow answers included).", registry=registry)
        self._m_written = prom.Counter("skewless_prediction_log_written", "Records committed to the store "
                                       "(replayed spool records included).", registry=registry)
        self._m_lost = prom.Counter("skewless_prediction_log_lost", "Records neither stored nor spooled "
                                    "(spool unwritable or full while the queue was full), each counted once.",
                                    registry=registry)
        self._m_torn = prom.Counter("skewless_prediction_log_torn_lines", "Spool lines skipped at replay "
                                    "(cut short by a crash or a full disk; never an acknowledged record).",
                                    registry=registry)
        self._m_deferred = prom.Gauge("skewless_prediction_log_deferred", "Records only in the spool, waiting "
                                      "for the store.", registry=registry)
        self._m_queue = prom.Gauge("skewless_prediction_log_queue_depth", "Records waiting for the writer.",
                                   registry=registry)
        self._m_healthy = prom.Gauge("skewless_prediction_log_healthy", "1 while the part works, 0 while it fails.",
                                     ["part"], registry=registry)
        for part in ("spool", "store"):
            self._m_healthy.labels(part).set(1)
        self._segments: Dict[int, _Segment] = {}
        self._current: Optional[_Segment] = None
        self._fd: Optional[int] = None
        self._next_segment = 1
        self._old_segments: List[str] = []  # left by an earlier process: replayed by the writer
        try:
            os.makedirs(self.spool_dir, exist_ok=True)
            self._old_segments = self._segment_files()
            self._next_segment = max([_segment_number(p) for p in self._old_segments] + [0]) + 1
        except OSError as e:  # served anyway: records go to the queue alone until the spool opens
            self._problem("spool", f"{self.spool_dir}: {e}")
            logging.error("prediction log: no crash spool, the directory %s cannot be created (%s). Requests are "
                          "answered, but their records wait in memory only: a crash loses them, and past %d "
                          "they are counted lost. Fix: set PREDLOG_SPOOL_DIR (a postgresql:// log) to a "
                          "writable folder on a mounted volume, or keep a sqlite:// log's file in a writable "
                          "folder (its spool is beside it).", self.spool_dir, e, queue_size)
        with self._lock:
            self._open_segment()
        self._thread = threading.Thread(target=self._write_loop, daemon=True, name="prediction-log")
        self._thread.start()

    # --- request path ----------------------------------------------------------------------
    def log(self, record: Dict[str, Any]) -> None:
        row = tuple(record.get(c) for c in COLUMNS)
        line = (json.dumps(dict(zip(COLUMNS, row))) + "\n").encode()
        with self._lock:
            self._counts["received"] += 1
            self._m_received.inc()
            if self._closed:
                self._lose(1, "the prediction log is closed")
                return
            refused = logstore.refusal(row)
            if refused:  # would fail every batch it joined: counted now, never queued
                self._lose(1, refused)
                return
            segment = self._spool(line)
            # The bound is on every record held in memory: the queue and the batch the writer took from it
            # (a failing store keeps that batch), so PREDLOG_QUEUE_SIZE is what it says, not it + batch_size.
            held = len(self._queue) + self._in_writer
            if held < self.queue_size and self._queued_bytes + len(line) <= self.queue_bytes:
                self._queue.append((row, segment, len(line)))
                self._queued_bytes += len(line)
                if segment is not None:
                    segment.queued += 1
            elif segment is not None:  # whole in the spool: replayed once the writer catches up
                segment.deferred += 1
                self._counts["deferred"] += 1
                self._m_deferred.inc()
            else:
                self._lose(1, self._problems.get("spool", "the queue is full"))
            if self._current is not None and self._current.queued + self._current.deferred >= self.segment_records:
                self._close_segment()

    def _spool(self, line: bytes) -> Optional[_Segment]:
        """Under the lock: the segment now holding the whole line, or None."""
        if self._fd is None:
            self._open_segment()
            if self._fd is None:
                return None
        segment = self._current
        try:
            written = os.write(self._fd, line)
        except OSError as e:
            self._problem("spool", f"{self._segment_path(segment.number)}: {e}")
            segment.torn = True  # a failed append may have left part of the line
            self._close_segment()
            return None
        if written != len(line):  # a short write (file-size limit, full disk): the tail of the line is missing
            self._problem("spool", f"{self._segment_path(segment.number)}: short write ({written} of "
                                   f"{len(line)} bytes)")
            segment.torn = True
            self._close_segment()
            return None
        self._healthy("spool")
        return segment

    # --- segments --------------------------------------------------------------------------
    def _segment_files(self) -> List[str]:
        return sorted(glob.glob(os.path.join(self.spool_dir, "segment-*.jsonl")), key=_segment_number)

    def _segment_path(self, number: int) -> str:
        return os.path.join(self.spool_dir, f"segment-{number:09d}.jsonl")

    def _open_segment(self) -> None:
        """Under the lock. On failure there is no current segment (and no descriptor), never a stale one."""
        self._fd, self._current = None, None
        number = self._next_segment
        try:
            os.makedirs(self.spool_dir, exist_ok=True)
            fd = os.open(self._segment_path(number), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except OSError as e:
            self._problem("spool", f"{self._segment_path(number)}: {e}")
            return
        self._next_segment += 1
        self._fd, self._current = fd, _Segment(number)
        self._segments[number] = self._current

    def _close_segment(self) -> None:
        """Under the lock: the current segment takes no more lines; the next log() opens a new one."""
        fd, segment = self._fd, self._current
        self._fd, self._current = None, None  # forget the number before closing it: it may be reused at once
        if segment is not None:
            segment.closed = True
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def _finished(self) -> List[_Segment]:
        """Under the lock: closed segments with nothing waiting in them (their files can go)."""
        return [s for s in self._segments.values() if s.closed and s.queued == 0 and s.deferred == 0]

    def _to_replay(self) -> List[_Segment]:
        """Under the lock: closed segments whose queued records are all done but that hold deferred ones."""
        return [s for s in self._segments.values() if s.closed and s.queued == 0 and s.deferred > 0]

    def _remove(self, segments: List[_Segment]) -> None:
        for segment in segments:
            try:
                os.remove(self._segment_path(segment.number))
            except FileNotFoundError:
                pass
            except OSError as e:  # an immutable or read-only spool: kept, tried again later
                self._problem("spool", f"{self._segment_path(segment.number)}: cannot remove ({e})")
                continue
            with self._lock:
                self._segments.pop(segment.number, None)

    def _read_segment(self, path: str) -> Tuple[List[tuple], int]:
        """The whole records of a segment file, and how many lines were torn or not records."""
        rows, torn = [], 0
        with open(path, "rb") as f:
            for line in f:
                try:
                    record = json.loads(line)
                    if not isinstance(record, dict) or not record.get("request_id"):
                        raise ValueError("not a record")
                except ValueError:
                    torn += 1
                    continue
                rows.append(tuple(record.get(c) for c in COLUMNS))
        return rows, torn

    def _count_torn(self, torn: int, path: str) -> None:
        if torn:
            with self._lock:
                self._counts["torn"] += torn
            self._m_torn.inc(torn)
            logging.warning("prediction log: %d torn line(s) skipped in %s", torn, path)

    # --- writer ----------------------------------------------------------------------------
    def _write_loop(self) -> None:
        store: Optional[logstore.Store] = None
        pending: List[Tuple[tuple, Optional[_Segment], int]] = []
        next_try = 0.0
        while True:
            stopping = self._stop.is_set()
            if not pending and not stopping and len(self._queue) < self.batch_size:  # behind: no pause
                self._stop.wait(self.flush_seconds)
            with self._lock:
                while len(pending) < self.batch_size and self._queue:
                    pending.append(self._queue.popleft())
                self._in_writer = len(pending)
                self._m_queue.set(len(self._queue) + len(pending))
                if store is not None and self._current is not None and self._current.deferred:
                    self._close_segment()  # the store answers again: replay what waited, do not wait for rotation
            work = pending or self._old_segments or self._to_replay_now()
            if work and store is None and (time.monotonic() >= next_try or stopping):
                try:
                    store = logstore.open_store(self.url)
                    self._healthy("store")
                except (logstore.StoreError, ValueError) as e:
                    self._problem("store", str(e))
                    next_try = time.monotonic() + self.retry_seconds
            if store is not None:
                try:
                    if pending:
                        inserted = store.insert([item[0] for item in pending])
                        self._committed(pending, inserted)
                        pending = []
                        self._in_writer = 0
                    self._replay(store)
                    self._healthy("store")
                except logstore.StoreError as e:
                    self._problem("store", str(e))
                    logging.error("prediction log: %s (%d records wait)", e, len(pending) + len(self._queue))
                    _close_quietly(store)
                    store, next_try = None, time.monotonic() + self.retry_seconds
            if stopping and (store is None or not (pending or self._queue or self._to_replay_now())):
                with self._lock:
                    rest = pending + list(self._queue)
                    self._queue.clear()
                    self._queued_bytes = 0
                    self._in_writer = 0
                self._give_up(rest)
                break
            if pending and store is None and not stopping:
                self._stop.wait(min(self.retry_seconds, max(0.0, next_try - time.monotonic())))
        if store is not None:
            _close_quietly(store)

    def _to_replay_now(self) -> bool:
        with self._lock:
            return bool(self._to_replay())

    def _committed(self, items: List[Tuple[tuple, Optional[_Segment], int]], inserted: int) -> None:
        with self._lock:
            self._counts["written"] += inserted
            self._queued_bytes -= sum(item[2] for item in items)
            for _, segment, _ in items:
                if segment is not None:
                    segment.queued -= 1
            duplicates = len(items) - inserted  # an id already stored: this record is not in the log
            if duplicates:
                self._lose(duplicates, "duplicate request_id")
            finished = self._finished()
        self._m_written.inc(inserted)
        self._remove(finished)

    def _replay(self, store: "logstore.Store") -> None:
        """Spool segments with records the store has not seen: an earlier process's, then this one's deferred."""
        while self._old_segments:
            path = self._old_segments[0]
            rows, torn = self._read_segment(path)
            inserted = store.insert(rows) if rows else 0  # idempotent: what was already stored is skipped
            self._count_torn(torn, path)
            with self._lock:
                self._counts["recovered"] += inserted
            self._m_written.inc(inserted)
            try:
                os.remove(path)
            except OSError as e:
                self._problem("spool", f"{path}: cannot remove ({e})")
            self._old_segments.pop(0)
            logging.info("prediction log: replayed %s: %d records, %d new", os.path.basename(path), len(rows),
                         inserted)
        with self._lock:
            segments = self._to_replay()
        for segment in segments:
            path = self._segment_path(segment.number)
            rows, torn = self._read_segment(path)
            inserted = store.insert(rows) if rows else 0  # the segment's queued records are stored already
            self._count_torn(torn, path)
            with self._lock:
                self._counts["written"] += inserted
                self._counts["deferred"] -= segment.deferred
                self._m_deferred.dec(segment.deferred)
                if inserted < segment.deferred:  # cannot happen unless the file was altered
                    self._lose(segment.deferred - inserted, f"{path}: records missing at replay")
                segment.deferred = 0
            self._m_written.inc(inserted)
            self._remove([segment])

    def _give_up(self, items: List[Tuple[tuple, Optional[_Segment], int]]) -> None:
        """At a stop with the store down: spooled records wait for the next start, the others are lost."""
        with self._lock:
            lost = 0
            for _, segment, _ in items:
                if segment is not None:
                    segment.queued -= 1
                    segment.deferred += 1
                    self._counts["deferred"] += 1
                    self._m_deferred.inc()
                else:
                    lost += 1
            if lost:
                self._lose(lost, self._problems.get("store", "the store is unavailable"))
            self._m_queue.set(0)

    # --- health ----------------------------------------------------------------------------
    def _problem(self, part: str, message: str) -> None:
        if self._problems.get(part) != message:
            logging.error("prediction log %s: %s", part, message)
        self._problems[part] = message
        self._last_error = f"{part}: {message}"
        self._m_healthy.labels(part).set(0)

    def _healthy(self, part: str) -> None:
        if self._problems.pop(part, None) is not None:
            logging.info("prediction log %s works again", part)
            self._m_healthy.labels(part).set(1)

    def _lose(self, n: int, why: str) -> None:
        self._counts["lost"] += n
        self._m_lost.inc(n)
        self._last_error = f"lost: {why}"

    # --- lifecycle -------------------------------------------------------------------------
    def flush(self, timeout: float = 30.0) -> bool:
        """Waits until nothing is queued or deferred (True), or the timeout passes (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                idle = not self._queue and self._counts["deferred"] == 0 and not self._old_segments
            if idle and self._in_writer == 0:
                return True
            time.sleep(0.05)
        return False

    def close(self, timeout: float = 30.0) -> Dict[str, Any]:
        """Graceful stop: everything queued is written (or left in the spool, counted); returns stats()."""
        with self._lock:
            self._closed = True
            if self._current is not None:
                self._close_segment()
        self._stop.set()
        self._thread.join(timeout)
        with self._lock:
            finished = self._finished()
        self._remove(finished)
        stats = self.stats()
        if stats["deferred"] or stats["lost"]:
            logging.error("prediction log: %d records deferred to the spool, %d lost (%s)",
                          stats["deferred"], stats["lost"], stats["last_error"])
        return stats

    def stats(self) -> Dict[str, Any]:
        with self._lock:
            return {**self._counts, "queued": len(self._queue) + self._in_writer, "last_error": self._last_error,
                    "replay_pending": len(self._old_segments),
                    "state": "degraded" if self._problems else "ok", "problems": dict(self._problems)}


def _segment_number(path: str) -> int:
    return int(os.path.basename(path)[len("segment-"):-len(".jsonl")])


def _default_spool(url: str) -> str:
    """Beside a SQLite file; for a database URL, under $PREDLOG_SPOOL_DIR (default build/prediction_log.spool)."""
    where = logstore.masked_url(url)
    if where.startswith("sqlite://"):
        return where[len("sqlite://"):] + ".spool"
    return os.environ.get("PREDLOG_SPOOL_DIR", os.path.join("build", "prediction_log.spool"))


def _close_quietly(store: "logstore.Store") -> None:
    try:
        store.close()
    except Exception:  # closing a broken connection: nothing left to do
        pass
