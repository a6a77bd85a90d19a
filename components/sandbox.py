"""Sandbox validation: the candidate served the way production serves it, before Pusher.

The Evaluator judges the model's quality; this component judges the model as a service.
It lays the candidate out as a one-version TF Serving model repository, starts a server on it
in a separate process (its own interpreter, nothing shared with training) with the proxy in
front of it, as production runs them, waits for the version to be AVAILABLE and then

  1. replays eval examples in the production wire form (every named input; NaN / "" for a
     gap) through the proxy's :predict, the path clients use, and blesses only if every
     prediction equals the in-process serving_default call on the same rows (within `tolerance`);
  2. measures single-row latency (p50, p99) and throughput with concurrent keep-alive
     clients, against the thresholds of the environment config (`sandbox:` in configs/local.yaml).

Its output is TFX's InfraBlessing, so the standard Pusher requires it next to the
Evaluator's blessing. When blessed it also carries a copy of the model with warmup requests
(assets.extra/tf_serving_warmup_requests: PredictionLog records built from eval examples,
at most 1000) and sets `has_model`, the way InfraValidator's make_warmup does: Pusher then
pushes that warmed copy, so the first real request to a new version is not the slow one.

The server is the local TF Serving twin (`server: local`, the default) or real TF Serving
(`server: tf_serving`): `tf_serving_binary` starts that tensorflow_model_server on the same
one-version repository with the same flags, or `tf_serving_url` checks a running TF Serving that
already serves the candidate under `model_name` (e.g. a staging deployment the pipeline pushed to).

TFX's InfraValidator would start the real TF Serving image, but TFX 1.16's KubeflowV2DagRunner
refuses it (NotImplementedError in its step builder), so this component runs on Kubeflow too
(see README).
"""

import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Annotated, Any, Dict, List, Literal, Optional, Tuple

import numpy as np
import pydantic
from tfx.dsl.component.experimental.annotations import InputArtifact, OutputArtifact, Parameter
from tfx.dsl.component.experimental.decorators import component
from tfx.types.standard_artifacts import Examples, InfraBlessing, Model

from serving import loadgen, typed_config
from serving.repository import MAX_WARMUP_RECORDS  # TF Serving reads no more warmup records

SANDBOX_REPORT = "sandbox_report.json"
REPLAY_BATCH = 100  # rows per REST request in the equality check
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


NonNegativeInt = Annotated[int, pydantic.Field(ge=0)]
NonNegativeFloat = Annotated[float, pydantic.Field(ge=0, allow_inf_nan=False)]


class SandboxConfig(typed_config.StrictConfig):
    """Thresholds and replay sizes; the environment file's `sandbox:` block, key for key."""
    model_config = pydantic.ConfigDict(frozen=True)

    rows: NonNegativeInt = 500                      # eval rows replayed for the equality check
    tolerance: NonNegativeFloat = 1e-6              # largest |REST - in-process| allowed on any output
    latency_requests: NonNegativeInt = 200          # sequential single-row requests for p50/p99
    max_p50_ms: NonNegativeFloat = 25.0
    max_p99_ms: NonNegativeFloat = 100.0
    clients: NonNegativeInt = 4                     # concurrent keep-alive clients for throughput
    throughput_seconds: NonNegativeFloat = 2.0
    min_requests_per_second: NonNegativeFloat = 50.0
    warmup_records: NonNegativeInt = 100            # PredictionLog records written into the pushed model
    server: Literal["local", "tf_serving"] = "local"  # local (serving.server) | tf_serving
    tf_serving_binary: str = ""          # server: tf_serving: a tensorflow_model_server to start
    tf_serving_url: str = ""             # server: tf_serving: a running TF Serving's REST root instead
    through_proxy: Annotated[int, pydantic.Field(ge=0, le=1)] = 1  # 1: replay through serving.proxy
    start_timeout_seconds: NonNegativeFloat = 180.0

    @pydantic.field_validator("warmup_records")
    @classmethod
    def _readable_warmup(cls, count: int) -> int:
        if count > MAX_WARMUP_RECORDS:
            raise typed_config.at("", f"is at most {MAX_WARMUP_RECORDS} (TF Serving reads no more), got {count}")
        return count

    @pydantic.model_validator(mode="after")
    def _one_tf_serving(self) -> "SandboxConfig":
        if self.server == "tf_serving" and bool(self.tf_serving_binary) == bool(self.tf_serving_url):
            raise typed_config.at("server", "tf_serving needs exactly one of 'tf_serving_binary' (a "
                                            "tensorflow_model_server to start) or 'tf_serving_url' (a running TF Serving)")
        return self

    @classmethod
    def from_dict(cls, values: Optional[Dict[str, Any]]) -> "SandboxConfig":
        """The checked settings; a ValueError names the key (e.g. 'sandbox config: clients: must be int ...')."""
        try:
            return cls.model_validate(dict(values or {}))
        except pydantic.ValidationError as e:
            raise ValueError(typed_config.describe(e, cls, "sandbox config")) from None


