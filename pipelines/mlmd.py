"""Every ML Metadata query the project makes: the run reports, the local runner's progress and
commit tag, the release's lineage evidence, the monitor's training statistics.

Callers never open a MetadataStore or walk events themselves. Lineage uses MLMD's own
`get_lineage_subgraph` (one query, upstream from the pushed model) instead of walking events
artifact by artifact.
"""

import os
from typing import Any, Dict, List, Optional, Tuple

CODE_COMMIT = "code_commit"  # the pipeline_run context's custom property naming the code's git commit
MAX_LINEAGE_HOPS = 40  # ExampleGen -> ... -> Pusher is about 16 hops in this pipeline (artifact, execution alternate)


class MetadataError(RuntimeError):
    """ML Metadata cannot answer: no store, or no record of what was asked; the message says which."""


def _pb2():
    from ml_metadata.proto import metadata_store_pb2

    return metadata_store_pb2


def store_for(connection_config):
    from ml_metadata.metadata_store import metadata_store

    return metadata_store.MetadataStore(connection_config)


def connect(metadata_path: str, readonly: bool = True, create: bool = False):
    """The SQLite store a local run wrote (read-only by default; `create` makes a new one)."""
    pb2 = _pb2()
    if create:
        os.makedirs(os.path.dirname(os.path.abspath(metadata_path)), exist_ok=True)
    elif not os.path.exists(metadata_path):
        raise MetadataError(f"no ML Metadata store at {metadata_path}: run the pipeline first")
    config = pb2.ConnectionConfig()
    config.sqlite.filename_uri = metadata_path
    config.sqlite.connection_mode = (pb2.SqliteMetadataSourceConfig.READONLY if readonly and not create
                                     else pb2.SqliteMetadataSourceConfig.READWRITE_OPENCREATE)
    return store_for(config)


def artifact_uris(metadata_path: str, type_name: str) -> List[str]:
    """The URIs of every artifact of one type in a local store (e.g. tf.Transform's analyzer
    caches, "TransformCache"); [] when the store holds none of that type."""
    return [artifact.uri for artifact in connect(metadata_path).get_artifacts_by_type(type_name)]


def latest_node_states(metadata_path: str) -> Dict[str, str]:
    """{node id: the state of its latest execution} (COMPLETE, CACHED, FAILED, ...) in a local
    store: which nodes a run executed and which it took from TFX's cache. Node contexts are named
    "<pipeline>.<node id>"; a node with no execution yet is left out."""
    pb2 = _pb2()
    store = connect(metadata_path)
    states = {}
    for node in store.get_contexts_by_type("node"):
        latest = _latest_execution(store, node)
        if latest is not None:
            states[node.name.split(".", 1)[1]] = pb2.Execution.State.Name(latest.last_known_state)
    return states


def _latest_execution(store, context):
    """The newest execution associated with a context (None for none, or no context)."""
    executions = store.get_executions_by_context(context.id) if context is not None else []
    return max(executions, key=lambda e: e.id, default=None)

# --- properties ---------------------------------------------------------------------------

def custom_property(artifact, key, default=None):
    """An MLMD node's int or string custom property (TFX stores pushed, blessed, versions there)."""
    if key not in artifact.custom_properties:
        return default
    v = artifact.custom_properties[key]
    return v.int_value if v.HasField("int_value") else v.string_value if v.HasField("string_value") else default


def exec_property(execution, key) -> Optional[str]:
    for props in (execution.properties, execution.custom_properties):  # TFX keeps exec properties here
        if key in props:
            return props[key].string_value or None
    return None


# --- runs ---------------------------------------------------------------------------------

def latest_run(store, since_ms: int = 0):
    """The newest pipeline_run context created at or after since_ms (None: none yet)."""
    runs = [c for c in store.get_contexts_by_type("pipeline_run") if c.create_time_since_epoch >= since_ms]
    return max(runs, key=lambda c: (c.create_time_since_epoch, c.id)) if runs else None


def run_executions(store, run) -> List[Tuple[Any, str, str]]:
    """(execution, node id, state name) of a run's executions, oldest first."""
    pb2 = _pb2()
    out = []
    for e in sorted(store.get_executions_by_context(run.id), key=lambda e: e.id):
        node = next((c.name.split(".", 1)[-1] for c in store.get_contexts_by_execution(e.id) if c.type == "node"),
                    str(e.id))
        out.append((e, node, pb2.Execution.State.Name(e.last_known_state)))
    return out


