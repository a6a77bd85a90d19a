"""What a person sees while a run goes: one line per component as it ends (read from ML Metadata),
a progress line for a long one, our own warnings once, and a failure printed once, cause first;
everything else a run prints (libraries, absl, TensorFlow's C++ start-up lines, Beam) goes to the
run's log file under build/logs/. The local runner opens a Console around the run and a
ProgressWatcher around the orchestrator; neither knows which orchestrator it is.
"""

import logging
import os
import sys
import threading
import time
from typing import Dict, Optional

from components import feature_spec
from pipelines import mlmd


class ProgressWatcher(threading.Thread):
    """Prints one line per component when it ends (state and elapsed seconds), read from ML Metadata.

    MLMD is the run's own record (cached components included), so the timings here are
    the ones the summary reports, not a parse of log lines. A component still running after
    `still_every` seconds gets a progress line: rewritten in place on a terminal, a new line
    every `still_every` seconds otherwise (a file or a pipe keeps no carriage returns).
    """

    def __init__(self, connection_config, stream=sys.stdout, interval: float = 0.5, still_every: float = 60.0):
        super().__init__(daemon=True)
        self.connection_config, self.stream, self.interval = connection_config, stream, interval
        self.still_every = still_every
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.started_ms = int(time.time() * 1000)
        self.stop_event = threading.Event()
        self.seen: Dict[int, str] = {}
        self.seconds: Dict[str, float] = {}
        self.order = []
        self.failed: Optional[str] = None  # the first component that failed
        self.reported_still: Dict[int, int] = {}  # execution id -> progress lines printed (not on a TTY)
        self.spinning = False
        self.store = None  # one connection for every poll: opening one costs more than the queries

    def run(self):
        while not self.stop_event.wait(self.interval):
            self.poll()

    def stop(self):
        self.stop_event.set()
        self.join()
        self.poll(final=True)

    def __enter__(self) -> "ProgressWatcher":
        self.start()
        return self

    def __exit__(self, *exc) -> None:  # the components' last lines are printed before what follows the run
        self.stop()

    def _write(self, text: str, end: str = "\n") -> None:
        if self.spinning:  # a progress line is on screen: overwrite it
            text, self.spinning = "\r\x1b[K" + text, False
        self.stream.write(text + end)
        self.stream.flush()

    def poll(self, final: bool = False):
        try:
            if self.store is None:
                self.store = mlmd.store_for(self.connection_config)
            store = self.store
            run = mlmd.latest_run(store, since_ms=self.started_ms)
            if run is None:
                return
            running = []
            for e, node, state in mlmd.run_executions(store, run):
                if e.id not in self.seen:
                    self.seen[e.id] = "NEW"
                    self.order.append(node)
                if state in ("COMPLETE", "CACHED", "FAILED", "CANCELED") and self.seen[e.id] == "NEW":
                    self.seen[e.id] = state
                    self.seconds[node] = (e.last_update_time_since_epoch - e.create_time_since_epoch) / 1000
                    if state == "FAILED" and self.failed is None:
                        self.failed = node
                    mark = {"COMPLETE": "done", "CACHED": "cached"}.get(state, state)
                    self._write(f"  {node:<30} {mark:>8} {self.seconds[node]:7.1f} s")
                elif self.seen[e.id] == "NEW":
                    running.append((e, node))
            if running and not final:
                self._progress(*running[-1])
        except Exception as e:  # progress is a convenience: never let it break a run
            self.store = None  # the next poll connects again
            logging.debug("progress poll failed: %s", e)

    def _progress(self, execution, node: str) -> None:
        elapsed = time.time() - execution.create_time_since_epoch / 1000
        if self.tty:
            if elapsed >= 2:
                self._write(f"  {node:<30} {'running':>8} {elapsed:7.0f} s", end="")
                self.spinning = True
        elif elapsed >= self.still_every * (self.reported_still.get(execution.id, 0) + 1):
            self.reported_still[execution.id] = self.reported_still.get(execution.id, 0) + 1
            self._write(f"  {node:<30} {'running':>8} {elapsed:7.0f} s")


