"""Manual release (train-then-serve): a person promotes a pushed, blessed version.

    python -m ops.release promote --version N [--label stable|canary]
    python -m ops.release rollback [--label stable]

One decision, one file, one writer (this module): <model_repository>/models.config, TF Serving's
ModelServerConfig (--model_config_file), which TF Serving's image and the local server both read
(serving/model_config.py owns its format); labels live only in its version_labels. And one JSON line per decision in <model_repository>/<model>/release_log.jsonl: who, when,
version, label, the version it replaced, the version's evaluation metrics and its lineage from
ML Metadata (data, schema, transform graph, model, sandbox report, code commit). A version that
was not pushed after both blessings is refused. The log is append-only: a rollback is a new
line, never an edit.

TF Serving refuses a label that points at a version it has not loaded, so a release is two
writes of models.config: first the version is listed (labels unchanged); then, once the server
reports it AVAILABLE (`--serving_url`, polled), the label moves. Without --serving_url nothing
can be asked and both writes follow at once; against TF Serving, pass the URL.
"""

import argparse
import getpass
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Dict, List, Optional

from pipelines import mlmd

from serving import model_config

LOG_FILE = "release_log.jsonl"
# Where Dockerfile.serve and deploy/k8s mount the model repository: promote with
# --serving_base_path /models (make promote BASE_PATH=/models) for them.
IMAGE_BASE_PATH = "/models"
MODEL_CONFIG_FILE = model_config.MODEL_CONFIG_FILE


class ReleaseError(RuntimeError):
    pass


def lineage(metadata_path: str, model_name: str, version: int) -> Dict[str, Any]:
    """Evidence that `version` was blessed and pushed, with what produced it (pipelines/mlmd.py)."""
    try:
        return mlmd.lineage(metadata_path, model_name, version)
    except mlmd.MetadataError as e:
        raise ReleaseError(str(e)) from None


def read_labels(model_repository: str, model_name: str) -> Dict[str, int]:
    """The labels models.config gives the model (none before the first promotion)."""
    return model_config.repository_labels(model_repository, model_name)