def latest_run_record(connection_config) -> Tuple[Dict[str, List[Any]], Optional[str]]:
    """(artifacts of the latest run by type name, URI of the Evaluator's baseline model or None)."""
    pb2 = _pb2()
    store = store_for(connection_config)
    run = latest_run(store)
    if run is None:
        return {}, None
    type_names = {t.id: t.name for t in store.get_artifact_types()}
    by_type: Dict[str, List[Any]] = {}
    for a in store.get_artifacts_by_context(run.id):
        by_type.setdefault(type_names[a.type_id], []).append(a)
    baseline = None
    for execution, node, _ in run_executions(store, run):
        if node != "Evaluator":
            continue
        models = artifacts_of(store, execution.id, pb2.Event.INPUT).get("baseline_model", [])
        if models:
            baseline = models[0].uri
    return by_type, baseline


def latest_run_node(connection_config, node: str) -> Dict[str, Any]:
    """The newest execution of `node` in the latest pipeline run: {"inputs": {key: [artifact]}, "outputs":
    {key: [artifact]}, "spans": {artifact id: the span it describes (described_spans), inputs and outputs}};
    {} when that run has no execution of the node (not reached, or no run yet)."""
    pb2 = _pb2()
    store = store_for(connection_config)
    run = latest_run(store)
    found = [e for e, name, _ in run_executions(store, run) if name == node] if run is not None else []
    if not found:
        return {}
    inputs, outputs = (artifacts_of(store, found[-1].id, kind) for kind in (pb2.Event.INPUT, pb2.Event.OUTPUT))
    every = [a for by_key in (inputs, outputs) for artifacts in by_key.values() for a in artifacts]
    return {"inputs": inputs, "outputs": outputs, "spans": described_spans(store, every)}


def tag_latest_run(connection_config, key: str, value: str) -> bool:
    """Sets a string custom property on the newest pipeline_run context (False: no run yet)."""
    store = store_for(connection_config)
    run = latest_run(store)
    if run is None:
        return False
    run.custom_properties[key].string_value = value
    store.put_contexts([run])
    return True


def record_artifact(metadata_path: str, type_name: str, uri: str, properties: Dict[str, Any]) -> int:
    """Records an artifact made outside a pipeline run (e.g. a served span) with string/int custom
    properties; returns its id. The store is created if it does not exist yet."""
    pb2 = _pb2()
    store = connect(metadata_path, readonly=False, create=True)
    type_id = store.put_artifact_type(pb2.ArtifactType(name=type_name), can_add_fields=True)
    artifact = pb2.Artifact(type_id=type_id, uri=uri, state=pb2.Artifact.LIVE)
    for key, value in properties.items():
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise TypeError(f"{type_name} property {key}: {value!r} is neither an int nor a string")
        if isinstance(value, int):
            artifact.custom_properties[key].int_value = value
        else:
            artifact.custom_properties[key].string_value = value
    [artifact_id] = store.put_artifacts([artifact])
    return artifact_id


def span_of(artifact) -> Optional[int]:
    """An Examples artifact's span where TFX 1.16 keeps it: ExampleGen's driver writes the custom property
    (tfx/components/example_gen/driver.py:55-57), not the `span` property the Examples type declares, and
    SpanRangeStrategy reads the custom one, an int or a string (span_range_strategy.py:32-39)."""
    own = _custom_span(artifact)
    return own if own is not None else _declared_span(artifact)


def _custom_span(artifact) -> Optional[int]:
    span = custom_property(artifact, "span")
    return int(span) if span not in (None, "") else None


def _declared_span(artifact) -> Optional[int]:
    return artifact.properties["span"].int_value if "span" in artifact.properties else None


def described_spans(store, artifacts) -> Dict[int, Optional[int]]:
    """The span each artifact (an ExampleStatistics, say) describes, by artifact id: its own `span` custom
    property where TFX set one, else the span of the Examples its producing execution read (lineage), else
    its declared `span` property (None: none of them). StatisticsGen copies the Examples' declared `span`,
    which TFX 1.16's ExampleGen leaves unset (tfx/components/statistics_gen/executor.py:144), so on a real
    store every statistics artifact's declared span is 0 and only the lineage tells them apart."""
    pb2 = _pb2()
    spans: Dict[int, Optional[int]] = {a.id: _custom_span(a) for a in artifacts}
    unknown = [i for i, s in spans.items() if s is None]
    producers: Dict[int, int] = {e.artifact_id: e.execution_id for e in store.get_events_by_artifact_ids(unknown)
                                 if e.type == pb2.Event.OUTPUT} if unknown else {}
    read: Dict[int, List[int]] = {}
    for e in store.get_events_by_execution_ids(sorted(set(producers.values()))) if producers else ():
        if e.type == pb2.Event.INPUT and e.path.steps and e.path.steps[0].key == "examples":
            read.setdefault(e.execution_id, []).append(e.artifact_id)
    examples = {a.id: span_of(a) for a in store.get_artifacts_by_id(sorted({i for ids in read.values() for i in ids}))}
    for artifact in artifacts:
        if spans[artifact.id] is None:
            found = [examples[i] for i in read.get(producers.get(artifact.id), []) if examples.get(i) is not None]
            spans[artifact.id] = max(found) if found else _declared_span(artifact)
    return spans


