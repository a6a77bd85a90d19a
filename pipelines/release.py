"""Manual release (train-then-serve): a person promotes a pushed, blessed version.

    python -m pipelines.release promote --version N [--label stable|canary]
    python -m pipelines.release rollback [--label stable]

Moves the label in <model_repository>/<model>/labels.json (the local server and the
release tooling read it) and appends one JSON line per decision to
<model_repository>/<model>/release_log.jsonl: who, when, version, label, the version it
replaced, the version's evaluation metrics and its lineage from ML Metadata (data, schema,
transform graph, model, code commit). A version that was not pushed after a blessing is
refused. The log is append-only: a rollback is a new line, never an edit.
"""

import argparse
import getpass
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional

from pipelines.report import custom_property

LABELS_FILE, LOG_FILE = "labels.json", "release_log.jsonl"
CODE_COMMIT = "code_commit"  # custom property the local runner sets on its pipeline_run context


class ReleaseError(RuntimeError):
    pass


def _store(metadata_path: str):
    from ml_metadata.metadata_store import metadata_store
    from ml_metadata.proto import metadata_store_pb2

    if not os.path.exists(metadata_path):
        raise ReleaseError(f"no ML Metadata store at {metadata_path}: run the pipeline first")
    config = metadata_store_pb2.ConnectionConfig()
    config.sqlite.filename_uri = metadata_path
    config.sqlite.connection_mode = metadata_store_pb2.SqliteMetadataSourceConfig.READONLY
    return metadata_store.MetadataStore(config)


def _io(store, execution_id: int, kind: int) -> Dict[str, List[Any]]:
    events = [e for e in store.get_events_by_execution_ids([execution_id]) if e.type == kind]
    artifacts = {a.id: a for a in store.get_artifacts_by_id([e.artifact_id for e in events])}
    out: Dict[str, List[Any]] = {}
    for e in events:
        out.setdefault(e.path.steps[0].key, []).append(artifacts[e.artifact_id])
    return out


def _exec_property(execution, key):
    for props in (execution.properties, execution.custom_properties):  # TFX keeps exec properties here
        if key in props:
            return props[key].string_value or None
    return None


def _producer(store, artifact):
    from ml_metadata.proto import metadata_store_pb2

    for e in store.get_events_by_artifact_ids([artifact.id]):
        if e.type == metadata_store_pb2.Event.OUTPUT:
            return store.get_executions_by_id([e.execution_id])[0]
    return None


def lineage(metadata_path: str, model_name: str, version: int) -> Dict[str, Any]:
    """Evidence that `version` was blessed and pushed, with what produced it."""
    from ml_metadata.proto import metadata_store_pb2

    store = _store(metadata_path)
    pushed = [a for a in store.get_artifacts_by_type("PushedModel")
              if str(custom_property(a, "pushed_version")) == str(version) and custom_property(a, "pushed") == 1
              and os.path.normpath(str(custom_property(a, "pushed_destination"))).split(os.sep)[-2:] == [model_name, str(version)]]
    if not pushed:
        raise ReleaseError(f"version {version} of '{model_name}' was never pushed after a blessing: refused")
    pusher = _producer(store, pushed[-1])
    inputs = _io(store, pusher.id, metadata_store_pb2.Event.INPUT)
    blessing = inputs.get("model_blessing", [None])[0]
    if blessing is None or custom_property(blessing, "blessed") != 1:
        raise ReleaseError(f"version {version} of '{model_name}' has no blessing: refused")
    infra = inputs.get("infra_blessing", [None])[0]
    if infra is not None and custom_property(infra, "blessed") != 1:
        raise ReleaseError(f"version {version} of '{model_name}' failed sandbox validation: refused")
    if "model" in inputs:
        model = inputs["model"][0]
    else:  # Pusher took the sandbox's warmed copy: the Trainer's model is the sandbox's input
        model = _io(store, _producer(store, infra).id, metadata_store_pb2.Event.INPUT)["model"][0]
    trainer_inputs = _io(store, _producer(store, model).id, metadata_store_pb2.Event.INPUT)
    transform_graph = trainer_inputs["transform_graph"][0]
    transform_inputs = _io(store, _producer(store, transform_graph).id, metadata_store_pb2.Event.INPUT)
    raw_examples = transform_inputs["examples"][0]
    example_gen = _producer(store, raw_examples)
    evaluator = _producer(store, blessing)
    evaluation = _io(store, evaluator.id, metadata_store_pb2.Event.OUTPUT)["evaluation"][0]
    commit = None
    for context in store.get_contexts_by_execution(_producer(store, model).id):
        if context.type == "pipeline_run" and CODE_COMMIT in context.custom_properties:
            commit = context.custom_properties[CODE_COMMIT].string_value
    return {
        "model": model.uri, "blessing": blessing.uri, "sandbox": infra.uri if infra is not None else None, "evaluation": evaluation.uri,
        "transform_graph": transform_graph.uri, "schema": trainer_inputs["schema"][0].uri,
        "examples": raw_examples.uri,
        "data": _exec_property(example_gen, "input_base"),
        "data_fingerprint": custom_property(raw_examples, "input_fingerprint"),
        "code_commit": commit,
    }


