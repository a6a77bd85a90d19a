"""Proxy in front of TF Serving (or the local server): parameter-based control, A/B and shadow
traffic, prediction logging. Clients speak TF Serving's REST API to it, unchanged.

    python -m serving.proxy [--port 8080] [--log sqlite:///build/prediction_log.sqlite] [--env_file configs/proxy.env]

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
  PROXY_TIMEOUT_SECONDS   per backend call; at the deadline the call is cancelled (its
                          connection closed, so the server drops it if it has not started)  5
  PROXY_RETRIES           extra tries after a connection error or a 503   1
  PROXY_VARIANTS          JSON {name: {"weight": w, "label": l | "version": n, "backend": url}}
                          a variant with neither label nor version gets the latest version;
                          default {"default": {"weight": 1}}
  PROXY_SHADOW            a variant name: it gets a copy of every request (off the request
                          path) and is never the one that answers; its answers are logged
                          with shadow=1 and compared with the answer given
  PROXY_ROUTING_HEADER    request header whose value keys the sticky split  X-User-Id
                          (no such header: the request id, i.e. no stickiness)
  PROXY_ALLOW_CLIENT_ROUTING  true | false (default false): whether a client may choose what
                          answers, by a URL naming a version or label (/versions/n, /labels/l)
                          or by the X-Skewless-Variant request header; refused (403) otherwise
  PROXY_AUTH_TOKENS_FILE  a file of bearer tokens, one per line: when set, every /v1/ request
                          needs `Authorization: Bearer <token>` (401 otherwise); the health,
                          readiness and metrics paths stay open
  PROXY_MAX_ROWS          rows per request (instances, examples or inputs)  1000
  PROXY_MAX_IN_FLIGHT     backend calls at once; beyond, a request waits for a slot up to
                          PROXY_TIMEOUT_SECONDS, then gets 503 (skewless_proxy_overloaded)  256
  PROXY_COMPLETE_MISSING  true | false (default true): a :predict row ("instances" objects) that
                          leaves out named inputs of the signature gets them from the model's
                          own metadata as the one wire form of a missing value: NaN for a
                          number, "" for a string
  PROXY_HASH_ROUTING_KEY  true | false (default false): log sha256(PROXY_HASH_SALT + key)
                          instead of the routing key (the split itself is unchanged)
  PROXY_REDACT_FEATURES   JSON list of feature names logged as "[redacted]" (the model still
                          gets them; the monitor then skips them)          []
  PROXY_LOG_MAX_BODY_BYTES  a logged request or response longer than this is stored as
                          {"skewless_truncated": true, "bytes": n, "head": "..."}  65536
  PROXY_HOLDBACK_SHARE    share of routing keys (sticky, 0 to 0.5) held back from the model:
                          answered by PROXY_HOLDBACK_POLICY instead (default 0: none)
  PROXY_HOLDBACK_POLICY   fallback (PROXY_FALLBACK) | stable (the version PROXY_HOLDBACK_LABEL,
                          default stable, names) | random (a class drawn uniformly from
                          PROXY_CLASSES). With stable, PROXY_HOLDBACK_LABEL may not be the
                          label a variant answers from (refused: held-back users would get
                          the model); a variant pinned to a version, or with neither label
                          nor version (the latest), may answer from the label's version: the
                          settings cannot tell, so give variants labels. Every record carries
                          its `policy` ("model", "holdback:<policy>", "fallback", "client")
                          and `propensity`: the probability of the row's POLICY, not of the
                          answer given: 1 - share for the model, share for a held-back row,
                          share / K for a random draw. The proxy cannot log
                          the probability of the answer itself: it would need the model's
                          answer for held-back rows (never asked) and the baseline's for
                          model rows; so 1 / propensity weights the two policies' rows
                          equally, not the answers (README, "Training on served spans")
  PROXY_MODEL_REPOSITORY  the model repository TF Serving serves (<root>/<model>/<version>/), the
                          same folder or volume, read-only: the serving spec of the version that
                          answered (assets.extra/serving_spec.json, which the trainer writes) gives
                          the training vocabulary of each vocabulary feature, and served values
                          outside it are counted per feature (skewless_proxy_unseen_categories).
                          Read once per (model, version); a version without a serving spec or
                          vocabularies counts nothing (said once in the log). A folder that does not
                          exist is refused; unset: nothing counted. `make serve` and deploy/k8s set it
  PROXY_MODEL             the model /readyz checks: ready only when every variant's label or
                          version is AVAILABLE on its backend (unset: only that backends answer)
  PREDLOG_QUEUE_SIZE, PREDLOG_SEGMENT_RECORDS, PREDLOG_RETRY_SECONDS  the log's bounds
                          (records held in memory 10000, records per spool segment 5000,
                          seconds between tries of a failing store 1); read at start
  PROXY_LOG               where the prediction log goes (--log overrides): a path or
                          sqlite:///path (embedded default), or postgresql://user:pw@host/db
                          for several replicas sharing one store (serving/logstore.py)

The version that answered is the version logged: the proxy resolves a variant's label (or the
latest version) to a number from the backend's own metadata (refreshed every second, and at
once when the backend no longer has that version) and calls that version by its explicit URL
/versions/n, so the number in the log, the X-Skewless-Model-Version header and the body's
"skewless" object is the one that computed the answer, also while a label moves.

Every answer says who answered: headers X-Skewless-Variant, X-Skewless-Model-Version and
X-Request-Id (made by the proxy; a client's own X-Request-Id is kept apart in the log's
client_request_id and echoed as X-Client-Request-Id), and a "skewless" object beside
"predictions"/"results" in the body.

Every request and response goes to the prediction log (serving/predlog.py) before the answer is
sent; a graceful stop (SIGTERM, SIGINT) writes all of it; a crash loses nothing acknowledged;
storage that fails never fails a request (what cannot be kept is counted, exactly once).
Backend down: 503 with a message naming the variant and the backend; no answer in time: 504.
Client mistakes are 4xx and never counted as backend failures.

The HTTP server is serving/http.py's (aiohttp's low-level server); requests are handled on its event loop, and
backend calls use aiohttp's client (keep-alive pools, per-call timeouts, cancellation), so a
slow client or a slow backend holds no thread. The proxy image needs no TensorFlow.
"""

import argparse
import asyncio
import functools
import hashlib
import json
import logging
import math
import os
import random
import re
import resource
import secrets
import signal
import sys
import threading
import time
import uuid
from typing import Annotated, Any, Dict, List, Literal, Optional, Tuple
from urllib.parse import quote, urlsplit

import aiohttp
import prometheus_client as prom
import pydantic
import yarl

from serving import repository_layout, typed_config, wire
from serving.logstore import HOLDBACK_POLICY_PREFIX
from serving.http import HttpServer, Request, Response
from serving.predlog import PredictionLog

MAX_SHADOW_IN_FLIGHT = 64
# A shadow's regression answer agrees with the live one within this (relative, and absolute near 0): a
# constant, not a setting, so the agreement metric means the same on every deployment.
SHADOW_VALUE_TOLERANCE = 1e-3
METADATA_MAX_AGE = 1.0  # seconds a label's resolution is trusted before the backend is asked again
MAX_METADATA_ENTRIES = 1024  # metadata answers kept (backend, model path); clients choose the paths
MAX_MODEL_LABELS = 64  # distinct model names in metrics; others are counted as "other"
MAX_CLIENT_ID = 200
LARGE_BODY = 256 * 1024  # bodies above this are parsed off the event loop

