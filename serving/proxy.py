"""Proxy in front of TF Serving (or the local server): parameter-based control, A/B and shadow
traffic, prediction logging. Clients speak TF Serving's REST API to it, unchanged.

    python -m serving.proxy [--port 8080] [--log build/prediction_log.sqlite] [--env_file configs/proxy.env]

Settings are environment variables, overlaid by the KEY=VALUE lines of PROXY_ENV_FILE (or
--env_file). The file is re-read on SIGHUP and whenever it changes (a Kubernetes ConfigMap
mounted as a file updates in place), so behaviour changes without a redeploy. A bad value is
refused with a message naming the key, and the previous settings stay in force.

  PROXY_BACKEND           REST root of the server the variants live on    http://127.0.0.1:8501
  PROXY_ENABLED           true | false. false: every :predict/:classify/:regress gets the
                          fallback answer below, flagged (X-Skewless-Fallback: true, and
                          "skewless": {"fallback": true} in the body); no model is called
  PROXY_FALLBACK          JSON object: the prediction returned for every row while disabled  {}
  PROXY_THRESHOLD         decision threshold on a binary model's `score`: class_ids (and
                          classes, with PROXY_CLASSES) are recomputed as score >= threshold
  PROXY_CLASSES           JSON list of class names in class-id order, e.g. ["no", "yes"]
  PROXY_TIMEOUT_SECONDS   per backend call                                 5
  PROXY_RETRIES           extra tries after a connection error or a 503   1
  PROXY_VARIANTS          JSON {name: {"weight": w, "label": l | "version": n, "backend": url}}
                          a variant with neither label nor version gets the latest version;
                          default {"default": {"weight": 1}}
  PROXY_SHADOW            a variant name: it gets a copy of every request (off the request
                          path) and is never the one that answers; its answers are logged
                          with shadow=1 and compared with the answer given
  PROXY_ROUTING_HEADER    request header whose value keys the sticky split  X-User-Id
                          (no such header: the request id, i.e. no stickiness)
  PROXY_COMPLETE_MISSING  true | false (default true): a :predict row ("instances" objects) that
                          leaves out named inputs of the signature gets them from the model's
                          own metadata (backend GET .../metadata, cached 5 s) as the one wire form
                          of a missing value: NaN for a number, "" for a string. Both servers
                          refuse a row without every named input, as TF Serving does; a required
                          feature is still refused by the model itself
  PROXY_MODEL             the model /readyz checks: ready only when every variant's label or
                          version is AVAILABLE on its backend (unset: only that backends answer)

Every answer says who answered: headers X-Skewless-Variant, X-Skewless-Model-Version and
X-Request-Id, and a "skewless" object beside "predictions"/"results" in the body. A URL that
names a version or label (/versions/n, /labels/l) bypasses the split (variant "direct").

Every request and response goes to the prediction log (serving/predlog.py) before the answer is
sent; a graceful stop (SIGTERM, SIGINT) writes all of it; a crash loses nothing acknowledged.
Backend down: 503 with a message naming the variant and the backend; no answer in time: 504.
Imports the standard library and prometheus-client only: the proxy image needs no TensorFlow.
"""

import argparse
import hashlib
import http.client
import json
import logging
import math
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import quote, urlsplit

import prometheus_client as prom

from serving import wire
from serving.http import HttpServer, Request, Response
from serving.predlog import PredictionLog

MAX_SHADOW_IN_FLIGHT = 64

class ConfigError(ValueError):
    """A setting with a bad value; the message names the key."""


# --- settings -----------------------------------------------------------------------------

def _flag(key: str, text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{key}: expected true or false, got '{text}'")


def _number(key: str, text: str, minimum: float = 0.0, maximum: float = math.inf) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{key}: expected a number, got '{text}'") from None
    if not minimum <= value <= maximum:
        raise ConfigError(f"{key}: must be between {minimum:g} and {maximum:g}, got {value:g}")
    return value


def _json(key: str, text: str, kind: type):
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"{key}: not valid JSON ({e})") from None
    if not isinstance(value, kind):
        raise ConfigError(f"{key}: expected a JSON {kind.__name__}, got {type(value).__name__}")
    return value