def _read_labels(model_dir: str) -> Dict[str, int]:
    path = os.path.join(model_dir, LABELS_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {k: int(v) for k, v in json.load(f).items()}


def _write_labels(model_dir: str, labels: Dict[str, int]) -> None:
    tmp = os.path.join(model_dir, f".{LABELS_FILE}.tmp")
    with open(tmp, "w") as f:
        json.dump(labels, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(model_dir, LABELS_FILE))  # servers never see half a file


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


def promote(model_repository: str, metadata_path: str, model_name: str, version: int, label: str = "stable",
            action: str = "promote", who: Optional[str] = None) -> Dict[str, Any]:
    model_dir = os.path.join(model_repository, model_name)
    if not os.path.exists(os.path.join(model_dir, str(version), "saved_model.pb")):
        raise ReleaseError(f"{model_dir}/{version}: no such version in the model repository")
    evidence = lineage(metadata_path, model_name, version)
    from pipelines.report import load_metrics

    metrics = load_metrics(evidence["evaluation"]).get("Overall", {})
    labels = _read_labels(model_dir)
    entry = {"action": action, "label": label, "version": version, "previous": labels.get(label),
             "who": who or os.environ.get("SKEWLESS_USER") or getpass.getuser(),
             "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "metrics": metrics,
             "lineage": evidence}
    _append_log(model_dir, entry)  # the decision is recorded before it takes effect
    _write_labels(model_dir, {**labels, label: version})
    return entry


def rollback(model_repository: str, metadata_path: str, model_name: str, label: str = "stable",
             who: Optional[str] = None) -> Dict[str, Any]:
    model_dir = os.path.join(model_repository, model_name)
    current = _read_labels(model_dir).get(label)
    for entry in reversed(read_log(model_dir)):
        if entry["label"] == label and entry["version"] == current and entry["previous"] is not None:
            return promote(model_repository, metadata_path, model_name, entry["previous"], label, "rollback", who)
    raise ReleaseError(f"label '{label}' has no earlier version to roll back to")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["promote", "rollback"])
    parser.add_argument("--version", type=int)
    parser.add_argument("--label", default="stable", choices=["stable", "canary"])
    parser.add_argument("--model", default="taxi")
    parser.add_argument("--model_repository", default="build/model_repository")
    parser.add_argument("--metadata", help="ML Metadata SQLite file (default: build/metadata/<model>.sqlite)")
    args = parser.parse_args(argv)
    metadata = args.metadata or f"build/metadata/{args.model}.sqlite"
    try:
        if args.action == "promote":
            if args.version is None:
                parser.error("promote needs --version")
            entry = promote(args.model_repository, metadata, args.model, args.version, args.label)
        else:
            entry = rollback(args.model_repository, metadata, args.model, args.label)
    except ReleaseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{entry['action']}: {args.model} label '{entry['label']}' {entry['previous']} -> {entry['version']} "
          f"by {entry['who']}; logged in {os.path.join(args.model_repository, args.model, LOG_FILE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