class ConfigError(ValueError):
    """A setting with a bad value; the message names the key."""


# --- settings -----------------------------------------------------------------------------

def _number(key: str, text: str, minimum: float = 0.0, maximum: float = math.inf) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{key}: expected a number, got '{text}'") from None
    if not minimum <= value <= maximum:
        raise ConfigError(f"{key}: must be between {minimum:g} and {maximum:g}, got {value:g}")
    return value


def _http_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"expected http://host:port, got '{text}'")
    return text.rstrip("/")


HttpUrl = Annotated[str, pydantic.AfterValidator(_http_url)]
Name = Annotated[str, pydantic.Field(pattern=r"^[A-Za-z0-9_.-]+$")]
# PROXY_ variables read elsewhere (the CLI and the log): known, but not settings.
NOT_SETTINGS = ("PROXY_ENV_FILE", "PROXY_LOG")
# Settings where an empty value means itself, not "left out".
EMPTY_IS_A_VALUE = ("PROXY_ROUTING_HEADER", "PROXY_HASH_SALT")


class VariantSettings(typed_config.StrictConfig):
    """One entry of PROXY_VARIANTS: its share of traffic and what it calls (a label, a version, a backend)."""
    weight: float = pydantic.Field(1.0, ge=0, allow_inf_nan=False)
    label: Optional[Name] = None
    version: Optional[Annotated[int, pydantic.Field(gt=0)]] = None
    backend: Optional[HttpUrl] = None

    @pydantic.model_validator(mode="after")
    def _label_or_version(self) -> "VariantSettings":
        if self.label is not None and self.version is not None:
            raise typed_config.at("", "give a label or a version, not both")
        return self


class ProxySettings(pydantic.BaseModel):
    """The proxy's settings: PROXY_* variables of the environment and of PROXY_ENV_FILE (text, so not strict)."""
    model_config = pydantic.ConfigDict(extra="forbid")

    backend: HttpUrl = pydantic.Field("http://127.0.0.1:8501", alias="PROXY_BACKEND")
    enabled: bool = pydantic.Field(True, alias="PROXY_ENABLED")
    fallback: pydantic.Json[Dict[str, Any]] = pydantic.Field({}, alias="PROXY_FALLBACK")
    threshold: Optional[float] = pydantic.Field(None, ge=0, le=1, alias="PROXY_THRESHOLD")
    classes: Optional[pydantic.Json[List[Any]]] = pydantic.Field(None, alias="PROXY_CLASSES")
    timeout: float = pydantic.Field(5.0, ge=0.001, allow_inf_nan=False, alias="PROXY_TIMEOUT_SECONDS")
    retries: int = pydantic.Field(1, ge=0, le=10, alias="PROXY_RETRIES")
    routing_header: str = pydantic.Field("X-User-Id", alias="PROXY_ROUTING_HEADER")
    complete_missing: bool = pydantic.Field(True, alias="PROXY_COMPLETE_MISSING")
    max_rows: int = pydantic.Field(1000, ge=1, le=1_000_000, alias="PROXY_MAX_ROWS")
    max_in_flight: int = pydantic.Field(256, ge=1, le=100_000, alias="PROXY_MAX_IN_FLIGHT")
    allow_client_routing: bool = pydantic.Field(False, alias="PROXY_ALLOW_CLIENT_ROUTING")
    auth_tokens_file: Optional[str] = pydantic.Field(None, alias="PROXY_AUTH_TOKENS_FILE")
    hash_routing_key: bool = pydantic.Field(False, alias="PROXY_HASH_ROUTING_KEY")
    hash_salt: str = pydantic.Field("", alias="PROXY_HASH_SALT")
    redact: pydantic.Json[List[Annotated[str, pydantic.Field(min_length=1)]]] = pydantic.Field(
        [], alias="PROXY_REDACT_FEATURES", description="a JSON list of feature names")
    log_max_body: int = pydantic.Field(65536, ge=256, alias="PROXY_LOG_MAX_BODY_BYTES")
    model: Optional[Name] = pydantic.Field(None, alias="PROXY_MODEL")
    variants: pydantic.Json[Dict[str, VariantSettings]] = pydantic.Field(
        {"default": VariantSettings()}, alias="PROXY_VARIANTS")
    shadow: Optional[str] = pydantic.Field(None, alias="PROXY_SHADOW")
    holdback_share: float = pydantic.Field(0.0, ge=0, le=0.5, allow_inf_nan=False, alias="PROXY_HOLDBACK_SHARE")
    holdback_policy: Literal["fallback", "stable", "random"] = pydantic.Field("fallback", alias="PROXY_HOLDBACK_POLICY")
    holdback_label: Name = pydantic.Field("stable", alias="PROXY_HOLDBACK_LABEL")
    model_repository: Optional[str] = pydantic.Field(None, alias="PROXY_MODEL_REPOSITORY")

    @pydantic.model_validator(mode="before")
    @classmethod
    def _proxy_variables(cls, values: Any) -> Any:
        """Only PROXY_* variables are settings (a misspelt one is refused); an empty one is left out."""
        if not isinstance(values, dict):
            return values
        return {k: v.strip() for k, v in values.items()
                if k.startswith("PROXY_") and k not in NOT_SETTINGS and (v.strip() or k in EMPTY_IS_A_VALUE)}

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> "ProxySettings":
        if self.classes is not None and len(self.classes) != 2 and self.threshold is not None:
            raise typed_config.at("PROXY_CLASSES", f"a threshold needs exactly two classes, got {self.classes}")
        if not self.variants:
            raise typed_config.at("PROXY_VARIANTS", "at least one variant is needed")
        if self.shadow is not None and self.shadow not in self.variants:
            raise typed_config.at("PROXY_SHADOW", f"'{self.shadow}' is not a variant; variants: {sorted(self.variants)}")
        if self.holdback_share > 0 and self.holdback_policy == "random" and not self.classes:
            raise typed_config.at("PROXY_HOLDBACK_POLICY", "random draws a class uniformly from PROXY_CLASSES: set "
                                                           'PROXY_CLASSES (e.g. ["no", "yes"])')
        if not any(n != self.shadow and v.weight > 0 for n, v in self.variants.items()):
            raise typed_config.at("PROXY_VARIANTS", "no variant with a weight > 0 is left to answer "
                                                    "(the shadow variant never answers)")
        if self.holdback_share > 0 and self.holdback_policy == "stable":
            self._holdback_apart_from_the_model()
        return self

    def _holdback_apart_from_the_model(self) -> None:
        """A held-back user answered by the label a model variant answers from gets that model: no guard."""
        answering = [(n, v) for n, v in self.variants.items() if n != self.shadow and v.weight > 0]
        holdback_backend = answering[0][1].backend or self.backend  # the backend held-back requests go to
        for name, variant in answering:
            if variant.label == self.holdback_label and (variant.backend or self.backend) == holdback_backend:
                raise typed_config.at(
                    "PROXY_HOLDBACK_LABEL",
                    f"'{self.holdback_label}' is also the label variant '{name}' of PROXY_VARIANTS answers from, so "
                    "held-back users get the same model and nothing is held back (PROXY_HOLDBACK_POLICY=stable). "
                    "Answer the model under training from another label (e.g. PROXY_VARIANTS="
                    '{"candidate": {"label": "canary"}} after make promote LABEL=canary) and hold back on '
                    f"'{self.holdback_label}', or set PROXY_HOLDBACK_POLICY=fallback")