class ConsoleWarnings(logging.Handler):
    """Shows each distinct warning our own code logs (components/, pipelines/, ...) once on the console;
    the libraries' warnings stay in the log file, and so do errors: one that ends the run is printed
    once, as the run's failure."""

    OWN = tuple(os.path.join(feature_spec.REPO_ROOT, room) + os.sep for room in ("components", "pipelines", "ops",
                                                                                 "serving"))

    def __init__(self, stream):
        super().__init__(logging.WARNING)
        self.stream, self.shown = stream, set()

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno != logging.WARNING or not record.pathname.startswith(self.OWN):
            return
        message = record.getMessage()
        if message not in self.shown:
            self.shown.add(message)
            clear = "\r\x1b[K" if self.stream.isatty() else ""  # over a progress line being rewritten
            self.stream.write(f"{clear}  warning: {message}\n")
            self.stream.flush()


class Console:
    """The run's terminal: while open, file descriptors 1 and 2 (every library's prints, absl,
    TensorFlow's C++ lines such as the CUDA-factory errors at import, Beam's workers) go to the
    run's log file; progress, warnings and the failure go to `out`, a copy of the real stdout."""

    def __init__(self, log_path: str, quiet: bool):
        self.log_path, self.quiet = log_path, quiet

    def __enter__(self) -> "Console":
        sys.stdout.flush()
        sys.stderr.flush()
        self.saved = os.dup(1), os.dup(2)
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        # Python-level streams too: a test runner or an embedding program may have replaced them.
        self.streams = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = self.log_stream = os.fdopen(os.dup(1), "w", buffering=1)
        self.out = open(os.devnull, "w") if self.quiet else os.fdopen(os.dup(self.saved[0]), "w", buffering=1)
        self.err = self.out if self.quiet else os.fdopen(os.dup(self.saved[1]), "w", buffering=1)
        log_file = logging.FileHandler(self.log_path, mode="a")
        log_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        self.saved_root = root.level, list(root.handlers)
        root.handlers = [log_file, ConsoleWarnings(self.out)]
        root.setLevel(logging.INFO)
        logging.captureWarnings(True)  # Python warnings (deprecations) into the log
        return self

    def __exit__(self, *exc) -> None:
        root = logging.getLogger()
        for handler in root.handlers:
            handler.close()
        root.setLevel(self.saved_root[0])
        root.handlers = self.saved_root[1]
        logging.captureWarnings(False)
        sys.stdout, sys.stderr = self.streams  # log_stream stays open: a handler made meanwhile may hold it
        for fd, saved in zip((1, 2), self.saved):
            os.dup2(saved, fd)
            os.close(saved)
        for stream in {self.out, self.err}:
            stream.close()

    def fail(self, node: str, error: BaseException, reports: Optional[Dict[str, str]] = None) -> "RunFailed":
        """Prints the failure once, cause first, then the reports made and the log; returns it to raise."""
        failed = RunFailed(node, error, self.log_path)
        self.err.write(f"error: {failed}\n")
        for name, path in (reports or {}).items():
            self.err.write(f"{name} report: {path}\n")
        self.err.write(f"full log: {self.log_path}\n")
        return failed


class RunFailed(RuntimeError):
    """A component failed; run() has printed the cause once and logged the traceback."""

    def __init__(self, node: str, error: BaseException, log_path: str):
        super().__init__(f"{node}: {type(error).__name__}: {error}")
        self.node, self.error, self.log_path = node, error, log_path


def log_path_for(summary_path: str, name: str) -> str:
    """A new file per run under <summary's folder>/logs/: <name>-<UTC time>.log."""
    folder = os.path.join(os.path.dirname(os.path.abspath(summary_path)), "logs")
    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, f"{name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    path, n = stem + ".log", 1
    while os.path.exists(path):
        n += 1
        path = f"{stem}-{n}.log"
    return path
