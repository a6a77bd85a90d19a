"""Runs the pipeline with LocalDagRunner (SQLite metadata, Beam DirectRunner).

    python -m pipelines.local_runner --spec configs/taxi.yaml [--env configs/local.yaml]
        [--beam_profile direct_multi_processing]

Prints progress per component, then a summary; writes build/run_summary.json and HTML
reports (data statistics and anomalies, evaluation per slice) under build/reports/.
"""

import argparse
import dataclasses
import logging
import os
import sys
import threading
import time
from typing import Dict, List, Optional

from components import feature_spec
from pipelines import beam_profiles, fingerprint, mlmd
from pipelines.environment import load_environment

SUMMARY_PATH = "build/run_summary.json"


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


class NothingNew(RuntimeError):
    """A retraining run was asked for, but there is no data it has not seen."""


def require_new_span(spec, env) -> int:
    """The newest span on disk, refused (NothingNew) when ExampleGen ingested it already: a retrain on
    data the model was trained on cannot answer drift."""
    if not spec.has_spans:
        raise NothingNew(f"{spec.source}: data.path '{spec.data_path}' is one dataset, not spans: retraining on "
                         "it again learns nothing new; point data.path at spans ({SPAN}, e.g. build/spans/"
                         "span-{SPAN}/, what make export-span writes)")
    spans = spec.spans()  # one glob of the span folders
    newest = spans[-1] if spans else None
    if newest is None:
        raise NothingNew(f"{spec.source}: no span matches '{spec.data_path}': export one with make export-span")
    if newest in mlmd.ingested_spans(env["metadata_path"]):
        raise NothingNew(f"span {newest} (the newest under '{spec.data_path}') was trained on already: export a new "
                         "span (make export-span) before retraining")
    return newest


def spans_to_ingest(spec, ingested) -> List[int]:
    """The window's spans (spec.window_spans(), what the run must train on) older than the newest that
    ExampleGen has not ingested, oldest first. A run's own ExampleGen ingests the newest span only
    (TFX 1.16), so spans that arrived together, or a first run over a folder of spans, would leave
    these out of the window TFX resolves; run() ingests them first (span_ingestion_pipeline)."""
    if not spec.has_spans:
        return []
    seen = set(ingested)
    return [span for span in spec.window_spans()[:-1] if span not in seen]


def ingest_window_spans(spec, environment, metadata_path: str, out=sys.stdout) -> List[int]:
    """Runs span_ingestion_pipeline for each of spans_to_ingest, one console line each; returns them."""
    from tfx.orchestration.local.local_dag_runner import LocalDagRunner

    from pipelines import pipeline as pipeline_lib

    spans = spans_to_ingest(spec, mlmd.ingested_spans(metadata_path))
    for span in spans:
        out.write(f"  ingesting span {span} of the window (older than the newest, never ingested)\n")
        out.flush()
        LocalDagRunner().run(pipeline_lib.span_ingestion_pipeline(spec, environment, span))
    return spans