class Variant:
    def __init__(self, name: str, backend: str, weight: float, label: Optional[str], version: Optional[int]):
        self.name, self.backend, self.weight, self.label, self.version = name, backend, weight, label, version

    def path(self, model: str, verb: str) -> str:
        pinned = f"/labels/{self.label}" if self.label else f"/versions/{self.version}" if self.version else ""
        return f"/v1/models/{model}{pinned}:{verb}"


class Settings:
    """One consistent set of proxy parameters; replaced whole on reload, never edited."""

    def __init__(self, values: Dict[str, str]):
        try:
            config = ProxySettings.model_validate(values)
        except pydantic.ValidationError as e:
            raise ConfigError(typed_config.describe(e, ProxySettings, "")) from None
        for name in ("backend", "enabled", "fallback", "threshold", "classes", "timeout", "retries", "routing_header",
                     "complete_missing", "max_rows", "max_in_flight", "allow_client_routing", "auth_tokens_file",
                     "hash_routing_key", "hash_salt", "redact", "log_max_body", "model", "model_repository"):
            setattr(self, name, getattr(config, name))
        self.auth_tokens = _read_tokens(self.auth_tokens_file) if self.auth_tokens_file else None
        if self.model_repository is not None and not os.path.isdir(self.model_repository):
            raise ConfigError(f"PROXY_MODEL_REPOSITORY: {self.model_repository} is not a folder: mount the model "
                              "repository TF Serving serves there (read-only), or unset the key to count no unseen "
                              "categories")
        self.variants: Dict[str, Variant] = {
            name: Variant(name, v.backend or self.backend, v.weight, v.label, v.version)
            for name, v in config.variants.items()}
        self.shadow = config.shadow
        self.holdback = (Holdback(config.holdback_share, config.holdback_policy, config.holdback_label, self.classes)
                         if config.holdback_share > 0 else None)
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


class Holdback:
    """Users held back from the model under training (the feedback-loop guard): a sticky share of
    routing keys answered by a policy that does not depend on that model."""

    def __init__(self, share: float, policy: str, label: str, classes: Optional[List[Any]]):
        self.share, self.policy, self.label, self.classes = share, policy, label, classes

    def holds(self, key: str) -> bool:
        """Sticky, and independent of the A/B split (another hash of the same key)."""
        point = int.from_bytes(hashlib.sha256(b"holdback:" + key.encode()).digest()[:8], "big") / 2 ** 64
        return point < self.share

    @property
    def name(self) -> str:
        return HOLDBACK_POLICY_PREFIX + self.policy

    def propensity(self) -> float:
        """P(this answer for a row | the request): the share held back, times 1/K for a uniform draw."""
        return self.share / len(self.classes) if self.policy == "random" else self.share


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



def _read_tokens(path: str) -> frozenset:
    """Bearer tokens, one per line (# comments); a missing or empty file is refused, naming it."""
    try:
        with open(path) as f:
            tokens = frozenset(t for t in (line.split("#", 1)[0].strip() for line in f) if t)
    except OSError as e:
        raise ConfigError(f"PROXY_AUTH_TOKENS_FILE: cannot read {path} ({e.strerror})") from None
    if not tokens:
        raise ConfigError(f"PROXY_AUTH_TOKENS_FILE: {path} holds no token (one per line); unset the key to turn "
                          "authentication off")
    return tokens

MAX_VOCABULARY_FEATURES = 100  # bounds the unseen-categories counter's feature label
MAX_VOCABULARY_VERSIONS = 64  # (model, version) vocabularies kept; A/B, shadow and holdback need a few
UNREADABLE_RETRY_SECONDS = 60.0  # a serving spec the file system failed to give is asked again after this


def read_vocabularies(repository: str, model: str, version: int) -> Optional[Dict[str, frozenset]]:
    """{feature: its training values} from the `vocabularies` of a version's serving spec (components/
    export.py writes them), read through the repository's layout; None when the version has none
    usable (said in the log, naming the file and the fix). OSError is left to the caller."""
    where = f"unseen categories of {model} version {version} are not counted"
    try:
        version_dir = repository_layout.version_path(repository_layout.model_path(repository, model), version)
        spec = repository_layout.read_serving_spec(version_dir)
    except repository_layout.ConfigError as e:
        logging.warning("%s: %s", where, e)
        return None
    path = os.path.join(version_dir, repository_layout.SERVING_SPEC_FILE)
    vocabularies = spec.get("vocabularies")
    if not spec:
        logging.warning("%s: %s is missing or empty (PROXY_MODEL_REPOSITORY is %s; is it the folder TF Serving "
                        "serves?)", where, path, repository)
    elif not isinstance(vocabularies, dict) or not all(isinstance(v, list) for v in vocabularies.values()):
        logging.warning("%s: %s has no `vocabularies` object of lists (a model exported before the trainer "
                        "wrote them): re-export it to count them", where, path)
    elif len(vocabularies) > MAX_VOCABULARY_FEATURES:
        logging.warning("%s: %s has %d vocabularies; at most %d features are counted", where, path,
                        len(vocabularies), MAX_VOCABULARY_FEATURES)
    else:
        return {name: frozenset(map(str, values)) for name, values in vocabularies.items()}
    return None


def unseen_categories(body: Dict[str, Any], vocabularies: Dict[str, frozenset]) -> Dict[str, int]:
    """{feature: how many of the request's rows carry a string value outside its training vocabulary},
    over the rows wire.feature_rows reads (instances, inputs columns, examples with their context);
    a missing value ("") is not a category."""
    counts: Dict[str, int] = {}
    rows = wire.feature_rows(body)
    for name, known in vocabularies.items():
        unseen = sum(1 for r in rows if (v := _category(wire.one_element(r.get(name)))) and v not in known)
        if unseen:
            counts[name] = unseen
    return counts


def _category(value: Any) -> Optional[str]:
    """A served value as its vocabulary entry: a string as is, a whole number as its digits (tf.Transform
    writes an int column's vocabulary as text); None for anything else (missing, b64, a fraction)."""
    if isinstance(value, str):
        return value
    if wire.is_number(value) and math.isfinite(value) and value == int(value):
        return str(int(value))
    return None


# --- backend calls ------------------------------------------------------------------------

class BackendError(Exception):
    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason = code, reason


class Overloaded(Exception):
    """No backend slot (PROXY_MAX_IN_FLIGHT) came free within the request's deadline: the proxy's own
    queue, answered 503 (UNAVAILABLE, as TF Serving's full batching queue) and never a backend error."""


_JSON_BODY = {"Content-Type": "application/json"}
_NO_HEADERS: Dict[str, str] = {}


@functools.lru_cache(maxsize=1024)
def _backend_url(backend: str, path: str) -> yarl.URL:
    """The URL aiohttp would parse from backend + path on every call, parsed once (paths repeat: a
    model, a version, a verb); bounded, as model names come from clients."""
    return yarl.URL(backend + path)


@functools.lru_cache(maxsize=64)
def _client_timeout(seconds: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=seconds)