def _url(key: str, text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme != "http" or not parts.hostname:
        raise ConfigError(f"{key}: expected http://host:port, got '{text}'")
    return text.rstrip("/")


class Variant:
    def __init__(self, name: str, backend: str, weight: float, label: Optional[str], version: Optional[int]):
        self.name, self.backend, self.weight, self.label, self.version = name, backend, weight, label, version

    def path(self, model: str, verb: str) -> str:
        pinned = f"/labels/{self.label}" if self.label else f"/versions/{self.version}" if self.version else ""
        return f"/v1/models/{model}{pinned}:{verb}"


class Settings:
    """One consistent set of proxy parameters; replaced whole on reload, never edited."""

    def __init__(self, values: Dict[str, str]):
        get = values.get
        self.backend = _url("PROXY_BACKEND", get("PROXY_BACKEND", "http://127.0.0.1:8501"))
        self.enabled = _flag("PROXY_ENABLED", get("PROXY_ENABLED", "true"))
        self.fallback = _json("PROXY_FALLBACK", get("PROXY_FALLBACK", "{}"), dict)
        self.threshold = (_number("PROXY_THRESHOLD", get("PROXY_THRESHOLD"), 0.0, 1.0)
                          if get("PROXY_THRESHOLD", "").strip() else None)
        self.classes = _json("PROXY_CLASSES", get("PROXY_CLASSES"), list) if get("PROXY_CLASSES", "").strip() else None
        if self.classes is not None and len(self.classes) != 2 and self.threshold is not None:
            raise ConfigError(f"PROXY_CLASSES: a threshold needs exactly two classes, got {self.classes}")
        self.timeout = _number("PROXY_TIMEOUT_SECONDS", get("PROXY_TIMEOUT_SECONDS", "5"), 0.001)
        retries = _number("PROXY_RETRIES", get("PROXY_RETRIES", "1"), 0, 10)
        if retries != int(retries):
            raise ConfigError(f"PROXY_RETRIES: expected a whole number, got {retries:g}")
        self.retries = int(retries)
        self.routing_header = get("PROXY_ROUTING_HEADER", "X-User-Id").strip()
        self.complete_missing = _flag("PROXY_COMPLETE_MISSING", get("PROXY_COMPLETE_MISSING", "true"))
        self.model = get("PROXY_MODEL", "").strip() or None
        if self.model is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", self.model):
            raise ConfigError(f"PROXY_MODEL: expected a model name, got '{self.model}'")
        raw = _json("PROXY_VARIANTS", get("PROXY_VARIANTS", '{"default": {"weight": 1}}'), dict)
        if not raw:
            raise ConfigError("PROXY_VARIANTS: at least one variant is needed")
        self.variants: Dict[str, Variant] = {}
        for name, spec in raw.items():
            key = f"PROXY_VARIANTS.{name}"
            if not isinstance(spec, dict):
                raise ConfigError(f"{key}: expected an object, got {spec!r}")
            unknown = set(spec) - {"weight", "label", "version", "backend"}
            if unknown:
                raise ConfigError(f"{key}: unknown field(s) {sorted(unknown)}; known: backend, label, version, weight")
            if "label" in spec and "version" in spec:
                raise ConfigError(f"{key}: give a label or a version, not both")
            version = spec.get("version")
            if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version <= 0):
                raise ConfigError(f"{key}.version: expected a positive integer, got {version!r}")
            label = spec.get("label")
            if label is not None and (not isinstance(label, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", label)):
                raise ConfigError(f"{key}.label: expected a label name, got {label!r}")
            self.variants[name] = Variant(
                name, _url(f"{key}.backend", spec["backend"]) if "backend" in spec else self.backend,
                _number(f"{key}.weight", str(spec.get("weight", 1))), label, version)
        self.shadow = get("PROXY_SHADOW", "").strip() or None
        if self.shadow is not None and self.shadow not in self.variants:
            raise ConfigError(f"PROXY_SHADOW: '{self.shadow}' is not a variant; variants: {sorted(self.variants)}")
        self.answering = [v for v in self.variants.values() if v.name != self.shadow and v.weight > 0]
        if not self.answering:
            raise ConfigError("PROXY_VARIANTS: no variant with a weight > 0 is left to answer "
                              "(the shadow variant never answers)")
        total = sum(v.weight for v in self.answering)
        self._cumulative: List[Tuple[float, Variant]] = []
        acc = 0.0
        for v in self.answering:
            acc += v.weight / total
            self._cumulative.append((acc, v))

    def choose(self, key: str) -> Variant:
        """Sticky: the same key always lands on the same variant while the weights stay."""
        point = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2 ** 64
        for edge, variant in self._cumulative:
            if point < edge:
                return variant
        return self._cumulative[-1][1]


def read_env_file(path: str) -> Dict[str, str]:
    values = {}
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, sep, value = line.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"{path}:{number}: expected KEY=VALUE, got '{line}'")
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            values[key.strip()] = value
    return values


# --- backend calls ------------------------------------------------------------------------

class BackendError(Exception):
    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason = code, reason


class Backends:
    """Keep-alive connections per thread and backend; retries on connection errors and 503."""

    def __init__(self):
        self._local = threading.local()

    def _connection(self, backend: str, timeout: float) -> http.client.HTTPConnection:
        pool = self._local.__dict__.setdefault("pool", {})
        conn = pool.get(backend)
        if conn is None:
            parts = urlsplit(backend)
            conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
            pool[backend] = conn
        if conn.sock is None:
            conn.connect()  # here, so the socket options are set once per connection, not per request
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if conn.timeout != timeout:  # PROXY_TIMEOUT_SECONDS was reloaded
            conn.timeout = timeout
            conn.sock.settimeout(timeout)
        return conn

    def _drop(self, backend: str) -> None:
        conn = self._local.__dict__.get("pool", {}).pop(backend, None)
        if conn is not None:
            conn.close()

    def call(self, backend: str, method: str, path: str, body: Optional[bytes], timeout: float, retries: int,
             who: str) -> Tuple[int, bytes]:
        last = None
        for attempt in range(retries + 1):
            try:
                conn = self._connection(backend, timeout)
                conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
                response = conn.getresponse()
                data = response.read()
                if response.will_close:
                    self._drop(backend)
            except socket.timeout:
                self._drop(backend)
                raise BackendError(504, "timeout", f"{who} ({backend}) did not answer within {timeout:g} s") from None
            except (OSError, http.client.HTTPException) as e:
                self._drop(backend)
                last = f"{type(e).__name__}: {e}"
                continue
            if response.status == 503 and attempt < retries:
                last = f"HTTP 503: {data[:200].decode(errors='replace')}"
                continue
            return response.status, data
        raise BackendError(503, "unavailable", f"{who} ({backend}) unavailable after {retries + 1} "
                                               f"tr{'y' if retries == 0 else 'ies'}: {last}")


# --- the proxy ----------------------------------------------------------------------------

class Proxy:
    def __init__(self, env: Optional[Dict[str, str]] = None, env_file: Optional[str] = None,
                 log_path: Optional[str] = None, registry: Optional[prom.CollectorRegistry] = None,
                 watch_seconds: float = 2.0):
        self.base_env = dict(os.environ if env is None else env)
        self.env_file = env_file or self.base_env.get("PROXY_ENV_FILE") or None
        self.registry = registry or prom.CollectorRegistry()
        self._define_metrics()
        self._env_file_mtime = None
        self.settings = Settings(self._values())
        self._publish_settings()
        self.log = PredictionLog(log_path, registry=self.registry) if log_path else None
        self.backends = Backends()
        self.shadow_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="shadow")
        self._shadow_slots = threading.BoundedSemaphore(MAX_SHADOW_IN_FLIGHT)
        self._metadata: Dict[Tuple[str, str], Tuple[float, Optional[Dict[str, Any]]]] = {}
        self._metadata_lock = threading.Lock()
        self._stop = threading.Event()
        self._in_flight = 0
        self._stopping = False
        self._idle = threading.Condition()
        self._watcher = None
        if self.env_file and watch_seconds > 0:
            self._watcher = threading.Thread(target=self._watch, args=(watch_seconds,), daemon=True,
                                             name="proxy-settings")
            self._watcher.start()

    def _define_metrics(self) -> None:
        r = self.registry
        self.m_requests = prom.Counter("skewless_proxy_requests", "Requests answered, by variant and HTTP code.",
                                       ["model", "variant", "code"], registry=r)
        self.m_latency = prom.Histogram("skewless_proxy_request_latency_seconds", "Request to response, in the proxy.",
                                        ["model", "variant"], registry=r,
                                        buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5))
        self.m_backend_latency = prom.Histogram("skewless_proxy_backend_latency_seconds",
                                                "Time spent waiting for the backend.", ["model", "variant"], registry=r,
                                                buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5))
        self.m_score = prom.Histogram("skewless_proxy_prediction_score", "Positive-class score of each row answered "
                                      "(binary models; `value` for regression).", ["model", "variant"], registry=r,
                                      buckets=tuple(round(0.05 * i, 2) for i in range(1, 21)))
        self.m_fallback = prom.Counter("skewless_proxy_fallback", "Requests answered with the fallback (disabled).",
                                       ["model"], registry=r)
        self.m_backend_errors = prom.Counter("skewless_proxy_backend_errors", "Backend unavailable, timed out or 5xx.",
                                             ["model", "variant", "reason"], registry=r)
        self.m_shadow = prom.Counter("skewless_proxy_shadow", "Shadow copies, by outcome: same_class, "
                                     "different_class, error, skipped (too many in flight).",
                                     ["model", "variant", "outcome"], registry=r)
        self.m_reloads = prom.Counter("skewless_proxy_config_reloads", "Settings reloads, by result.", ["result"],
                                      registry=r)
        self.m_enabled = prom.Gauge("skewless_proxy_enabled", "1 if PROXY_ENABLED, else 0 (fallback).", registry=r)
        self.m_threshold = prom.Gauge("skewless_proxy_threshold", "PROXY_THRESHOLD (NaN: the model's own).",
                                      registry=r)
        self.m_weight = prom.Gauge("skewless_proxy_variant_weight", "Traffic share per answering variant.",
                                   ["variant"], registry=r)

    # --- settings ------------------------------------------------------------------------
    def _values(self) -> Dict[str, str]:
        values = dict(self.base_env)
        if self.env_file:
            try:
                self._env_file_mtime = os.stat(self.env_file).st_mtime_ns
            except FileNotFoundError:
                # Not mounted (yet): the environment alone; the watcher loads the file when it appears.
                if self._env_file_mtime is not False:
                    logging.warning("PROXY_ENV_FILE %s does not exist: using the environment only", self.env_file)
                self._env_file_mtime = False
                return values
            values.update(read_env_file(self.env_file))
        return values

    def _publish_settings(self) -> None:
        s = self.settings
        self.m_enabled.set(1 if s.enabled else 0)
        self.m_threshold.set(s.threshold if s.threshold is not None else math.nan)
        self.m_weight.clear()
        total = sum(v.weight for v in s.answering)
        for v in s.answering:
            self.m_weight.labels(v.name).set(v.weight / total)

    def reload(self) -> bool:
        """Re-reads the settings; on a bad value keeps the old ones and says which key is wrong."""
        try:
            settings = Settings(self._values())
        except (ConfigError, OSError) as e:
            self.m_reloads.labels("error").inc()
            logging.error("proxy settings not reloaded, previous ones stay in force: %s", e)
            return False
        self.settings = settings
        self._publish_settings()
        self.m_reloads.labels("ok").inc()
        logging.info("proxy settings reloaded: enabled=%s threshold=%s variants=%s shadow=%s", settings.enabled,
                     settings.threshold, {v.name: v.weight for v in settings.variants.values()}, settings.shadow)
        return True

    def _watch(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                mtime = os.stat(self.env_file).st_mtime_ns
            except OSError:
                mtime = False
            if mtime != self._env_file_mtime:
                self.reload()

    # --- the backend's metadata: versions for the log, input names for completing rows ----
    def metadata(self, backend: str, model_path: str, max_age: float = 5.0) -> Optional[Dict[str, Any]]:
        """TF Serving's metadata JSON for /v1/models/m[/labels/l|/versions/n], asked of the backend
        at most every `max_age` s; on a failed ask the last answer stands (None: never had one).
        Metadata, not status: status ignores a label (get_model_status_impl.cc:82-101)."""
        key = (backend, model_path)
        now = time.monotonic()
        with self._metadata_lock:
            cached = self._metadata.get(key)
        if cached and now - cached[0] < max_age:
            return cached[1]
        answer = cached[1] if cached else None
        try:
            status, data = self.backends.call(backend, "GET", model_path + "/metadata", None, self.settings.timeout, 0,
                                              "metadata")
            if status == 200:
                answer = json.loads(data)
        except (BackendError, ValueError):
            pass
        with self._metadata_lock:
            self._metadata[key] = (now, answer)
        return answer

    def model_version(self, variant: Variant, model: str) -> Optional[int]:
        """The version a variant's label (or latest) resolves to (its metadata's model_spec)."""
        if variant.version:
            return variant.version
        try:
            return int(self.metadata(variant.backend, variant.path(model, "")[:-1])["model_spec"]["version"])
        except (TypeError, KeyError, ValueError):
            return None

    def input_types(self, backend: str, model_path: str, signature: str) -> Dict[str, str]:
        """{input name: DT_ type} of a signature, from the backend's metadata."""
        try:
            defs = self.metadata(backend, model_path)["metadata"]["signature_def"]["signature_def"]
            return {k: v.get("dtype", "") for k, v in defs.get(signature, {}).get("inputs", {}).items()}
        except (TypeError, KeyError, AttributeError):
            return {}

    def complete(self, backend: str, model_path: str, body: Dict[str, Any]) -> bool:
        """Adds absent named inputs to every :predict row as NaN / "" (True if a row changed)."""
        rows = body.get("instances")
        if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
            return False
        signature = body.get("signature_name") or "serving_default"
        if not isinstance(signature, str):
            return False
        types = self.input_types(backend, model_path, signature)
        if len(types) < 2:  # a single input is sent bare; nothing to complete
            return False
        gaps = {"DT_STRING": "", "DT_FLOAT": math.nan, "DT_DOUBLE": math.nan, "DT_HALF": math.nan}
        changed = False
        for row in rows:
            if "b64" in row and len(row) == 1:
                continue
            for name, dtype in types.items():
                if name not in row and dtype in gaps:
                    row[name] = gaps[dtype]
                    changed = True
        return changed

    # --- answering -----------------------------------------------------------------------
    def fallback(self, body: Dict[str, Any], verb: str) -> Dict[str, Any]:
        rows = _row_count(body)
        key = "predictions" if verb == "predict" else "results"
        return {key: [dict(self.settings.fallback) for _ in range(rows)]}

    def apply_threshold(self, answer: Dict[str, Any]) -> None:
        threshold, classes = self.settings.threshold, self.settings.classes
        if threshold is None:
            return
        for prediction in answer.get("predictions", []):
            if isinstance(prediction, dict) and isinstance(prediction.get("score"), (int, float)):
                class_id = int(prediction["score"] >= threshold)
                prediction["class_ids"] = class_id
                if classes is not None:
                    prediction["classes"] = classes[class_id]

    def observe_scores(self, model: str, variant: str, answer: Dict[str, Any]) -> None:
        histogram = self.m_score.labels(model, variant)
        for prediction in answer.get("predictions", []):
            if isinstance(prediction, dict):
                value = prediction.get("score", prediction.get("value"))
                if isinstance(value, (int, float)):
                    histogram.observe(value)

    def shadow(self, settings: Settings, model: str, verb: str, raw: bytes, request_id: str, ts: float,
               routing_key: Optional[str], answer: Optional[Dict[str, Any]]) -> None:
        variant = settings.variants[settings.shadow]
        if not self._shadow_slots.acquire(blocking=False):
            self.m_shadow.labels(model, variant.name, "skipped").inc()
            return

        def run():
            try:
                started = time.perf_counter()
                try:
                    status, data = self.backends.call(variant.backend, "POST", variant.path(model, verb), raw,
                                                      settings.timeout, 0, f"shadow variant '{variant.name}'")
                except BackendError as e:
                    status, data = e.code, json.dumps({"error": str(e)}).encode()
                latency = (time.perf_counter() - started) * 1e3
                response = _loads(data)
                outcome = "error"
                if status == 200 and answer is not None:
                    same = [a.get("classes", a.get("class_ids")) == b.get("classes", b.get("class_ids"))
                            for a, b in zip(answer.get("predictions", []), response.get("predictions", []))
                            if isinstance(a, dict) and isinstance(b, dict)]
                    outcome = "same_class" if all(same) else "different_class"
                self.m_shadow.labels(model, variant.name, outcome).inc()
                if self.log:
                    self.log.log({"request_id": f"{request_id}:shadow", "ts": ts, "model": model,
                                  "variant": variant.name, "model_version": self.model_version(variant, model),
                                  "shadow": 1, "api": verb, "status": status, "latency_ms": latency,
                                  "routing_key": routing_key, "request": raw.decode(errors="replace"),
                                  "response": json.dumps(response)})
            except Exception:  # a shadow must never disturb anything
                logging.exception("shadow request failed")
            finally:
                self._shadow_slots.release()

        self.shadow_pool.submit(run)

    def begin(self) -> bool:
        """A request starts; False once the proxy is stopping (it is then refused with a 503)."""
        with self._idle:
            if self._stopping:
                return False
            self._in_flight += 1
            return True

    def end(self) -> None:
        with self._idle:
            self._in_flight -= 1
            self._idle.notify_all()

    def close(self, timeout: float = 30.0) -> Dict[str, Any]:
        """Graceful stop: refuse new requests, let those in flight answer (and log), write the log."""
        with self._idle:
            self._stopping = True
            self._idle.wait_for(lambda: self._in_flight == 0, timeout)
        self._stop.set()
        self.shadow_pool.shutdown(wait=True)
        return self.log.close() if self.log else {}


def _loads(data: bytes) -> Dict[str, Any]:
    try:
        value = json.loads(data)
        return value if isinstance(value, dict) else {"error": "backend answered a non-object"}
    except ValueError:
        return {"error": f"backend answered non-JSON: {data[:200].decode(errors='replace')}"}


def _row_count(body: Dict[str, Any]) -> int:
    if isinstance(body.get("instances"), list):
        return len(body["instances"])
    if isinstance(body.get("examples"), list):
        return len(body["examples"])
    inputs = body.get("inputs")
    if isinstance(inputs, dict):
        return max((len(v) if isinstance(v, list) else 1 for v in inputs.values()), default=0)
    if isinstance(inputs, list):
        return len(inputs)
    return 0


class ProxyApi:
    """One client request -> one Response; runs on serving/http.py's worker pool."""

    def __init__(self, proxy: Proxy):
        self.proxy = proxy

    def handle(self, request: Request) -> Response:
        if request.method == "GET":
            if request.target == "/monitoring/prometheus/metrics":
                return Response(200, prom.generate_latest(self.proxy.registry), prom.CONTENT_TYPE_LATEST)
            if request.target == "/healthz":
                return _answer(200, {"status": "ok"})
            if request.target == "/readyz":
                return self._ready()
        try:
            route = wire.parse(request.method, request.target) if wire.is_api_path(request.target) else None
        except wire.ServingError as e:  # TF Serving's answer for a malformed URL, without a backend call
            return _answer(e.http_status, {"error": e.message})
        if route is None:
            return _answer(404, {"error": f"Not found: {request.method} {request.target[:200]} (the API is under /v1/)"})
        if request.method == "GET":
            return self._forward_get(route)
        if not self.proxy.begin():
            return _answer(503, {"error": "the proxy is shutting down; retry on another replica"},
                         {"Connection": "close"})
        try:
            return self._post(request, route)
        finally:
            self.proxy.end()

    def _ready(self) -> Response:
        """Ready when every variant can answer (used by Kubernetes): with PROXY_MODEL, its label or
        version resolves on its backend; without, the backend at least answers."""
        settings = self.proxy.settings
        problems = []
        for variant in settings.variants.values():
            if settings.model:
                # Metadata answers only once the label or version can serve (status ignores labels).
                target = variant.path(settings.model, "")[:-1] + "/metadata"
            else:
                target = "/monitoring/prometheus/metrics"
            try:
                status, data = self.proxy.backends.call(variant.backend, "GET", target, None, settings.timeout, 0,
                                                        f"variant '{variant.name}'")
            except BackendError as e:
                problems.append(str(e))
                continue
            if status != 200:
                problems.append(f"variant '{variant.name}': GET {target} answered {status}: "
                                f"{_loads(data).get('error', '')}")
            elif settings.model and "model_spec" not in _loads(data):
                problems.append(f"variant '{variant.name}': {target} has no servable version yet")
        return _answer(503 if problems else 200, {"status": "unavailable" if problems else "ok", "problems": problems})

    def _forward_get(self, route: wire.Route) -> Response:
        settings = self.proxy.settings
        variant = settings.answering[0]
        try:
            status, data = self.proxy.backends.call(variant.backend, "GET", _backend_path(route), None,
                                                    settings.timeout, settings.retries, f"variant '{variant.name}'")
            return Response(status, data)
        except BackendError as e:
            return _answer(e.code, {"error": str(e)})

    def _post(self, request: Request, route: wire.Route) -> Response:
        started, ts = time.perf_counter(), time.time()
        proxy, settings = self.proxy, self.proxy.settings  # one settings object for the whole request
        request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        model, verb, raw = route.model, route.api, request.body
        variant_name, version, code, answer = "none", None, 500, {"error": "internal error"}
        routing_key = request.headers.get(settings.routing_header) if settings.routing_header else None
        extra_headers: Dict[str, str] = {}
        backend_seconds = None
        try:
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError) as e:
                code, answer = 400, {"error": f"JSON Parse error: {type(e).__name__}: {str(e)[:200]}"}
                return
            if not isinstance(body, dict):
                code, answer = 400, {"error": "JSON Value: the request body must be a JSON object"}
                return
            if not settings.enabled:
                variant_name, code, answer = "fallback", 200, proxy.fallback(body, verb)
                answer["skewless"] = {"fallback": True}
                extra_headers["X-Skewless-Fallback"] = "true"
                proxy.m_fallback.labels(model).inc()
                return
            if route.version is not None or route.label is not None:  # the client chose: no split
                variant = Variant("direct", settings.answering[0].backend, 1, None, None)
                path, version = _backend_path(route), route.version
            else:
                variant = settings.choose(routing_key or request_id)
                path = variant.path(model, verb)
            variant_name = variant.name
            if verb == "predict" and settings.complete_missing:
                if proxy.complete(variant.backend, path.rsplit(":", 1)[0], body):
                    raw = json.dumps(body).encode()  # what the model sees is what is logged
            call_started = time.perf_counter()
            try:
                code, data = proxy.backends.call(variant.backend, "POST", path, raw, settings.timeout,
                                                 settings.retries, f"variant '{variant.name}'")
            except BackendError as e:
                proxy.m_backend_errors.labels(model, variant.name, e.reason).inc()
                code, answer = e.code, {"error": str(e)}
                return
            finally:
                backend_seconds = time.perf_counter() - call_started
            answer = _loads(data)
            if code >= 500:
                proxy.m_backend_errors.labels(model, variant.name, f"http_{code}").inc()
            if code == 200:
                proxy.apply_threshold(answer)
                proxy.observe_scores(model, variant.name, answer)
                if variant.name != "direct":
                    version = proxy.model_version(variant, model)
                answer["skewless"] = {"variant": variant.name, "model_version": version,
                                      **({"threshold": settings.threshold} if settings.threshold is not None else {})}
            if settings.shadow and variant.name != "direct":
                proxy.shadow(settings, model, verb, raw, request_id, ts, routing_key, answer if code == 200 else None)
        except Exception as e:  # a proxy bug: answer, log, keep serving
            logging.exception("proxy error on POST %s", request.target[:200])
            code, answer = 500, {"error": f"internal error: {type(e).__name__}"}
        finally:
            latency = time.perf_counter() - started
            data = json.dumps(answer).encode()
            if proxy.log and model:
                # Logged before the answer leaves: whatever a client saw is in the log.
                proxy.log.log({"request_id": request_id, "ts": ts, "model": model, "variant": variant_name,
                               "model_version": version, "shadow": 0, "api": verb, "status": code,
                               "latency_ms": latency * 1e3, "routing_key": routing_key,
                               "request": raw.decode(errors="replace"), "response": data.decode()})
            proxy.m_requests.labels(model, variant_name, str(code)).inc()
            proxy.m_latency.labels(model, variant_name).observe(latency)
            if backend_seconds is not None:
                proxy.m_backend_latency.labels(model, variant_name).observe(backend_seconds)
            headers = {"X-Request-Id": request_id, "X-Skewless-Variant": variant_name,
                       **({"X-Skewless-Model-Version": str(version)} if version is not None else {}), **extra_headers}
            # In the finally block: every path above, early exits included, answers what it logged.
            return Response(code, data, "application/json", headers)  # noqa: B012


