"""Model versions, loaded and kept current the way TF Serving's ServerCore does.

What to serve comes from a ModelServerConfig (serving/model_config.py): `--model_config_file`
(re-read every `config_poll_seconds`) or `--model_name` / `--model_base_path`. For each model
the version policy (latest N, all, specific) picks versions from the numeric folders under its
base path; a poll thread loads new ones (warming them up first) and unloads those no longer
wanted, and applies the config's version labels.

Rules taken from TF Serving (tensorflow_serving/core):
- a version that fails to load is retried `max_num_load_retries` times, `load_retry_interval`
  seconds apart (loader_harness.cc), then reported as END with the error;
- availability first (availability_preserving_policy.cc): a version that is no longer wanted is
  unloaded only once a wanted version is AVAILABLE, so a half-written or broken new version
  never takes the serving one down;
- a label may only point at an AVAILABLE version (server_core.cc): an update that names another
  is refused whole, the labels in force stay, and it is tried again on the next poll.

A request always sees one consistent snapshot, so a swap never fails a request in flight.
Imports TensorFlow only: serving must not depend on training code.
"""

import logging
import os
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import tensorflow as tf

from serving import model_config

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
MAX_WARMUP_RECORDS = 1000  # TF Serving's limit (saved_model_warmup_util.cc)


class NotFound(LookupError):
    """TF Serving's NOT_FOUND -> HTTP 404: unknown model or version."""


class UnknownLabel(ValueError):
    """TF Serving answers an unknown version label with INVALID_ARGUMENT -> HTTP 400."""


class LoadedVersion:
    def __init__(self, model: str, version: int, path: str):
        from tensorflow.core.protobuf import saved_model_pb2

        self.model, self.version, self.path = model, version, path
        pb = os.path.join(path, model_config.SAVED_MODEL_FILE)
        if not model_config.is_complete(path, tf.io.gfile):
            raise FileNotFoundError(f"{pb}: no SavedModel here (yet): Pusher writes it last")
        with tf.io.gfile.GFile(pb, "rb") as f:
            try:
                saved_model = saved_model_pb2.SavedModel.FromString(f.read())
            except Exception as e:  # protobuf's DecodeError: a truncated or foreign file
                raise ValueError(f"{pb}: not a SavedModel ({e})") from None
        meta_graph = next((m for m in saved_model.meta_graphs if "serve" in m.meta_info_def.tags), None)
        if meta_graph is None:
            raise ValueError(f"{path}: the SavedModel has no meta graph tagged 'serve'")
        # The SignatureDefs as saved (method names, tensor names): what metadata reports and
        # what :classify / :regress check, as TF Serving reads them.
        self.signature_defs = dict(meta_graph.signature_def)
        self.module = tf.saved_model.load(path, tags=["serve"])
        self.signatures = dict(self.module.signatures)
        spec = model_config.read_serving_spec(path, tf.io.gfile)
        self.classes: List[str] = list(spec.get("classes", []))

    def input_dtypes(self, signature: str):
        """{input: (tf dtype, numpy dtype, shape as a list with None for any)} of a signature, once."""
        cache = self.__dict__.setdefault("_input_dtypes", {})
        if signature not in cache:
            specs = self.signatures[signature].structured_input_signature[1]
            cache[signature] = {k: (s.dtype, np.dtype(object if s.dtype == tf.string else s.dtype.as_numpy_dtype),
                                    s.shape.as_list() if s.shape.rank is not None else None)
                                for k, s in specs.items()}
        return cache[signature]

    def flat_call(self, signature: str) -> Optional[Tuple[List[str], list]]:
        """(the signature's inputs in the order of its flat call, the captured inputs to pass it),
        when the function allows a flat call; None when its parameters are not exactly the
        signature's inputs or a capture may change between calls: then use the keyword call.

        Calling the flat function skips TensorFlow's per-call binding of keyword arguments (0.4 ms
        of a 2 ms single-row call here); the caller then checks dtypes and shapes itself. Passing
        the captures read once at load skips the restored function's walk over them on each call
        (load.py _WrapperFunction._call_flat: 79 variable handles in the taxi model, each tested for
        being a distributed variable, 0.3 ms a call here). That walk only swaps a distributed
        variable for its handle, and ConcreteFunction.captured_inputs only calls deferred
        captures: with neither, the captures are the same tensors on every call.
        """
        cache = self.__dict__.setdefault("_flat_call", {})
        if signature not in cache:
            cache[signature] = flat_call_parts(self.signatures[signature])
        return cache[signature]

    def input_infos(self, signature: str) -> Optional[Dict[str, int]]:
        """{input: DataType enum} of a saved SignatureDef, read once (a protobuf map walk is 30 us
        a request); None when there is no signature by that name. Callers must not change it."""
        cache = self.__dict__.setdefault("_input_infos", {})
        if signature not in cache:
            found = self.signature_defs.get(signature)
            cache[signature] = None if found is None else {k: v.dtype for k, v in found.inputs.items()}
        return cache[signature]

    def method_name(self, signature: str) -> str:
        return self.signature_defs[signature].method_name if signature in self.signature_defs else ""

    def warm_up(self, run: Callable) -> int:
        """Replays the version's warmup file (PredictionLog records) as TF Serving does on load:
        `run(loaded, log)` executes one record; a failing record fails the load."""
        path = os.path.join(self.path, WARMUP_FILE)
        if not os.path.exists(path):
            return 0
        from tensorflow_serving.apis import prediction_log_pb2

        count = 0
        for record in tf.data.TFRecordDataset(path).take(MAX_WARMUP_RECORDS + 1):
            if count == MAX_WARMUP_RECORDS:
                raise ValueError(f"{path}: more than {MAX_WARMUP_RECORDS} warmup records")
            run(self, prediction_log_pb2.PredictionLog.FromString(record.numpy()))
            count += 1
        return count