def ingested_spans(metadata_path: str, example_gen: str = "CsvExampleGen") -> List[int]:
    """Spans ExampleGen has written Examples for in this store (empty when there is no store yet)."""
    if not os.path.exists(metadata_path):
        return []
    store = connect(metadata_path)
    spans = (span_of(a) for a in store.get_artifacts_by_type("Examples") if f"/{example_gen}/" in a.uri)
    return sorted({span for span in spans if span is not None})


def example_gen_inputs(connection_config, pipeline_name: str, node: str = "CsvExampleGen") -> List[Dict[str, Any]]:
    """What each recorded execution of `pipeline_name`'s ExampleGen read, oldest first: {"input_base",
    "patterns" (its splits' file patterns, the span filled in by TFX's driver), "span"}. [] when the
    SQLite store does not exist yet (none is created) or the node never ran."""
    import json

    if connection_config.HasField("sqlite") and not os.path.exists(connection_config.sqlite.filename_uri):
        return []
    store = store_for(connection_config)
    context = store.get_context_by_type_and_name("node", f"{pipeline_name}.{node}")
    found = []
    for execution in sorted(store.get_executions_by_context(context.id), key=lambda e: e.id) if context else []:
        config = json.loads(exec_property(execution, "input_config") or "{}")
        span = execution.custom_properties["span"].int_value if "span" in execution.custom_properties else None
        found.append({"input_base": exec_property(execution, "input_base"), "span": span,
                      "patterns": [split.get("pattern", "") for split in config.get("splits", [])]})
    return found


def spans_read(metadata_path: str, pipeline_name: str, node: str = "Transform", key: str = "examples") -> List[int]:
    """The spans of the Examples the latest execution of `node` in `pipeline_name` read under input `key`,
    ascending (empty when it never ran): what a run trained on, as ML Metadata recorded it."""
    if not os.path.exists(metadata_path):
        return []
    store = connect(metadata_path)
    latest = _latest_execution(store, store.get_context_by_type_and_name("node", f"{pipeline_name}.{node}"))
    if latest is None:  # (TFX names a node's context "<pipeline>.<node id>")
        return []
    spans = (span_of(a) for a in artifacts_of(store, latest.id, _pb2().Event.INPUT).get(key, []))
    return sorted(span for span in spans if span is not None)


# --- events -------------------------------------------------------------------------------

def artifacts_of(store, execution_id: int, kind: int) -> Dict[str, List[Any]]:
    """An execution's input (kind=Event.INPUT) or output artifacts, by key."""
    events = [e for e in store.get_events_by_execution_ids([execution_id]) if e.type == kind]
    artifacts = {a.id: a for a in store.get_artifacts_by_id([e.artifact_id for e in events])}
    out: Dict[str, List[Any]] = {}
    for e in events:
        out.setdefault(e.path.steps[0].key, []).append(artifacts[e.artifact_id])
    return out


def statistics_for_examples(store, examples_uri: str):
    """The ExampleStatistics that a StatisticsGen execution wrote from these examples (latest)."""
    pb2 = _pb2()
    examples = store.get_artifacts_by_uri(examples_uri)
    reader_ids = {e.execution_id for e in store.get_events_by_artifact_ids([a.id for a in examples])
                  if e.type == pb2.Event.INPUT}
    type_names = {t.id: t.name for t in store.get_execution_types()}
    found = []
    for execution in store.get_executions_by_id(sorted(reader_ids)):
        if type_names.get(execution.type_id, "").rsplit(".", 1)[-1] == "StatisticsGen":
            found += artifacts_of(store, execution.id, pb2.Event.OUTPUT).get("statistics", [])
    if not found:
        raise MetadataError(f"ML Metadata has no StatisticsGen output for the examples {examples_uri}")
    return max(found, key=lambda a: a.id)


# --- lineage ------------------------------------------------------------------------------