def _append_log(model_dir: str, entry: Dict[str, Any]) -> None:
    with open(os.path.join(model_dir, LOG_FILE), "a") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_log(model_dir: str) -> List[Dict[str, Any]]:
    path = os.path.join(model_dir, LOG_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def served_versions(model_dir: str, labels: Dict[str, int]) -> List[int]:
    """What TF Serving should hold: every labelled version, plus the version each label replaced
    last (kept for one release, so a rollback is a label move, not a load)."""
    keep = set(labels.values())
    last: Dict[str, Dict] = {}
    for entry in read_log(model_dir):
        last[entry["label"]] = entry
    keep |= {e["previous"] for e in last.values()
             if e.get("previous") is not None and model_config.is_complete(model_config.version_path(model_dir, e["previous"]))}
    return sorted(keep)


def write_model_config(model_repository: str, base_path: Optional[str] = None,
                       adding: Optional[Dict[str, int]] = None, labels: Optional[Dict[str, Dict[str, int]]] = None) -> str:
    """Renders <model_repository>/models.config: per model the labelled versions (`labels`
    overrides a model's current ones) and `adding` (versions to load before a label may point at
    them). base_path is where the server sees the repository (default: this path, absolute)."""
    base_path = (base_path or os.path.abspath(model_repository)).rstrip("/")
    adding, labels = adding or {}, labels or {}
    config = model_config.ModelServerConfig()
    for name in sorted(os.listdir(model_repository)):
        model_dir = os.path.join(model_repository, name)
        if not os.path.isdir(model_dir):
            continue
        model_labels = labels[name] if name in labels else read_labels(model_repository, name)
        versions = sorted(set(served_versions(model_dir, model_labels)) | ({adding[name]} if name in adding else set()))
        if not versions:
            continue  # pushed but never promoted: a candidate is not served
        model = config.model_config_list.config.add(name=name, base_path=f"{base_path}/{name}",
                                                    model_platform="tensorflow")
        model.model_version_policy.specific.versions.extend(versions)
        for label, version in sorted(model_labels.items()):
            model.version_labels[label] = version
    header = ("# Written by `make promote` / `make rollback` (ops/release.py) with release_log.jsonl:\n"
              "# change it through the tool, not by hand.\n")
    return model_config.write(os.path.join(model_repository, MODEL_CONFIG_FILE), config, header)


def wait_until_available(serving_url: str, model_name: str, version: int, timeout: float,
                         interval: float = 1.0) -> None:
    """Polls TF Serving's model status API until the version is AVAILABLE."""
    url = f"{serving_url.rstrip('/')}/v1/models/{model_name}/versions/{version}"
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                state = json.loads(response.read())["model_version_status"][0]
            if state["state"] == "AVAILABLE":
                return
            if state["state"] == "END":
                raise ReleaseError(f"{url}: the server could not load version {version}: "
                                   f"{state.get('status', {}).get('error_message', '')}; the label was not moved")
            last = state["state"]
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except (OSError, ValueError, KeyError, IndexError) as e:
            last = f"{type(e).__name__}: {e}"
        if time.monotonic() >= deadline:
            raise ReleaseError(f"{url}: version {version} not AVAILABLE after {timeout:.0f} s (last: {last}); "
                               f"the label was not moved (models.config lists the version)")
        time.sleep(interval)


def release(model_repository: str, model_name: str, entry: Dict[str, Any], serving_url: Optional[str] = None,
            wait_seconds: float = 300, base_path: Optional[str] = None) -> None:
    """Carries out a recorded decision: load the version, wait for it, log, then move the label."""
    model_dir = os.path.join(model_repository, model_name)
    label, version = entry["label"], entry["version"]
    write_model_config(model_repository, base_path, adding={model_name: version})
    if serving_url:
        wait_until_available(serving_url, model_name, version, wait_seconds)
    _append_log(model_dir, entry)  # the decision is recorded before the label moves
    labels = {**read_labels(model_repository, model_name), label: version}
    write_model_config(model_repository, base_path, labels={model_name: labels})


def promote(model_repository: str, metadata_path: str, model_name: str, version: int, label: str = "stable",
            action: str = "promote", who: Optional[str] = None, serving_url: Optional[str] = None,
            wait_seconds: float = 300, base_path: Optional[str] = None) -> Dict[str, Any]:
    model_dir = os.path.join(model_repository, model_name)
    if version not in model_config.complete_versions(model_dir):
        raise ReleaseError(f"{model_dir}/{version}: no such complete version in the model repository (pushed: "
                           f"{', '.join(map(str, model_config.complete_versions(model_dir))) or 'none'})")
    evidence = lineage(metadata_path, model_name, version)
    from pipelines.report import load_metrics

    metrics = load_metrics(evidence["evaluation"]).get("Overall", {})
    entry = {"action": action, "label": label, "version": version, "previous": read_labels(model_repository, model_name).get(label),
             "who": who or os.environ.get("SKEWLESS_USER") or getpass.getuser(),
             "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "metrics": metrics,
             "lineage": evidence}
    release(model_repository, model_name, entry, serving_url, wait_seconds, base_path)
    return entry


def rollback(model_repository: str, metadata_path: str, model_name: str, label: str = "stable",
             who: Optional[str] = None, **release_args) -> Dict[str, Any]:
    model_dir = os.path.join(model_repository, model_name)
    current = read_labels(model_repository, model_name).get(label)
    for entry in reversed(read_log(model_dir)):
        if entry["label"] == label and entry["version"] == current and entry["previous"] is not None:
            return promote(model_repository, metadata_path, model_name, entry["previous"], label, "rollback", who,
                           **release_args)
    raise ReleaseError(f"label '{label}' has no earlier version to roll back to")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["promote", "rollback"])
    parser.add_argument("--version", type=int)
    parser.add_argument("--label", default="stable", choices=["stable", "canary"])
    parser.add_argument("--model", default="taxi")
    parser.add_argument("--model_repository", default="build/model_repository")
    parser.add_argument("--metadata", help="ML Metadata SQLite file (default: build/metadata/<model>.sqlite)")
    parser.add_argument("--serving_url", help="TF Serving (or local server) REST root, e.g. http://host:8501: "
                        "the label moves only once it reports the version AVAILABLE")
    parser.add_argument("--wait_seconds", type=float, default=300)
    parser.add_argument("--serving_base_path",
                        help="where the server sees the model repository (models.config base_path; default: "
                             "--model_repository as an absolute path, e.g. /models for a mount at /models)")
    args = parser.parse_args(argv)
    release_args = dict(serving_url=args.serving_url, wait_seconds=args.wait_seconds, base_path=args.serving_base_path)
    metadata = args.metadata or f"build/metadata/{args.model}.sqlite"
    try:
        if args.action == "promote":
            if args.version is None:
                parser.error("promote needs --version")
            entry = promote(args.model_repository, metadata, args.model, args.version, args.label, **release_args)
        else:
            entry = rollback(args.model_repository, metadata, args.model, args.label, **release_args)
    except ReleaseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{entry['action']}: {args.model} label '{entry['label']}' {entry['previous']} -> {entry['version']} "
          f"by {entry['who']}; logged in {os.path.join(args.model_repository, args.model, LOG_FILE)}; "
          f"TF Serving config: {os.path.join(args.model_repository, MODEL_CONFIG_FILE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