class Backends:
    """aiohttp keep-alive pools per backend, on the proxy's event loop; retries on connection errors and 503.
    A call past its timeout is cancelled: aiohttp closes its connection, so the backend (TF Serving, or
    serving/http.py's server, which drops work whose client has gone) does not compute for nobody."""

    def __init__(self):
        self._session: Optional[aiohttp.ClientSession] = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No cookie jar: a backend's Set-Cookie must not ride along on other clients' calls (and
            # the jar's per-call lookups cost time on every request).
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30, enable_cleanup_closed=True),
                skip_auto_headers=("User-Agent",), auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def call(self, backend: str, method: str, path: str, body: Optional[bytes], timeout: float, retries: int,
                   who: str) -> Tuple[int, bytes]:
        last = None
        headers = _JSON_BODY if body else _NO_HEADERS
        for attempt in range(retries + 1):
            try:
                async with self._client().request(method, _backend_url(backend, path), data=body, headers=headers,
                                                  timeout=_client_timeout(timeout)) as response:
                    status, data = response.status, await response.read()
            except asyncio.TimeoutError:
                raise BackendError(504, "timeout", f"{who} ({backend}) did not answer within {timeout:g} s") from None
            except (aiohttp.ClientError, OSError) as e:
                last = f"{type(e).__name__}: {e}"
                continue
            if status == 503 and attempt < retries:
                last = f"HTTP 503: {data[:200].decode(errors='replace')}"
                continue
            return status, data
        raise BackendError(503, "unavailable", f"{who} ({backend}) unavailable after {retries + 1} "
                                               f"tr{'y' if retries == 0 else 'ies'}: {last}")

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()


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
        self.log = PredictionLog(log_path, registry=self.registry, **_log_options(self.base_env)) if log_path else None
        self.backends = Backends()
        self._metadata: Dict[Tuple[str, str], Tuple[float, Optional[Dict[str, Any]]]] = {}
        self._metadata_asks: Dict[Tuple[str, str], "asyncio.Future"] = {}
        self._known_models: set = set()
        self._series: Dict[Tuple[int, Tuple[str, ...]], Any] = {}
        self._fills: Dict[Tuple[str, str], Tuple[Optional[Dict[str, Any]], Dict[str, Tuple[int, tuple]]]] = {}
        # (repository, model, version) -> (retry after, or None: final; its vocabularies, or None: not counted)
        self._vocabularies: Dict[Tuple[str, str, int], Tuple[Optional[float], Optional[Dict[str, frozenset]]]] = {}
        self._stop = threading.Event()
        self._in_flight = 0
        self._backend_slots: Optional[asyncio.Semaphore] = None
        self._shadows: set = set()
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
                                      "(binary models; `value` for regression); finite values only.",
                                      ["model", "variant"], registry=r,
                                      buckets=tuple(round(0.05 * i, 2) for i in range(1, 21)))
        self.m_nonfinite = prom.Counter("skewless_proxy_nonfinite_scores", "Scores that were NaN or infinite "
                                        "(kept out of skewless_proxy_prediction_score).", ["model", "variant"],
                                        registry=r)
        self.m_fallback = prom.Counter("skewless_proxy_fallback", "Requests answered with the fallback (disabled).",
                                       ["model"], registry=r)
        self.m_backend_errors = prom.Counter("skewless_proxy_backend_errors", "Backend unavailable, timed out or 5xx "
                                             "(never a client's mistake).", ["model", "variant", "reason"], registry=r)
        self.m_overloaded = prom.Counter("skewless_proxy_overloaded", "Requests answered 503 because no backend "
                                         "slot (PROXY_MAX_IN_FLIGHT) came free within PROXY_TIMEOUT_SECONDS.",
                                         ["model"], registry=r)
        self.m_client_errors = prom.Counter("skewless_proxy_client_errors", "Requests refused before any backend "
                                            "call, by reason.", ["reason"], registry=r)
        self.m_shadow = prom.Counter("skewless_proxy_shadow", "Shadow copies, by outcome: same_class, "
                                     "different_class, same_value, different_value, incomparable (no answer "
                                     "field both share, or other row counts), error, skipped (too many in flight).",
                                     ["model", "variant", "outcome"], registry=r)
        self.m_reloads = prom.Counter("skewless_proxy_config_reloads", "Settings reloads, by result.", ["result"],
                                      registry=r)
        self.m_enabled = prom.Gauge("skewless_proxy_enabled", "1 if PROXY_ENABLED, else 0 (fallback).", registry=r)
        self.m_threshold = prom.Gauge("skewless_proxy_threshold", "PROXY_THRESHOLD (NaN: the model's own).",
                                      registry=r)
        self.m_weight = prom.Gauge("skewless_proxy_variant_weight", "Traffic share per answering variant.",
                                   ["variant"], registry=r)
        self.m_unseen = prom.Counter("skewless_proxy_unseen_categories", "Served values of a categorical feature "
                                     "outside the training vocabulary of the version that answered (its serving "
                                     "spec in PROXY_MODEL_REPOSITORY).", ["model", "feature"], registry=r)

    async def count_unseen(self, repository: str, model: str, version: int, body: Dict[str, Any]) -> None:
        """Adds each feature's values outside the answering version's training vocabulary to
        skewless_proxy_unseen_categories."""
        key = (repository, model, version)
        cached = self._vocabularies.get(key)
        if cached is None or (cached[0] is not None and time.monotonic() > cached[0]):
            try:  # off the event loop: the repository may be a network volume
                vocabularies = await asyncio.get_running_loop().run_in_executor(None, read_vocabularies, *key)
                cached = (None, vocabularies)
            except OSError as e:
                logging.warning("unseen categories of %s version %d are not counted for %g s: cannot read its serving "
                                "spec under PROXY_MODEL_REPOSITORY %s (%s)", model, version,
                                UNREADABLE_RETRY_SECONDS, repository, e)
                cached = (time.monotonic() + UNREADABLE_RETRY_SECONDS, None)
            self._vocabularies.pop(key, None)
            self._vocabularies[key] = cached
            while len(self._vocabularies) > MAX_VOCABULARY_VERSIONS:
                del self._vocabularies[next(iter(self._vocabularies))]
        if cached[1]:
            label = self.model_label(model)
            for feature, n in unseen_categories(body, cached[1]).items():
                self.series(self.m_unseen, label, feature).inc(n)

    def series(self, metric: Any, *labels: str) -> Any:
        """metric.labels(*labels), made once per label set (prometheus_client validates and locks on every
        labels() call: 6 us each, four times a request). As bounded as the series themselves: model names
        pass through model_label, variants come from the settings, codes are HTTP codes."""
        key = (id(metric), labels)
        child = self._series.get(key)
        if child is None:
            child = self._series[key] = metric.labels(*labels)
        return child

    def model_label(self, model: str) -> str:
        """The metrics label for a model name: names the backend knows, up to MAX_MODEL_LABELS; else "other"."""
        return model if model in self._known_models else "other"

    def _saw_model(self, model: str, status: int) -> None:
        if status != 404 and model not in self._known_models and len(self._known_models) < MAX_MODEL_LABELS:
            self._known_models.add(model)

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
        self._backend_slots = None  # PROXY_MAX_IN_FLIGHT may have changed
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

    # --- the backend's metadata: versions for routing, input names for completing rows ----
    async def metadata(self, backend: str, model_path: str, max_age: float = METADATA_MAX_AGE,
                       fresh: bool = False) -> Optional[Dict[str, Any]]:
        """TF Serving's metadata JSON for /v1/models/m[/labels/l|/versions/n], asked of the backend at most
        every `max_age` s (one ask at a time per path); on a failed ask the last answer stands. Metadata,
        not status: status ignores a label (get_model_status_impl.cc:82-101)."""
        key = (backend, model_path)
        cached = self._metadata.get(key)
        if cached and not fresh and time.monotonic() - cached[0] < max_age:
            return cached[1]
        ask = self._metadata_asks.get(key)
        if ask is None:
            ask = asyncio.ensure_future(self._ask_metadata(key, cached[1] if cached else None))
            self._metadata_asks[key] = ask
            ask.add_done_callback(lambda _: self._metadata_asks.pop(key, None))
        return await asyncio.shield(ask)

    async def _ask_metadata(self, key: Tuple[str, str], previous: Optional[Dict[str, Any]]):
        answer = previous
        try:
            status, data = await self.backends.call(key[0], "GET", key[1] + "/metadata", None,
                                                    self.settings.timeout, 0, "metadata")
            if status == 200:
                answer = json.loads(data)
            elif 400 <= status < 500:
                answer = None  # the label or model is gone: do not keep routing to it
        except (BackendError, ValueError):
            pass
        self._metadata.pop(key, None)  # re-inserted last: the dict's order is the order of the asks
        self._metadata[key] = (time.monotonic(), answer)
        while len(self._metadata) > MAX_METADATA_ENTRIES:  # random model names in URLs must not grow it
            oldest = next(iter(self._metadata))
            del self._metadata[oldest]
            self._fills.pop(oldest, None)
        return answer

    async def resolve(self, variant: "Variant", model: str, fresh: bool = False) -> Optional[int]:
        """The version number a variant's label (or the latest) names on its backend now."""
        if variant.version:
            return variant.version
        meta = await self.metadata(variant.backend, variant.path(model, "")[:-1], fresh=fresh)
        try:
            return int(meta["model_spec"]["version"])
        except (TypeError, KeyError, ValueError):
            return None

    async def missing_value_fills(self, backend: str, model_path: str, signature: str) -> Tuple[int, tuple]:
        """(how many inputs the signature has, ((name, the wire form of its missing value), ...) for its
        string and float inputs), from the backend's metadata (a version's never changes); worked out
        once per metadata answer, not per request."""
        meta = await self.metadata(backend, model_path, max_age=3600.0 if "/versions/" in model_path else 5.0)
        key = (backend, model_path)  # one entry per metadata entry: as bounded as self._metadata
        known = self._fills.get(key)
        if known is None or known[0] is not meta:
            known = self._fills[key] = (meta, _missing_value_fills(meta))
        return known[1].get(signature, (0, ()))

    async def complete(self, backend: str, model_path: str, body: Dict[str, Any]) -> bool:
        """Adds absent named inputs to every :predict row as NaN / "" (True if a row changed)."""
        rows = body.get("instances")
        if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
            return False
        signature = body.get("signature_name") or "serving_default"
        if not isinstance(signature, str):
            return False
        inputs, fills = await self.missing_value_fills(backend, model_path, signature)
        if inputs < 2:  # a single input is sent bare; nothing to complete
            return False
        changed = False
        for row in rows:
            if "b64" in row and len(row) == 1:
                continue
            for name, gap in fills:
                if name not in row:
                    row[name] = gap
                    changed = True
        return changed

    async def call_version(self, variant: "Variant", model: str, verb: str, body: Dict[str, Any], raw: bytes,
                           retries: int, who: str) -> Tuple[int, bytes, Optional[int], bytes]:
        """Calls the variant at the explicit version its label (or latest) resolves to.
        Returns (status, data, version that answered or None, the body sent)."""
        settings = self.settings
        version = await self.resolve(variant, model)
        for attempt in range(2):
            if version is None:  # unresolved (backend down, label unknown): the backend's own answer
                path = variant.path(model, verb)
            else:
                path = f"/v1/models/{quote(model, safe='')}/versions/{version}:{verb}"
            sent = raw
            if verb == "predict" and settings.complete_missing and await self.complete(
                    variant.backend, path.rsplit(":", 1)[0], body):
                sent = json.dumps(body).encode()  # what the model sees is what is logged
                refused = _number_too_big(raw) if b"Infinity" in sent else None
                if refused is not None:  # one request, one meaning: 400 whether or not a row was completed
                    return refused.http_status, wire.error_body(refused.message), None, raw
            slots = self.backend_slots()
            try:  # waits for a slot within the request's deadline, not for ever
                if slots.locked():  # wait_for costs a task (about 40 us here): only when there is a wait
                    await asyncio.wait_for(slots.acquire(), settings.timeout)
                else:
                    await slots.acquire()
            except asyncio.TimeoutError:
                raise Overloaded(f"{who}: all {settings.max_in_flight} backend calls allowed at once "
                                 f"(PROXY_MAX_IN_FLIGHT) were busy for {settings.timeout:g} s "
                                 "(PROXY_TIMEOUT_SECONDS): try again, or raise PROXY_MAX_IN_FLIGHT") from None
            try:
                status, data = await self.backends.call(variant.backend, "POST", path, sent, settings.timeout,
                                                        retries, who)
            finally:
                slots.release()
            if status == 404 and version is not None and not variant.version and attempt == 0:
                # The version was unloaded after we resolved the label: resolve again, call the new one.
                newer = await self.resolve(variant, model, fresh=True)
                if newer is not None and newer != version:
                    version = newer
                    continue
            break
        return status, data, version, sent

    def backend_slots(self) -> asyncio.Semaphore:
        if self._backend_slots is None:
            self._backend_slots = asyncio.Semaphore(self.settings.max_in_flight)
        return self._backend_slots

    # --- answering -----------------------------------------------------------------------
    def fallback(self, body: Dict[str, Any], verb: str) -> Dict[str, Any]:
        rows = _row_count(body)
        key = "predictions" if verb == "predict" else "results"
        return {key: [dict(self.settings.fallback) for _ in range(rows)]}

    def holdback_answer(self, body: Dict[str, Any], verb: str, holdback: Holdback) -> Dict[str, Any]:
        """A held-back request's answer: the fallback, or a class drawn uniformly per row."""
        if holdback.policy == "fallback":
            return self.fallback(body, verb)
        rows = []
        for _ in range(_row_count(body)):
            class_id = random.randrange(len(holdback.classes))
            rows.append({"class_ids": class_id, "classes": holdback.classes[class_id]})
        return {"predictions" if verb == "predict" else "results": rows}

    def apply_threshold(self, answer: Dict[str, Any]) -> None:
        threshold, classes = self.settings.threshold, self.settings.classes
        if threshold is None:
            return
        for prediction in answer.get("predictions", []):
            if isinstance(prediction, dict) and isinstance(prediction.get("score"), (int, float)):
                if not math.isfinite(prediction["score"]):
                    continue  # no class from a NaN score: the model's own fields stand
                class_id = int(prediction["score"] >= threshold)
                prediction["class_ids"] = class_id
                if classes is not None:
                    prediction["classes"] = classes[class_id]

    def observe_scores(self, model: str, variant: str, answer: Dict[str, Any]) -> None:
        histogram = None
        predictions = answer.get("predictions", [])
        for prediction in predictions if isinstance(predictions, list) else []:
            if isinstance(prediction, dict):
                value = prediction.get("score", prediction.get("value"))
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    if not math.isfinite(value):
                        self.series(self.m_nonfinite, model, variant).inc()
                        continue
                    histogram = histogram or self.series(self.m_score, model, variant)
                    histogram.observe(value)

    def log_text(self, text: str, settings: "Settings") -> str:
        """A body as the log keeps it: whole, or truncated with a marker past PROXY_LOG_MAX_BODY_BYTES."""
        size = len(text.encode("utf-8", "replace"))
        if size <= settings.log_max_body:
            return text
        return json.dumps({"skewless_truncated": True, "bytes": size, "head": text[:settings.log_max_body // 8]})

    def logged_request(self, body: Optional[Dict[str, Any]], sent: bytes, settings: "Settings") -> str:
        if body is not None and settings.redact:
            redacted = _redact(body, set(settings.redact))
            return self.log_text(_dumps(redacted), settings)
        return self.log_text(sent.decode(errors="replace"), settings)

    def logged_key(self, key: Optional[str], settings: "Settings") -> Optional[str]:
        if key is None or not settings.hash_routing_key:
            return key
        return "sha256:" + hashlib.sha256((settings.hash_salt + key).encode()).hexdigest()

    def shadow(self, settings: "Settings", model: str, verb: str, body: Dict[str, Any], raw: bytes, record_id: str,
               client_id: Optional[str], ts: float, routing_key: Optional[str], answer: Optional[Dict[str, Any]]):
        variant = settings.variants[settings.shadow]
        if len(self._shadows) >= MAX_SHADOW_IN_FLIGHT:
            self.m_shadow.labels(self.model_label(model), variant.name, "skipped").inc()
            return

        async def run():
            try:
                started = time.perf_counter()
                version = None
                try:
                    status, data, version, sent = await self.call_version(
                        variant, model, verb, json.loads(raw), raw, 0, f"shadow variant '{variant.name}'")
                except BackendError as e:
                    status, data, sent = e.code, json.dumps({"error": str(e)}).encode(), raw
                except Overloaded as e:
                    status, data, sent = 503, json.dumps({"error": str(e)}).encode(), raw
                latency = (time.perf_counter() - started) * 1e3
                response = _loads(data)
                outcome = shadow_outcome(verb, answer, response) if status == 200 and answer is not None else "error"
                self.m_shadow.labels(self.model_label(model), variant.name, outcome).inc()
                if self.log:
                    self.log.log({"request_id": f"{record_id}:shadow", "client_request_id": client_id, "ts": ts,
                                  "model": model, "variant": variant.name,
                                  "model_version": version if status == 200 else None, "shadow": 1, "api": verb,
                                  "status": status, "latency_ms": latency, "routing_key": routing_key,
                                  "request": self.logged_request(body, sent, settings),
                                  "response": self.log_text(_dumps(response), settings)})
            except Exception:  # a shadow must never disturb anything
                logging.exception("shadow request failed")

        task = asyncio.ensure_future(run())
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

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

    def drain(self, timeout: float = 30.0) -> None:
        """Refuse new requests; wait for those in flight and their shadow copies (called off the event loop)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            self._stopping = True
            self._idle.wait_for(lambda: self._in_flight == 0, timeout)
        while self._shadows and time.monotonic() < deadline:
            time.sleep(0.02)

    def close(self, timeout: float = 30.0) -> Dict[str, Any]:
        """After drain(): stop the settings watcher and write the log; returns the log's stats."""
        with self._idle:
            self._stopping = True
        self._stop.set()
        return self.log.close(timeout) if self.log else {}


_MISSING = {"DT_STRING": "", "DT_FLOAT": math.nan, "DT_DOUBLE": math.nan, "DT_HALF": math.nan}


def _missing_value_fills(meta: Optional[Dict[str, Any]]) -> Dict[str, Tuple[int, tuple]]:
    """{signature: (its input count, ((input, missing value), ...))} of TF Serving's metadata JSON."""
    try:
        defs = meta["metadata"]["signature_def"]["signature_def"]
        signatures = list(defs.items())
    except (TypeError, KeyError, AttributeError):
        return {}
    fills = {}
    for name, definition in signatures:
        try:
            types = {k: v.get("dtype", "") for k, v in definition.get("inputs", {}).items()}
        except (TypeError, KeyError, AttributeError):
            types = {}
        fills[name] = (len(types), tuple((k, _MISSING[t]) for k, t in types.items() if t in _MISSING))
    return fills


def _log_options(env: Dict[str, str]) -> Dict[str, Any]:
    """The prediction log's bounds, from PREDLOG_QUEUE_SIZE, PREDLOG_SEGMENT_RECORDS, PREDLOG_RETRY_SECONDS."""
    options = {}
    for key, name, low, high in (("PREDLOG_QUEUE_SIZE", "queue_size", 1, 10_000_000),
                                 ("PREDLOG_SEGMENT_RECORDS", "segment_records", 1, 10_000_000),
                                 ("PREDLOG_RETRY_SECONDS", "retry_seconds", 0.01, 3600)):
        if env.get(key, "").strip():
            value = _number(key, env[key], low, high)
            options[name] = value if name == "retry_seconds" else int(value)
    return options


def _row_answer(verb: str, row: Any) -> Optional[Tuple[str, Any]]:
    """("class", what the client is told) or ("value", a regression number) for one answer row; None if neither."""
    if verb == "classify":  # [[label, score], ...]: the top label is the answer
        if isinstance(row, list) and row and all(isinstance(p, list) and len(p) == 2 and wire.is_number(p[1]) for p in row):
            return "class", max(row, key=lambda p: p[1])[0]
        return None
    row = wire.one_element(row)
    if isinstance(row, dict):
        for key in ("classes", "class_ids"):
            if key in row:
                return "class", wire.one_element(row[key])
        value = wire.one_element(row.get("value", row.get("outputs", row.get("predictions"))))
        return ("value", float(value)) if wire.is_number(value) else None
    return ("value", float(row)) if wire.is_number(row) else None


def shadow_outcome(verb: str, answer: Dict[str, Any], shadow: Dict[str, Any]) -> str:
    """How a shadow's 200 answer compares with the client's: same_class / different_class (predict with
    classes or class_ids, classify by top label), same_value / different_value (regression, within
    SHADOW_VALUE_TOLERANCE), incomparable (no such field in every row of both, or other row counts)."""
    rows_a, rows_b = wire.answer_rows(answer, verb), wire.answer_rows(shadow, verb)
    if not rows_a or rows_b is None or len(rows_a) != len(rows_b):
        return "incomparable"
    pairs = [(_row_answer(verb, a), _row_answer(verb, b)) for a, b in zip(rows_a, rows_b)]
    kinds = {x[0] for pair in pairs for x in pair if x is not None}
    if any(a is None or b is None for a, b in pairs) or len(kinds) != 1:
        return "incomparable"
    if kinds == {"class"}:
        return "same_class" if all(a[1] == b[1] for a, b in pairs) else "different_class"
    same = all(math.isclose(a[1], b[1], rel_tol=SHADOW_VALUE_TOLERANCE, abs_tol=SHADOW_VALUE_TOLERANCE)
               for a, b in pairs)
    return "same_value" if same else "different_value"


def _loads(data: bytes) -> Dict[str, Any]:
    try:
        value = json.loads(data)
        return value if isinstance(value, dict) else {"error": "backend answered a non-object"}
    except (ValueError, RecursionError):
        return {"error": f"backend answered non-JSON: {data[:200].decode(errors='replace')}"}


def _number_too_big(raw: bytes) -> Optional[wire.ServingError]:
    """The server's refusal of a number beyond a double (1e400) in the client's body, or None.
    json.loads reads 1e400 as infinity and json.dumps would send it on as the token Infinity,
    which the server accepts: a completed row must not turn a refused request into a served one.
    Asked only when the completed body holds an Infinity (a token, an overflow, or that text)."""
    try:
        json.loads(raw, parse_float=wire.finite_double)
    except wire.ServingError as e:
        return e
    except (ValueError, RecursionError):  # the body parsed once already; nothing more to say
        pass
    return None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _double(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: valid JSON, but _dumps would write null for it
        raise ValueError(f"{text} is beyond a double")
    return value


_STRICT_JSON = json.JSONDecoder(parse_constant=_no_constant, parse_float=_double)


def _parse_answer(data: bytes) -> Tuple[Dict[str, Any], Optional[str]]:
    """The backend's answer as _loads reads it, and its text when that text can be sent on as it is
    (parsing is needed anyway, for the metrics; writing it again is not): strict JSON in UTF-8
    (no NaN or Infinity, which TF Serving writes as bare tokens, and no number beyond a double),
    an object, no "skewless" key. Otherwise None, and _dumps writes the answer."""
    try:
        text = data.decode("utf-8")
        answer = _STRICT_JSON.decode(text)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return _loads(data), None
    if not isinstance(answer, dict):
        return _loads(data), None
    return answer, (text if "skewless" not in answer else None)


def _with_key(text: str, key: str, value: Any) -> str:
    """An object's JSON text with one more key last, the rest of the text as it was."""
    inner = text.rstrip()[:-1].rstrip()  # strict JSON of an object ends with its closing brace
    return f"{inner}{'' if inner.endswith('{') else ', '}{json.dumps(key)}: {_dumps(value)}}}"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _dumps(value: Any) -> str:
    """Always valid JSON: a NaN or infinity (TF Serving writes them as bare tokens) becomes null."""
    try:
        return json.dumps(value, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(value), allow_nan=False)


def _redact(body: Dict[str, Any], names: set) -> Dict[str, Any]:
    return wire.redact_request(body, names)


def _row_count(body: Dict[str, Any]) -> int:
    return wire.request_row_count(body)


_PRINTABLE = re.compile(r"[\x21-\x7e]+")


class ProxyApi:
    """One client request -> one Response, on serving/http.py's event loop."""

    def __init__(self, proxy: Proxy):
        self.proxy = proxy

    async def handle(self, request: Request) -> Response:
        settings = self.proxy.settings
        if request.method == "GET":
            if request.target == "/monitoring/prometheus/metrics":
                return Response(200, prom.generate_latest(self.proxy.registry), prom.CONTENT_TYPE_LATEST)
            if request.target == "/healthz":
                log = self.proxy.log.stats() if self.proxy.log else None
                return _answer(200, {"status": "ok", **({"prediction_log": {
                    k: log[k] for k in ("state", "problems", "received", "written", "queued", "deferred", "lost",
                                        "torn", "recovered", "replay_pending")}} if log else {})})
            if request.target == "/readyz":
                return await self._ready()
        try:
            route = wire.parse(request.method, request.target) if wire.is_api_path(request.target) else None
        except wire.ServingError as e:  # TF Serving's answer for a malformed URL, without a backend call
            return self._refuse(e.http_status, "url", e.message)
        if route is None:
            return self._refuse(404, "url", f"Not found: {request.method} {request.target[:200]} "
                                            "(the API is under /v1/)")
        if settings.auth_tokens is not None and not _authorized(request.headers.get("Authorization"), settings):
            return self._refuse(401, "auth", "missing or unknown bearer token: send 'Authorization: Bearer <token>'",
                                {"WWW-Authenticate": 'Bearer realm="skewless"'})
        if request.method == "GET":
            return await self._forward_get(route)
        if not self.proxy.begin():
            return _answer(503, {"error": "the proxy is shutting down; retry on another replica"},
                           {"Connection": "close"})
        try:
            return await self._post(request, route, settings)
        finally:
            self.proxy.end()

    def _refuse(self, code: int, reason: str, message: str, headers: Optional[Dict[str, str]] = None) -> Response:
        self.proxy.m_client_errors.labels(reason).inc()
        return _answer(code, {"error": message}, headers)

    async def _ready(self) -> Response:
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
                status, data = await self.proxy.backends.call(variant.backend, "GET", target, None, settings.timeout,
                                                              0, f"variant '{variant.name}'")
            except BackendError as e:
                problems.append(str(e))
                continue
            if status != 200:
                problems.append(f"variant '{variant.name}': GET {target} answered {status}: "
                                f"{_loads(data).get('error', '')}")
            elif settings.model and "model_spec" not in _loads(data):
                problems.append(f"variant '{variant.name}': {target} has no servable version yet")
        return _answer(503 if problems else 200, {"status": "unavailable" if problems else "ok", "problems": problems})

    async def _forward_get(self, route: wire.Route) -> Response:
        settings = self.proxy.settings
        variant = settings.answering[0]
        try:
            status, data = await self.proxy.backends.call(variant.backend, "GET", _backend_path(route), None,
                                                          settings.timeout, settings.retries,
                                                          f"variant '{variant.name}'")
            return Response(status, data)
        except BackendError as e:
            return _answer(e.code, {"error": str(e)})

    async def _post(self, request: Request, route: wire.Route, settings: Settings) -> Response:
        started, ts = time.perf_counter(), time.time()
        proxy = self.proxy
        record_id = uuid.uuid4().hex  # the proxy's own: a client can neither repeat nor choose it
        client_id = request.headers.get("X-Request-Id")
        model, verb, raw = route.model, route.api, request.body
        variant_name, version, code, answer = "none", None, 500, {"error": "internal error"}
        kept: Optional[str] = None  # the backend's own text of kept_for, sent as it is (plus "skewless")
        kept_for: Optional[Dict[str, Any]] = None
        routing_key = request.headers.get(settings.routing_header) if settings.routing_header else None
        extra_headers: Dict[str, str] = {}
        backend_seconds = None
        body: Optional[Dict[str, Any]] = None
        sent = raw
        policy, propensity = None, None
        try:
            if client_id is not None and (len(client_id) > MAX_CLIENT_ID or not _PRINTABLE.fullmatch(client_id)):
                code, answer = 400, {"error": f"X-Request-Id: expected 1 to {MAX_CLIENT_ID} printable ASCII "
                                              "characters without spaces"}
                client_id = None
                return
            choice = request.headers.get("X-Skewless-Variant")
            client_routes = route.version is not None or route.label is not None or choice is not None
            if client_routes and not settings.allow_client_routing:
                what = "a URL naming a version or label" if choice is None else "the X-Skewless-Variant header"
                code, answer = 403, {"error": f"{what} chooses what answers, which this proxy does not allow "
                                              "(PROXY_ALLOW_CLIENT_ROUTING=false): call /v1/models/<model>:<verb>"}
                return
            try:
                parsed = (await asyncio.get_running_loop().run_in_executor(None, json.loads, raw)
                          if len(raw) > LARGE_BODY else json.loads(raw))
            except (ValueError, RecursionError) as e:
                code, answer = 400, {"error": f"JSON Parse error: {type(e).__name__}: {str(e)[:200]}"}
                return
            if not isinstance(parsed, dict):
                code, answer = 400, {"error": "JSON Value: the request body must be a JSON object"}
                return
            body = parsed
            rows = _row_count(body)
            if rows > settings.max_rows:
                code, answer = 400, {"error": f"{rows} rows in one request; at most {settings.max_rows} "
                                              "(PROXY_MAX_ROWS): split the request"}
                return
            if not settings.enabled:
                variant_name, code, answer = "fallback", 200, proxy.fallback(body, verb)
                policy, propensity = "fallback", 1.0
                answer["skewless"] = {"fallback": True}
                extra_headers["X-Skewless-Fallback"] = "true"
                proxy.m_fallback.labels(proxy.model_label(model)).inc()
                return
            holdback = settings.holdback
            if route.version is not None or route.label is not None:  # the client chose (allowed): no split
                variant = Variant("direct", settings.answering[0].backend, 1, route.label, route.version)
                policy = "client"
            elif choice is not None:
                if choice not in settings.variants:
                    code, answer = 400, {"error": f"X-Skewless-Variant: no variant '{choice[:100]}'; "
                                                  f"variants: {sorted(settings.variants)}"}
                    return
                variant = settings.variants[choice]
                policy = "client"
            elif holdback is not None and holdback.holds(routing_key or record_id):
                policy, propensity, variant_name = holdback.name, holdback.propensity(), "holdback"
                if holdback.policy != "stable":
                    code, answer = 200, proxy.holdback_answer(body, verb, holdback)
                    answer["skewless"] = {"variant": variant_name, "policy": policy}
                    return
                variant = Variant("holdback", settings.answering[0].backend, 1, holdback.label, None)
            else:
                variant = settings.choose(routing_key or record_id)
                policy, propensity = "model", 1.0 - (holdback.share if holdback is not None else 0.0)
            variant_name = variant.name
            call_started = time.perf_counter()
            try:
                code, data, version, sent = await proxy.call_version(variant, model, verb, body, raw,
                                                                     settings.retries, f"variant '{variant.name}'")
            except BackendError as e:
                proxy.m_backend_errors.labels(proxy.model_label(model), variant.name, e.reason).inc()
                code, answer = e.code, {"error": str(e)}
                return
            except Overloaded as e:  # the proxy's own queue: no backend failed
                proxy.m_overloaded.labels(proxy.model_label(model)).inc()
                code, answer = 503, {"error": str(e)}
                return
            finally:
                backend_seconds = time.perf_counter() - call_started
            proxy._saw_model(model, code)
            answer, kept = _parse_answer(data)
            kept_for = answer
            if code >= 500:
                proxy.m_backend_errors.labels(proxy.model_label(model), variant.name, f"http_{code}").inc()
            if code != 200:
                version, kept = None, None  # nothing was computed
            else:
                if settings.threshold is not None:
                    kept = None  # the threshold rewrites class_ids and classes
                proxy.apply_threshold(answer)
                proxy.observe_scores(proxy.model_label(model), variant.name, answer)
                if settings.model_repository is not None and version is not None:
                    await proxy.count_unseen(settings.model_repository, model, version, body)
                answer["skewless"] = {"variant": variant.name, "model_version": version, "policy": policy,
                                      **({"threshold": settings.threshold} if settings.threshold is not None else {})}
            if settings.shadow and policy == "model":
                proxy.shadow(settings, model, verb, body, sent, record_id, client_id, ts,
                             proxy.logged_key(routing_key, settings), answer if code == 200 else None)
        except Exception as e:  # a proxy bug: answer, log, keep serving
            logging.exception("proxy error on POST %s", request.target[:200])
            code, answer = 500, {"error": f"internal error: {type(e).__name__}"}
        finally:
            latency = time.perf_counter() - started
            # `answer` is a new object on every path that replaced the backend's (errors, a proxy bug).
            text = (_with_key(kept, "skewless", answer["skewless"]) if kept is not None and answer is kept_for
                    else _dumps(answer))
            if proxy.log:
                # Logged before the answer leaves: whatever a client saw is in the log.
                proxy.log.log({"request_id": record_id, "client_request_id": client_id, "ts": ts, "model": model,
                               "variant": variant_name, "model_version": version, "shadow": 0, "api": verb,
                               "status": code, "latency_ms": latency * 1e3,
                               "routing_key": proxy.logged_key(routing_key, settings),
                               "request": proxy.logged_request(body, sent, settings),
                               "response": proxy.log_text(text, settings), "policy": policy,
                               "propensity": propensity})
            label = proxy.model_label(model)
            proxy.series(proxy.m_requests, label, variant_name, str(code)).inc()
            proxy.series(proxy.m_latency, label, variant_name).observe(latency)
            if backend_seconds is not None:
                proxy.series(proxy.m_backend_latency, label, variant_name).observe(backend_seconds)
            headers = {"X-Request-Id": record_id, "X-Skewless-Variant": variant_name,
                       **({"X-Client-Request-Id": client_id} if client_id else {}),
                       **({"X-Skewless-Policy": policy} if policy else {}),
                       **({"X-Skewless-Model-Version": str(version)} if version is not None else {}), **extra_headers}
            # In the finally block: every path above, early exits included, answers what it logged.
            return Response(code, text.encode(), "application/json", headers)  # noqa: B012


def _authorized(header: Optional[str], settings: Settings) -> bool:
    if not header or not header.startswith("Bearer "):
        return False
    token = header[len("Bearer "):].strip()
    # compare_digest against every token: the time taken does not say which prefix matched
    return any([secrets.compare_digest(token.encode(), t.encode()) for t in settings.auth_tokens])


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

    def __init__(self, proxy: Proxy, host: str, port: int, max_connections: int = 4000, idle_timeout: float = 60.0):
        self.proxy = proxy
        self.http = HttpServer(ProxyApi(proxy).handle, host, port, max_connections=max_connections,
                               idle_timeout=idle_timeout, name="proxy")
        self._stopped = threading.Event()
        self.http.start()
        self.server_address = (host, self.http.port)

    def serve_forever(self) -> None:
        self._stopped.wait()

    def shutdown(self) -> None:
        """Requests in flight answer (and are logged), then the listener and the backend pools close."""
        self.proxy.drain()
        self.http.run(self.proxy.backends.close())
        self.http.stop()
        self._stopped.set()

    def server_close(self) -> None:
        pass


def make_server(proxy: Proxy, host: str = "127.0.0.1", port: int = 8080) -> ProxyServer:
    return ProxyServer(proxy, host, port)


def _raise_open_files_limit(wanted: int = 16384) -> None:
    """Each client connection is a descriptor: lift the soft limit towards the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--log", default=os.environ.get("PROXY_LOG", "build/prediction_log.sqlite"),
                        help="prediction log: a path, sqlite:///path or postgresql://user:pw@host/db; '' for none "
                             "(default: $PROXY_LOG, else build/prediction_log.sqlite)")
    parser.add_argument("--env_file", help="KEY=VALUE settings file, re-read on SIGHUP and on change "
                                           "(default: $PROXY_ENV_FILE)")
    parser.add_argument("--port_file", help="write the bound port here once listening (use with --port 0)")
    parser.add_argument("--max_connections", type=int, default=4000, help="client connections open at once")
    parser.add_argument("--idle_timeout", type=float, default=60.0,
                        help="seconds a connection may take to send its next request's headers")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s proxy: %(message)s")
    _raise_open_files_limit()
    try:
        proxy = Proxy(env_file=args.env_file, log_path=args.log or None)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    server = ProxyServer(proxy, args.host, args.port, args.max_connections, args.idle_timeout)
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
        stats = proxy.close()  # requests in flight answered and were logged; later ones got a 503
        logging.info("prediction log closed: %s", stats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
