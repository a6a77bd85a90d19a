"""A TF-Serving-layout model repository, loaded and kept current.

<root>/<model>/<version>/saved_model.pb     numeric versions, as Pusher writes them
<root>/<model>/labels.json                 {"stable": 1700000000, "canary": 1700000100}

Policy: serve the latest `num_latest` versions plus every version a label points at. A poll
thread loads new versions (warming them up first) and drops old ones, and re-reads labels;
a request always sees a consistent snapshot, so a swap never fails a request in flight.
Imports TensorFlow only: serving must not depend on training code.
"""

import json
import logging
import os
import threading
from typing import Dict, List, Optional

import tensorflow as tf

LABELS_FILE = "labels.json"
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
SERVING_SPEC_FILE = os.path.join("assets.extra", "serving_spec.json")  # written by the trainer


class NotFound(LookupError):
    """Unknown model, version or label (TF Serving's NOT_FOUND -> HTTP 404)."""


class LoadedVersion:
    def __init__(self, model: str, version: int, path: str):
        self.model, self.version, self.path = model, version, path
        self.module = tf.saved_model.load(path)
        self.signatures = dict(self.module.signatures)
        spec_path = os.path.join(path, SERVING_SPEC_FILE)
        spec = {}
        if os.path.exists(spec_path):
            with open(spec_path) as f:
                spec = json.load(f)
        self.classes: List[str] = list(spec.get("classes", []))
        self.required = {name for name, f in spec.get("features", {}).items() if f.get("required")}

    def warm_up(self, max_records: int = 1000) -> int:
        """Replays the version's warmup file (PredictionLog records), as TF Serving does on load."""
        path = os.path.join(self.path, WARMUP_FILE)
        if not os.path.exists(path):
            return 0
        from tensorflow_serving.apis import prediction_log_pb2

        count = 0
        for record in tf.data.TFRecordDataset(path).take(max_records):
            log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
            request = log.predict_log.request
            signature = self.signatures[request.model_spec.signature_name or "serving_default"]
            signature(**{k: tf.make_ndarray(v) for k, v in request.inputs.items()})
            count += 1
        return count


class Snapshot:
    """What is loaded for one model at one moment: versions and labels."""

    def __init__(self, versions: Dict[int, LoadedVersion], labels: Dict[str, int],
                 failed: Optional[Dict[int, str]] = None):
        self.versions, self.labels = versions, labels
        # Versions whose load failed, with the error: reported as state END (TF Serving's status
        # for a version it gave up on) and not retried; a fix is pushed as a new version.
        self.failed: Dict[int, str] = dict(failed or {})

    def resolve(self, model: str, version: Optional[int] = None, label: Optional[str] = None) -> LoadedVersion:
        if label is not None:
            if label not in self.labels:
                raise NotFound(f"Unrecognized servable version label: {label} (model {model})")
            version = self.labels[label]
        if version is None:
            if not self.versions:
                raise NotFound(f"Servable not found for request: Latest({model})")
            return self.versions[max(self.versions)]
        if version not in self.versions:
            raise NotFound(f"Servable not found for request: Specific({model}, {version})")
        return self.versions[version]


class Repository:
    def __init__(self, root: str, num_latest: int = 2, poll_seconds: float = 2.0, warmup: bool = True):
        self.root, self.num_latest, self.poll_seconds, self.warmup = root, num_latest, poll_seconds, warmup
        self._snapshots: Dict[str, Snapshot] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.refresh()

    # --- reading -------------------------------------------------------------------------
    def models(self) -> List[str]:
        with self._lock:
            return sorted(self._snapshots)

    def snapshot(self, model: str) -> Snapshot:
        with self._lock:
            if model not in self._snapshots:
                raise NotFound(f"Servable not found for request: Latest({model})")
            return self._snapshots[model]

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

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.refresh()
            except Exception:  # a bad new version must not take down what is serving
                logging.exception("model repository refresh failed")

    def refresh(self) -> None:
        for model in sorted(os.listdir(self.root)) if os.path.isdir(self.root) else []:
            if os.path.isdir(os.path.join(self.root, model)):
                self._refresh_model(model)

    def _refresh_model(self, model: str) -> None:
        base = os.path.join(self.root, model)
        on_disk = sorted(int(v) for v in os.listdir(base)
                         if v.isdigit() and os.path.exists(os.path.join(base, v, "saved_model.pb")))
        labels = self._read_labels(base)
        wanted = set(on_disk[-self.num_latest:]) | {v for v in labels.values() if v in on_disk}
        current = self._snapshots.get(model, Snapshot({}, {}))
        versions = {v: lv for v, lv in current.versions.items() if v in wanted}
        failed = {v: e for v, e in current.failed.items() if v in wanted}
        for version in sorted(wanted - set(versions) - set(failed)):
            try:
                loaded = LoadedVersion(model, version, os.path.join(base, str(version)))
                if self.warmup:
                    loaded.warm_up()
                versions[version] = loaded
                logging.info("loaded %s version %d", model, version)
            except Exception as e:  # keep serving the others; status and the log say why
                logging.exception("cannot load %s version %d", model, version)
                failed[version] = f"{type(e).__name__}: {e}"
        # Labels may only point at loaded versions (TF Serving's rule); others are ignored.
        labels = {k: v for k, v in labels.items() if v in versions}
        with self._lock:
            self._snapshots[model] = Snapshot(versions, labels, failed)

    @staticmethod
    def _read_labels(base: str) -> Dict[str, int]:
        path = os.path.join(base, LABELS_FILE)
        if not os.path.exists(path):
            return {}
        try:
            with open(path) as f:
                return {str(k): int(v) for k, v in json.load(f).items()}
        except (ValueError, TypeError, AttributeError) as e:
            logging.error("ignoring unreadable %s: %s", path, e)
            return {}