# --- the served candidate ---------------------------------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SandboxServer:
    """The candidate served in its own processes over a one-version repository, with the proxy
    in front (the production wire); a context manager. `port` is where clients' requests go."""

    def __init__(self, model_dir: str, model_name: str, work_dir: str, start_timeout: float,
                 config: Optional[SandboxConfig] = None):
        config = config or SandboxConfig()
        self.model_name, self.version, self.config = model_name, 1, config
        self.root = os.path.join(work_dir, "repository")
        # A symlink, not a copy: the server only reads the model.
        os.makedirs(os.path.join(self.root, model_name))
        os.symlink(os.path.abspath(model_dir), os.path.join(self.root, model_name, str(self.version)))
        self.work_dir, self.start_timeout = work_dir, start_timeout
        self.log_path = os.path.join(work_dir, "server.log")
        self.processes: List[subprocess.Popen] = []
        self.server_url = config.tf_serving_url.rstrip("/") if config.tf_serving_url else None
        self.port: Optional[int] = None
        self.proxy_port_file = os.path.join(work_dir, "proxy.port")
        self._started = False
        if self.server_url:  # a running TF Serving: whatever version of the model it serves latest
            self.version = None

    def _server_command(self, rest_port: int, grpc_port: int) -> List[str]:
        """tensorflow_model_server's own flags: the local twin and the real binary take the same."""
        binary = [self.config.tf_serving_binary] if self.config.server == "tf_serving" else \
            [sys.executable, "-m", "serving.server"]
        return binary + [f"--model_name={self.model_name}",
                         f"--model_base_path={os.path.abspath(os.path.join(self.root, self.model_name))}",
                         f"--rest_api_port={rest_port}", f"--port={grpc_port}",
                         "--file_system_poll_wait_seconds=3600",
                         # One try: a candidate that does not load is refused now, not after 5 minutes of retries.
                         "--max_num_load_retries=0"]

    def start(self) -> "SandboxServer":
        """Starts the processes and returns at once (the caller can work while the server loads)."""
        self._started = True
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_REPO_ROOT, os.environ.get("PYTHONPATH")])))
        log = open(self.log_path, "w")
        if self.server_url is None:
            rest_port = free_port()
            self.processes.append(subprocess.Popen(self._server_command(rest_port, free_port()), stdout=log,
                                                   stderr=subprocess.STDOUT, env=env, cwd=_REPO_ROOT))
            self.server_url = f"http://127.0.0.1:{rest_port}"
        if self.config.through_proxy:
            variant = {"weight": 1, **({"version": self.version} if self.version else {})}
            proxy_env = dict(env, PROXY_BACKEND=self.server_url, PROXY_MODEL=self.model_name, PROXY_RETRIES="0",
                             PROXY_VARIANTS=json.dumps({"candidate": variant}))
            proxy_env.pop("PROXY_ENV_FILE", None)
            self.processes.append(subprocess.Popen(
                [sys.executable, "-m", "serving.proxy", "--port", "0", "--port_file", self.proxy_port_file,
                 "--log", os.path.join(self.work_dir, "prediction_log.sqlite")],
                stdout=log, stderr=subprocess.STDOUT, env=proxy_env, cwd=_REPO_ROOT))
        return self

    def __enter__(self) -> "SandboxServer":
        if not self._started:
            self.start()
        try:
            self.wait_available()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _server_connection(self, timeout: float) -> http.client.HTTPConnection:
        """A connection straight to the server, past the proxy."""
        parts = self.server_url.split("//", 1)[1].split(":")
        return http.client.HTTPConnection(parts[0], int(parts[1].split("/")[0]) if len(parts) > 1 else 80,
                                          timeout=timeout)

    def _direct(self, method: str, path: str):
        conn = self._server_connection(30)
        try:
            conn.request(method, path)
            response = conn.getresponse()
            return response.status, json.loads(response.read() or b"{}")
        finally:
            conn.close()

    def warm(self, rows: List[Dict], batch: int) -> float:
        """Warms the served model before any check: one request of `batch` rows and one of a
        single row (the sizes the replay and the load use), straight to the server and allowed
        the start timeout. TF Serving warms a model at load from its assets.extra warmup records
        (saved_model_warmup_util.cc RunSavedModelWarmup, before the version is AVAILABLE); the
        candidate gets its records only when blessed, so the sandbox warms it here, or the first
        proxied replay pays for the model's first runs against the proxy's deadline (504 once,
        at load 15). Not through the proxy: warming is not client traffic and is not logged.
        Returns the seconds it took."""
        started = time.perf_counter()
        pinned = f"/versions/{self.version}" if self.version else ""
        conn = self._server_connection(self.start_timeout)
        try:
            for instances in (rows[:batch], rows[:1]):
                conn.request("POST", f"/v1/models/{self.model_name}{pinned}:predict",
                             body=json.dumps({"instances": instances}), headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                body = response.read()
                if response.status != 200:
                    raise SandboxError(f"the sandbox server refused a warming request of {len(instances)} rows: "
                                       f"HTTP {response.status}: {body[:300]!r}; its log: {self.log_path}")
        finally:
            conn.close()
        return time.perf_counter() - started

    def wait_available(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        available = False
        while time.monotonic() < deadline:
            for process in self.processes:
                if process.poll() is not None:
                    raise SandboxError(f"a sandbox process exited with code {process.returncode} before serving "
                                       f"({' '.join(process.args[:3])}); its log: {self.log_path}\n{self._log_tail()}")
            try:
                if not available:
                    pinned = f"/versions/{self.version}" if self.version else ""
                    status, body = self._direct("GET", f"/v1/models/{self.model_name}{pinned}")
                    versions = body.get("model_version_status", []) if status == 200 else []
                    state = next((v for v in versions if v.get("state") == "AVAILABLE"), versions[0] if versions else {})
                    if state.get("state") == "END":  # the server gave up loading it
                        raise SandboxError(f"the sandbox server could not load the model: "
                                           f"{state['status']['error_message']}; its log: {self.log_path}")
                    available = state.get("state") == "AVAILABLE"
                if available and not self.config.through_proxy:
                    self.port = int(self.server_url.rsplit(":", 1)[1].split("/")[0])  # (a loopback URL)
                    return
                if available and os.path.exists(self.proxy_port_file):
                    with open(self.proxy_port_file) as f:
                        port = int(f.read().split()[0])
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                    conn.request("GET", "/readyz")
                    if conn.getresponse().status == 200:
                        self.port = port
                        conn.close()
                        return
                    conn.close()
            except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError):
                pass
            time.sleep(0.2)
        raise SandboxError(f"the sandbox server did not report version {self.version} AVAILABLE "
                           f"{'behind the proxy ' if self.config.through_proxy else ''}within "
                           f"{self.start_timeout:.0f} s; its log: {self.log_path}\n{self._log_tail()}")

    def _log_tail(self, lines: int = 20) -> str:
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def request(self, method: str, path: str, body: Optional[Dict] = None, conn=None):
        own = conn is None
        conn = conn or self.connection()
        try:
            conn.request(method, path, body=None if body is None else json.dumps(body),
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            if own:
                conn.close()

    def __exit__(self, *exc) -> None:
        stop(self.processes)
        self.processes = []


def stop(processes: List[subprocess.Popen], timeout: float = 30) -> None:
    """Terminates the processes, last started first (the proxy before its server); kills a stuck one."""
    for process in reversed(processes):
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class SandboxError(RuntimeError):
    """The sandbox could not be set up (as opposed to a candidate that failed its checks)."""


# --- the checks -------------------------------------------------------------------------------

def _predict_path(server: SandboxServer) -> str:
    if server.config.through_proxy or server.version is None:  # the clients' path: the proxy's split picks it
        return f"/v1/models/{server.model_name}:predict"
    return f"/v1/models/{server.model_name}/versions/{server.version}:predict"


def compare_predictions(server: SandboxServer, expected: Dict[str, np.ndarray], rows: List[Dict],
                        tolerance: float, batch: int = None) -> Dict[str, Any]:
    """REST answers for `rows` against the in-process outputs: largest difference per output and
    the number of rows where any output differs by more than `tolerance` (class names: at all)."""
    answers: List[Dict] = []
    batch = batch or REPLAY_BATCH
    conn = server.connection()
    try:
        for start in range(0, len(rows), batch):
            status, body = server.request("POST", _predict_path(server), {"instances": rows[start:start + batch]}, conn)
            if status != 200:
                return {"rows": len(rows), "rows_differing": len(rows),
                        "error": f"HTTP {status}: {body.get('error', body)}"}
            answers.extend(body["predictions"])
    finally:
        conn.close()
    if len(expected) == 1:  # one output: TF Serving's row format answers bare values, not objects
        (only,) = expected
        answers = [a if isinstance(a, dict) else {only: a} for a in answers]
    differing = np.zeros(len(rows), dtype=bool)
    max_abs_diff: Dict[str, Optional[float]] = {}
    for key, want in expected.items():
        want = want.reshape(len(rows), -1)
        got = np.asarray([a[key] for a in answers], dtype=object).reshape(len(rows), -1)
        if want.dtype.kind in "SUO":  # class names must be identical
            want_text = np.vectorize(lambda w: w.decode() if isinstance(w, bytes) else str(w), otypes=[object])(want)
            differing |= (got.astype(str) != want_text.astype(str)).any(axis=1)
            max_abs_diff[key] = None
        else:
            diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
            max_abs_diff[key] = float(diff.max()) if diff.size else 0.0
            differing |= diff.max(axis=1) > tolerance
    return {"rows": len(rows), "rows_differing": int(differing.sum()), "max_abs_diff": max_abs_diff}


# --- warmup -----------------------------------------------------------------------------------

def warmup_records(columns: Dict[str, np.ndarray], count: int) -> List[bytes]:
    """PredictionLog records for serving_default, one eval row each, as TF Serving replays them."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    records = []
    n = min(count, len(next(iter(columns.values()))) if columns else 0)
    for i in range(n):
        request = predict_pb2.PredictRequest()
        request.model_spec.signature_name = "serving_default"
        for name, column in columns.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(column[i:i + 1]))
        records.append(prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=request)).SerializeToString())
    return records


def local_model_dir(model_dir: str, work_dir: str) -> str:
    """The model on local disk: itself, or a copy when it lives in object storage (the local server
    and its one-version repository read local files only)."""
    if "://" not in model_dir:
        return model_dir
    from tfx.utils import io_utils

    local = os.path.join(work_dir, "candidate")
    io_utils.copy_dir(model_dir, local)  # local disk and object storage (gs://... on Kubeflow) alike
    return local


def write_warmed_model(model_dir: str, out_dir: str, records: List[bytes]) -> str:
    """A copy of the model with assets.extra/tf_serving_warmup_requests; returns the warmup file."""
    import tensorflow as tf
    from tfx.utils import io_utils

    io_utils.copy_dir(model_dir, out_dir)
    path = os.path.join(out_dir, "assets.extra", "tf_serving_warmup_requests")
    tf.io.gfile.makedirs(os.path.dirname(path))
    with tf.io.TFRecordWriter(path) as writer:
        for record in records:
            writer.write(record)
    return path


# --- the whole validation -----------------------------------------------------------------------

def read_examples(examples_uri: str, split: str, limit: int) -> List[bytes]:
    """Serialized raw tf.Examples of one split of an Examples artifact (GZIP TFRecords)."""
    import tensorflow as tf

    files = sorted(tf.io.gfile.glob(os.path.join(examples_uri, f"Split-{split}", "*")))
    if not files:
        raise SandboxError(f"no '{split}' split under {examples_uri}: nothing to replay")
    dataset = tf.data.TFRecordDataset(files, compression_type="GZIP").take(limit)
    return [r.numpy() for r in dataset]


def verdict(report: Dict[str, Any], config: SandboxConfig) -> List[str]:
    """What fails in a measured report: each reason names the figure and the threshold."""
    reasons = []
    predictions, latency, throughput = report["predictions"], report["latency"], report["throughput"]
    if "error" in predictions:
        reasons.append(f"predictions: the server refused the eval rows: {predictions['error']}")
    elif predictions["rows_differing"]:
        reasons.append(f"predictions: {predictions['rows_differing']} of {predictions['rows']} rows differ from "
                       f"the in-process call by more than {config.tolerance:g} (max |diff| per output: "
                       f"{predictions['max_abs_diff']})")
    if latency["errors"] or throughput["errors"]:
        reasons.append(f"errors: {latency['errors']} in the latency run, {throughput['errors']} in the throughput run")
    if latency["p50_ms"] > config.max_p50_ms:
        reasons.append(f"latency: p50 {latency['p50_ms']:.2f} ms > max_p50_ms {config.max_p50_ms:g}")
    if latency["p99_ms"] > config.max_p99_ms:
        reasons.append(f"latency: p99 {latency['p99_ms']:.2f} ms > max_p99_ms {config.max_p99_ms:g}")
    if throughput["requests_per_second"] < config.min_requests_per_second:
        reasons.append(f"throughput: {throughput['requests_per_second']:.1f} requests/s < min_requests_per_second "
                       f"{config.min_requests_per_second:g} ({config.clients} clients)")
    return reasons


def validate(model_dir: str, model_name: str, examples: List[bytes], config: SandboxConfig,
             work_dir: str) -> Tuple[Dict[str, Any], List[bytes]]:
    """Serves `model_dir` in a separate process and runs every check: (report, warmup records).

    report["blessed"] is True only when all predictions match and every threshold is met;
    report["reasons"] lists what failed, with the measured figure and the threshold. Warmup
    records are built only for a blessed model.
    """
    import tensorflow as tf

    from components.export import raw_inputs
    from serving.json_tensor import instances

    started = time.perf_counter()
    server = SandboxServer(model_dir, model_name, work_dir, config.start_timeout_seconds, config).start()
    try:  # the in-process answers, computed while the server process starts
        signature = tf.saved_model.load(model_dir).signatures["serving_default"]
        _, input_specs = signature.structured_input_signature
        columns = raw_inputs(examples, input_specs)
        arrays = {k: v.numpy() for k, v in columns.items()}
        rows = instances(arrays)  # the wire form: NaN / "" for a gap
        # Batched as the REST replay batches them: a kernel may round differently for another batch
        # size (measured: 2e-6 on a multiclass softmax), and the check is "same request, same answer".
        batches = [signature(**{k: v[i:i + REPLAY_BATCH] for k, v in columns.items()})
                   for i in range(0, len(rows), REPLAY_BATCH)]
        expected = {k: np.concatenate([b[k].numpy() for b in batches]) for k in batches[0]}
        # Built now, while the server is still loading (4 s measured here after it, at load 6),
        # and kept only for a blessed model.
        warmup = warmup_records(arrays, config.warmup_records)
    except BaseException:
        server.__exit__()
        raise
    report: Dict[str, Any] = {"model_name": model_name, "config": config.model_dump()}
    with server:
        report["server_start_seconds"] = time.perf_counter() - started
        report["warm_seconds"] = server.warm(rows, REPLAY_BATCH)
        report["predictions"] = compare_predictions(server, expected, rows, config.tolerance)
        path, bodies = _predict_path(server), [json.dumps({"instances": [row]}).encode() for row in rows]
        report["latency"] = loadgen.sequential({"candidate": server.port}, path, bodies,
                                               config.latency_requests)["candidate"]
        report["throughput"] = loadgen.concurrent(server.port, path, bodies, config.clients,
                                                  config.throughput_seconds)
    reasons = verdict(report, config)
    report["blessed"], report["reasons"] = not reasons, reasons
    return report, (warmup if not reasons else [])


def _record(blessing, report: Dict[str, Any]) -> None:
    """Report file, TFX's marker file and the custom properties Pusher and the summary read."""
    from tfx.dsl.io import fileio

    with fileio.open(os.path.join(blessing.uri, SANDBOX_REPORT), "w") as f:
        f.write(json.dumps(report, indent=2))
    marker = "INFRA_BLESSED" if report["blessed"] else "INFRA_NOT_BLESSED"  # InfraValidator's names
    with fileio.open(os.path.join(blessing.uri, marker), "w") as f:
        f.write("\n".join(report["reasons"]))
    blessing.set_int_custom_property("blessed", int(report["blessed"]))
    if "latency" in report:
        blessing.set_float_custom_property("p50_ms", report["latency"]["p50_ms"])
        blessing.set_float_custom_property("p99_ms", report["latency"]["p99_ms"])
        blessing.set_float_custom_property("requests_per_second", report["throughput"]["requests_per_second"])
        blessing.set_int_custom_property("rows_differing", report["predictions"]["rows_differing"])


@component
def SandboxValidator(model: InputArtifact[Model], examples: InputArtifact[Examples],
                     blessing: OutputArtifact[InfraBlessing],
                     model_name: Parameter[str], config: Parameter[str] = "{}",
                     split: Parameter[str] = "eval") -> None:
    """Blesses (InfraBlessing) a candidate that serves what it computes, fast enough; see module doc.

    Like TFX's InfraValidator, it takes the model and examples only, not the Evaluator's blessing:
    so it does not follow the Evaluator, and a change that reruns the Evaluator alone (thresholds,
    slices) finds it in the cache (about 10 s of a thresholds-only rerun here); Pusher needs both."""
    import absl.logging
    from tfx.utils import path_utils

    settings = SandboxConfig.from_dict(json.loads(config))
    model_dir = path_utils.serving_model_path(model.uri, path_utils.is_old_model_artifact(model))
    with tempfile.TemporaryDirectory(prefix="sandbox-") as work_dir:
        try:
            rows = read_examples(examples.uri, split, settings.rows)
            report, warmup = validate(local_model_dir(model_dir, work_dir), model_name, rows, settings, work_dir)
        except SandboxError as e:  # the candidate could not even be served: not blessed, and why
            report, warmup = {"model_name": model_name, "blessed": False, "reasons": [str(e)]}, []
    if report["blessed"]:
        # The pushed model is this warmed copy (Pusher takes it from the InfraBlessing).
        write_warmed_model(model_dir, path_utils.stamped_model_path(blessing.uri), warmup)
        blessing.set_int_custom_property("has_model", 1)
        report["warmup_records"] = len(warmup)
    _record(blessing, report)
    if report["blessed"]:
        absl.logging.info("sandbox: blessed: %s", json.dumps({k: report[k] for k in ("latency", "throughput")}))
    else:  # info, not a warning: the run's summary prints the reasons; as a warning the console showed them twice
        absl.logging.info("sandbox: NOT blessed:\n  %s", "\n  ".join(report["reasons"]))