class _Graph:
    """A LineageGraph with the lookups lineage needs: who produced an artifact, what an execution read."""

    def __init__(self, graph):
        pb2 = _pb2()
        self.artifacts = {a.id: a for a in graph.artifacts}
        self.executions = {e.id: e for e in graph.executions}
        self.contexts = {c.id: c for c in graph.contexts}
        self.producer_of: Dict[int, int] = {}
        self.inputs: Dict[int, Dict[str, List[Any]]] = {}
        for e in graph.events:
            if e.type == pb2.Event.OUTPUT:
                self.producer_of[e.artifact_id] = e.execution_id
            elif e.type == pb2.Event.INPUT and e.artifact_id in self.artifacts and e.path.steps:
                self.inputs.setdefault(e.execution_id, {}).setdefault(e.path.steps[0].key, []).append(
                    self.artifacts[e.artifact_id])
        self.associations: Dict[int, List[int]] = {}
        for a in graph.associations:
            self.associations.setdefault(a.execution_id, []).append(a.context_id)

    def producer(self, artifact):
        execution_id = self.producer_of.get(artifact.id)
        return self.executions.get(execution_id) if execution_id is not None else None

    def inputs_of(self, execution) -> Dict[str, List[Any]]:
        return self.inputs.get(execution.id, {})


def lineage(metadata_path: str, model_name: str, version: int) -> Dict[str, Any]:
    """Evidence that `version` of `model_name` was blessed and pushed, with what produced it:
    one get_lineage_subgraph query upstream from the PushedModel artifact."""
    return lineage_in(connect(metadata_path), model_name, version)


def lineage_in(store, model_name: str, version: int) -> Dict[str, Any]:
    """lineage() on an open store (a resolver strategy is handed one)."""
    pb2 = _pb2()
    pushed = [a for a in store.get_artifacts_by_type("PushedModel")
              if str(custom_property(a, "pushed_version")) == str(version) and custom_property(a, "pushed") == 1
              and os.path.normpath(str(custom_property(a, "pushed_destination"))).split(os.sep)[-2:]
              == [model_name, str(version)]]
    if not pushed:
        raise MetadataError(f"version {version} of '{model_name}' was never pushed after a blessing: refused")
    options = pb2.LineageSubgraphQueryOptions(max_num_hops=MAX_LINEAGE_HOPS,
                                              direction=pb2.LineageSubgraphQueryOptions.UPSTREAM)
    options.starting_artifacts.filter_query = f"id = {pushed[-1].id}"
    graph = _Graph(store.get_lineage_subgraph(options))
    pusher = graph.producer(pushed[-1])
    inputs = graph.inputs_of(pusher)
    blessing = inputs.get("model_blessing", [None])[0]
    if blessing is None or custom_property(blessing, "blessed") != 1:
        raise MetadataError(f"version {version} of '{model_name}' has no blessing: refused")
    infra = inputs.get("infra_blessing", [None])[0]
    if infra is not None and custom_property(infra, "blessed") != 1:
        raise MetadataError(f"version {version} of '{model_name}' failed sandbox validation: refused")
    if "model" in inputs:
        model = inputs["model"][0]
    else:  # Pusher took the sandbox's warmed copy: the Trainer's model is the sandbox's input
        model = graph.inputs_of(graph.producer(infra))["model"][0]
    trainer = graph.producer(model)
    trainer_inputs = graph.inputs_of(trainer)
    transform_graph = trainer_inputs["transform_graph"][0]
    raw_examples = graph.inputs_of(graph.producer(transform_graph))["examples"][0]
    example_gen = graph.producer(raw_examples)
    evaluator = graph.producer(blessing)
    # The evaluation is the Evaluator's other output, beside (not upstream of) the blessing.
    evaluation = artifacts_of(store, evaluator.id, pb2.Event.OUTPUT)["evaluation"][0]
    baseline = graph.inputs_of(evaluator).get("baseline_model", [None])[0]  # what `change` thresholds compared with
    commit = None
    contexts = [graph.contexts[i] for i in graph.associations.get(trainer.id, []) if i in graph.contexts] \
        or store.get_contexts_by_execution(trainer.id)
    for context in contexts:
        if context.type == "pipeline_run" and CODE_COMMIT in context.custom_properties:
            commit = context.custom_properties[CODE_COMMIT].string_value
    return {
        "model": model.uri, "blessing": blessing.uri, "sandbox": infra.uri if infra is not None else None,
        "evaluation": evaluation.uri, "transform_graph": transform_graph.uri,
        "schema": trainer_inputs["schema"][0].uri, "examples": raw_examples.uri,
        "data": exec_property(example_gen, "input_base"),
        "data_fingerprint": custom_property(raw_examples, "input_fingerprint"),
        "code_commit": commit,
        "baseline_model": baseline.uri if baseline is not None else None,
        "pushed_at_ms": pushed[-1].create_time_since_epoch,
    }