def _backend_path(route: wire.Route) -> str:
    """The URL for the backend, rebuilt from the parsed route (never the client's raw bytes)."""
    pinned = (f"/versions/{route.version}" if route.version is not None else
              f"/labels/{quote(route.label, safe='')}" if route.label is not None else "")
    base = f"/v1/models/{quote(route.model, safe='')}{pinned}"
    if route.api == "status":
        return base
    if route.api == "metadata":
        return base + "/metadata"
    return f"{base}:{route.api}"


def _answer(code: int, payload: Dict[str, Any], headers: Optional[Dict[str, str]] = None) -> Response:
    return Response(code, json.dumps(payload).encode(), "application/json", headers)


class ProxyServer:
    """The proxy on serving/http.py: `server_address`, `serve_forever`, `shutdown` for its callers."""

    def __init__(self, proxy: Proxy, host: str, port: int):
        self.http = HttpServer(ProxyApi(proxy).handle, host, port, num_threads=64, name="proxy")
        self._stopped = threading.Event()
        self.http.start()
        self.server_address = (host, self.http.port)

    def serve_forever(self) -> None:
        self._stopped.wait()

    def shutdown(self) -> None:
        self.http.stop()
        self._stopped.set()

    def server_close(self) -> None:
        pass


def make_server(proxy: Proxy, host: str = "127.0.0.1", port: int = 8080) -> ProxyServer:
    return ProxyServer(proxy, host, port)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--log", default="build/prediction_log.sqlite", help="prediction log (SQLite); '' for none")
    parser.add_argument("--env_file", help="KEY=VALUE settings file, re-read on SIGHUP and on change "
                                           "(default: $PROXY_ENV_FILE)")
    parser.add_argument("--port_file", help="write the bound port here once listening (use with --port 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s proxy: %(message)s")
    if args.log:
        os.makedirs(os.path.dirname(os.path.abspath(args.log)), exist_ok=True)
    try:
        proxy = Proxy(env_file=args.env_file, log_path=args.log or None)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    server = make_server(proxy, args.host, args.port)
    if args.port_file:
        with open(args.port_file + ".tmp", "w") as f:
            f.write(str(server.server_address[1]))
        os.replace(args.port_file + ".tmp", args.port_file)

    def stop(signum, frame):
        logging.info("signal %d: stopping (requests in flight finish, the log is written)", signum)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, lambda signum, frame: proxy.reload())
    logging.info("proxy on http://%s:%d -> %s; variants %s", args.host, server.server_address[1],
                 proxy.settings.backend, {v.name: v.weight for v in proxy.settings.variants.values()})
    try:
        server.serve_forever()
    finally:
        server.server_close()
        stats = proxy.close()  # requests in flight answer and are logged; later ones get a 503
        logging.info("prediction log closed: %s", stats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