def flat_call_parts(fn) -> Optional[Tuple[List[str], list]]:
    """Loaded.flat_call's answer for one ConcreteFunction (benchmarks/bench_serving.py times the same call as a floor)."""
    from tensorflow.python.distribute.distribute_utils import is_distributed_variable
    from tensorflow.python.eager.polymorphic_function.concrete_function import ConcreteFunction

    try:
        names = [p.name for p in fn.function_type.parameters.values()]
        deferred = [x for x in fn._captured_inputs if callable(x)]
    except AttributeError:
        return None
    if not isinstance(fn, ConcreteFunction) or sorted(names) != sorted(fn.structured_input_signature[1]) or deferred:
        return None
    captures = list(fn.captured_inputs)
    if any(is_distributed_variable(x) for x in captures):
        return None
    return names, captures


# Version states as TF Serving's ModelVersionStatus.State names them.
START, LOADING, AVAILABLE, UNLOADING, END = "START", "LOADING", "AVAILABLE", "UNLOADING", "END"


class VersionStatus:
    def __init__(self, state: str, error_code: str = "OK", error_message: str = ""):
        self.state, self.error_code, self.error_message = state, error_code, error_message


class Snapshot:
    """What is served for one model at one moment: available versions, labels, every state."""

    def __init__(self, versions: Dict[int, LoadedVersion], labels: Dict[str, int],
                 states: Dict[int, VersionStatus]):
        self.versions, self.labels, self.states = versions, labels, states

    def resolve(self, model: str, version: Optional[int] = None, label: Optional[str] = None) -> LoadedVersion:
        if label is not None:
            if label not in self.labels:
                raise UnknownLabel(f"Unrecognized servable version label: {label}")
            version = self.labels[label]
        if version is None:
            if not self.versions:
                raise NotFound(f"Servable not found for request: Latest({model})")
            return self.versions[max(self.versions)]
        if version not in self.versions:
            raise NotFound(f"Servable not found for request: Specific({model}, {version})")
        return self.versions[version]


class _Attempts:
    def __init__(self):
        self.count, self.next_try, self.error = 0, 0.0, ""