def run(spec_path: str, env_path: str = "configs/local.yaml", data_path: Optional[str] = None,
        summary_path: str = SUMMARY_PATH, report_dir: Optional[str] = None, quiet: bool = False,
        check_data: bool = True, beam_profile: Optional[str] = None, new_span_only: bool = False,
        reuse_unchanged: bool = False) -> Dict:
    """Runs the whole pipeline once; returns the run summary (also written as JSON).

    `beam_profile` (a configs/beam/ name) replaces the environment file's `beam_profile:`.
    `reuse_unchanged`: when nothing the run reads changed since the summary at summary_path was
    written (pipelines/fingerprint.py), that summary is the answer and TFX is not started.
    """
    started = time.time()
    spec = feature_spec.load(spec_path)
    if data_path:
        spec = dataclasses.replace(spec, data_path=feature_spec.resolve_path(data_path))
    if check_data:
        feature_spec.check_against_data(spec)  # fail in a second, not after ExampleGen
    env = load_environment(env_path, spec)
    if new_span_only:
        require_new_span(spec, env)
    inputs = fingerprint.inputs_fingerprint(spec, spec_path, env_path, beam_profile)
    if reuse_unchanged and not new_span_only:
        previous, _ = fingerprint.unchanged_run(summary_path, inputs, also_needed=[env["metadata_path"]])
        if previous is not None:
            if not quiet:
                print(f"skewless: nothing changed since the last run of '{spec.name}' (same spec, environment, "
                      f"data and code; its outputs are in place): {summary_path} stands. `--force` runs anyway.")
            return previous
    beam_args = beam_profiles.beam_args(env, env_path, beam_profile, pipeline_root=env["pipeline_root"],
                                        name=spec.name)
    beam_profiles.check_flags(beam_args, env_path)  # Beam would drop a misspelt flag with a warning
    log_path = log_path_for(summary_path, spec.name)
    report_dir = report_dir or os.path.join(os.path.dirname(os.path.abspath(summary_path)), "reports")
    if not quiet:
        print(f"skewless: running pipeline '{spec.name}' on {spec.data_path}", flush=True)
    error, failed = None, None
    with Console(log_path, quiet) as console:
        from tfx.orchestration import metadata
        from tfx.orchestration.local.local_dag_runner import LocalDagRunner

        from pipelines import pipeline as pipeline_lib, report

        os.makedirs(os.path.dirname(env["metadata_path"]), exist_ok=True)
        environment = pipeline_lib.Environment(
            pipeline_root=env["pipeline_root"], model_repository=env["model_repository"],
            metadata_connection_config=metadata.sqlite_metadata_connection_config(env["metadata_path"]),
            beam_pipeline_args=beam_profiles.for_tfx(beam_args), enable_cache=env.get("enable_cache", True),
            sandbox=dict(env.get("sandbox") or {}), **({"baseline": env["baseline"]} if env.get("baseline") else {}))
        tfx_pipeline = pipeline_lib.create_pipeline(spec, environment)
        try:  # before the run's progress watcher, which reports the run's own components
            ingest_window_spans(spec, environment, env["metadata_path"], console.out)
        except Exception as e:
            logging.exception("ingesting the window's spans failed")
            failed = RunFailed("CsvExampleGen (a span of the window)", e, log_path)
            console.err.write(f"error: {failed}\nfull log: {log_path}\n")
            raise failed from e
        progress = ProgressWatcher(environment.metadata_connection_config, stream=console.out)
        try:
            progress.start()
            LocalDagRunner().run(tfx_pipeline)
        except Exception as e:  # reported in the summary, printed once below, then re-raised
            error = e
            logging.exception("the run failed")  # the traceback, in the log only
        finally:
            progress.stop()
        _record_code_commit(environment.metadata_connection_config)
        summary = report.build_summary(spec, env, environment, progress.order, progress.seconds,
                                       time.time() - started, error)
        summary["log"] = log_path
        summary[fingerprint.KEY] = inputs
        try:
            summary["reports"] = report.write_html(summary, spec, report_dir)
        finally:  # written once, with the reports when they could be made
            report.write_summary(summary, summary_path)
        if error is not None:
            failed = RunFailed(progress.failed or "pipeline", error, log_path)
            console.err.write(f"error: {failed}\n")
            for name, path in (summary.get("reports") or {}).items():
                console.err.write(f"{name} report: {path}\n")
            console.err.write(f"full log: {log_path}\n")
    if failed is not None:
        raise failed from error
    if not quiet:
        report.print_summary(summary)
    return summary


def _record_code_commit(connection_config) -> None:
    """Tags the run in ML Metadata with the code's git commit, for the release log's lineage."""
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=feature_spec.REPO_ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=feature_spec.REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return
    if not commit:
        return
    mlmd.tag_latest_run(connection_config, mlmd.CODE_COMMIT, commit + ("+uncommitted" if dirty else ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", default="configs/taxi.yaml")
    parser.add_argument("--env", default="configs/local.yaml")
    parser.add_argument("--data", help="override the spec's data.path (a CSV file or folder)")
    parser.add_argument("--summary", default=SUMMARY_PATH)
    parser.add_argument("--beam_profile", help="a Beam profile of configs/beam/ in place of the environment file's "
                                               f"(one of {', '.join(beam_profiles.profile_names())})")
    parser.add_argument("--require_new_span", action="store_true",
                        help="retraining: refuse unless the newest span was never ingested (make retrain)")
    parser.add_argument("--force", action="store_true",
                        help="run even when nothing changed since the last run (pipelines/fingerprint.py)")
    args = parser.parse_args(argv)
    try:
        run(args.spec, args.env, args.data, args.summary, beam_profile=args.beam_profile,
            new_span_only=args.require_new_span, reuse_unchanged=not args.force)
    except feature_spec.SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NothingNew as e:
        print(f"nothing to retrain on: {e}", file=sys.stderr)
        return 3
    except RunFailed:  # run() printed it, cause first
        return 1
    except Exception as e:
        print(f"error: pipeline failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