class Repository:
    def __init__(self, config: Optional[model_config.ModelServerConfig] = None, config_file: Optional[str] = None,
                 poll_seconds: float = 1.0, config_poll_seconds: float = 0.0, max_num_load_retries: int = 5,
                 load_retry_interval: float = 60.0, warmup: Optional[Callable] = None,
                 allow_labels_for_unavailable: bool = False, on_change: Optional[Callable[[], None]] = None):
        if (config is None) == (config_file is None):
            raise ValueError("give exactly one of config or config_file")
        self.config_file = config_file
        self.config = config if config is not None else model_config.read(config_file)
        self.poll_seconds, self.config_poll_seconds = poll_seconds, config_poll_seconds
        self.max_num_load_retries, self.load_retry_interval = max_num_load_retries, load_retry_interval
        self.warmup = warmup
        self.allow_labels_for_unavailable = allow_labels_for_unavailable
        self.on_change = on_change  # called after a refresh that loaded or unloaded a version
        self._snapshots: Dict[str, Snapshot] = {}
        self._attempts: Dict[Tuple[str, int], _Attempts] = {}
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._last_config_read = time.monotonic()
        self.refresh()

    @classmethod
    def single(cls, name: str, base_path: str, **kwargs) -> "Repository":
        return cls(config=model_config.single_model(name, base_path), **kwargs)

    # --- reading -------------------------------------------------------------------------
    def models(self) -> List[str]:
        with self._lock:
            return sorted(self._snapshots)

    def knows(self, model: str) -> bool:
        return model in self._snapshots  # a dict lookup: atomic, no lock needed

    def snapshot(self, model: str) -> Snapshot:
        with self._lock:
            snapshot = self._snapshots.get(model)
        if snapshot is None:
            raise NotFound(f"Servable not found for request: Latest({model})")
        return snapshot

    def resolve(self, model: str, version: Optional[int] = None, label: Optional[str] = None) -> LoadedVersion:
        return self.snapshot(model).resolve(model, version, label)

    # --- keeping current -----------------------------------------------------------------
    def start(self) -> "Repository":
        self._thread = threading.Thread(target=self._poll, daemon=True, name="repository-poll")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def reload_config(self, config: model_config.ModelServerConfig) -> None:
        """ModelService.HandleReloadConfigRequest: take a new config now."""
        model_config.check(config, "reload request")
        with self._refresh_lock:
            self.config = config
        self.refresh()

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self._maybe_reread_config()
                self.refresh()
            except Exception:  # a bad new version or config must not take down what is serving
                logging.exception("model repository refresh failed")

    def _maybe_reread_config(self) -> None:
        if not self.config_file or self.config_poll_seconds <= 0:
            return
        if time.monotonic() - self._last_config_read < self.config_poll_seconds:
            return
        self._last_config_read = time.monotonic()
        try:
            config = model_config.read(self.config_file)
        except model_config.ConfigError as e:  # TF Serving keeps the config it has
            logging.error("keeping the current model config: %s", e)
            return
        with self._refresh_lock:
            self.config = config

    def refresh(self) -> None:
        changed = False
        with self._refresh_lock:
            wanted = {m.name: m for m in self.config.model_config_list.config}
            for name, model in wanted.items():
                changed = self._refresh_model(model) or changed
            with self._lock:
                for name in set(self._snapshots) - set(wanted):  # a model taken out of the config
                    logging.info("unloading model %s (no longer in the config)", name)
                    del self._snapshots[name]
                    changed = True
        if changed and self.on_change is not None:
            self.on_change()

    def _refresh_model(self, model: model_config.ModelConfig) -> bool:
        """Loads and unloads the model's versions; whether the versions served changed."""
        name = model.name
        on_disk = model_config.versions_on_disk(model.base_path)
        aspired = set(model_config.aspired_versions(model, on_disk))
        current = self._snapshots.get(name, Snapshot({}, {}, {}))
        versions = dict(current.versions)
        states = {v: s for v, s in current.states.items()}
        for version in sorted(aspired - set(versions)):
            loaded = self._try_load(name, version, os.path.join(model.base_path, str(version)), states)
            if loaded is not None:
                versions[version] = loaded
        # Availability first: what is no longer aspired goes only once an aspired version serves.
        if any(v in versions for v in aspired):
            for version in sorted(set(versions) - aspired):
                del versions[version]
                states[version] = VersionStatus(END)
                logging.info("unloaded %s version %d", name, version)
        for version in list(states):
            if version not in aspired and version not in versions and states[version].state != END:
                states[version] = VersionStatus(END)
        labels = self._labels(model, versions, current.labels, self.allow_labels_for_unavailable)
        with self._lock:
            self._snapshots[name] = Snapshot(versions, labels, states)
        return versions != current.versions

    def _try_load(self, name: str, version: int, path: str, states: Dict[int, VersionStatus]) -> Optional[LoadedVersion]:
        attempts = self._attempts.setdefault((name, version), _Attempts())
        if attempts.count > self.max_num_load_retries or time.monotonic() < attempts.next_try:
            return None
        attempts.count += 1
        states[version] = VersionStatus(LOADING)
        try:
            loaded = LoadedVersion(name, version, path)
            if self.warmup is not None:
                loaded.warm_up(self.warmup)
        except Exception as e:  # keep serving the others; status and the log say why
            attempts.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            attempts.next_try = time.monotonic() + self.load_retry_interval
            if attempts.count > self.max_num_load_retries:
                logging.error("giving up on %s version %d after %d tries: %s", name, version, attempts.count,
                              attempts.error)
                states[version] = VersionStatus(END, "UNKNOWN", attempts.error)
            else:
                logging.warning("cannot load %s version %d (try %d of %d, next in %g s): %s", name, version,
                                attempts.count, self.max_num_load_retries + 1, self.load_retry_interval,
                                attempts.error)
                states[version] = VersionStatus(LOADING, "OK", "")
            return None
        del self._attempts[(name, version)]
        states[version] = VersionStatus(AVAILABLE)
        logging.info("loaded %s version %d", name, version)
        return loaded

    @staticmethod
    def _labels(model: model_config.ModelConfig, versions: Dict[int, LoadedVersion],
                previous: Dict[str, int], allow_unavailable: bool) -> Dict[str, int]:
        asked = model_config.labels(model)
        # --allow_version_labels_for_unavailable_models: a label not yet pointing elsewhere may
        # name a version still loading (server_core.cc:560-572); requests through it get NOT_FOUND.
        unavailable = {k: v for k, v in asked.items() if v not in versions
                       and not (allow_unavailable and previous.get(k, v) == v)}
        if not unavailable:
            return asked
        # TF Serving refuses the whole label update; the labels it had stay in force.
        for label, version in sorted(unavailable.items()):
            logging.warning("Request to assign label to version %d of model %s, which is not currently available "
                            "for inference (label '%s'; labels kept as they were)", version, model.name, label)
        return {k: v for k, v in previous.items() if v in versions}
