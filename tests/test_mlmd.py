"""pipelines/mlmd.py against a store laid out as TFX 1.16 writes one run: artifacts, executions,
INPUT/OUTPUT events keyed by the components' channel names, node and pipeline_run contexts."""

import time

import pytest

from pipelines import mlmd


def _store(path):
    from ml_metadata.metadata_store import metadata_store
    from ml_metadata.proto import metadata_store_pb2 as pb2

    config = pb2.ConnectionConfig()
    config.sqlite.filename_uri = path
    config.sqlite.connection_mode = pb2.SqliteMetadataSourceConfig.READWRITE_OPENCREATE
    return metadata_store.MetadataStore(config), pb2


class Run:
    """Writes ExampleGen -> Transform -> Trainer -> Evaluator / sandbox_validator -> Pusher."""

    def __init__(self, path, blessed=1, sandbox_blessed=1, commit="abc123", baseline=None):
        self.store, self.pb2 = _store(path)
        s, pb2 = self.store, self.pb2
        self.types = {}
        self.run = pb2.Context(type_id=self._context_type("pipeline_run"), name="run-1")
        self.run.custom_properties[mlmd.CODE_COMMIT].string_value = commit
        [self.run.id] = s.put_contexts([self.run])
        examples = self.artifact("Examples", "/root/CsvExampleGen/examples/1", input_fingerprint="fp-1")
        gen = self.execution("CsvExampleGen", {}, {"examples": [examples]}, input_base="/data/taxi")
        schema = self.artifact("Schema", "/root/schema_importer/result/2")
        graph = self.artifact("TransformGraph", "/root/Transform/transform_graph/3")
        self.execution("Transform", {"examples": [examples], "schema": [schema]}, {"transform_graph": [graph]})
        model = self.artifact("Model", "/root/Trainer/model/4")
        self.trainer = self.execution("Trainer", {"transform_graph": [graph], "schema": [schema]},
                                      {"model": [model]}, run=True)
        blessing = self.artifact("ModelBlessing", "/root/Evaluator/blessing/5", blessed=blessed)
        evaluation = self.artifact("ModelEvaluation", "/root/Evaluator/evaluation/6")
        baseline_model = {"baseline_model": [self.artifact("Model", baseline)]} if baseline else {}
        self.execution("Evaluator", {"model": [model], "examples": [examples], **baseline_model},
                       {"blessing": [blessing], "evaluation": [evaluation]})
        infra = self.artifact("InfraBlessing", "/root/sandbox_validator/blessing/7", blessed=sandbox_blessed)
        # The warmed copy Pusher pushes lives in the InfraBlessing (has_model), as InfraValidator's does.
        self.execution("sandbox_validator", {"model": [model]}, {"blessing": [infra]})
        pushed = self.artifact("PushedModel", "/root/Pusher/pushed_model/9", pushed=1, pushed_version="1700000000",
                               pushed_destination="/repo/taxi/1700000000")
        self.execution("Pusher", {"model_blessing": [blessing], "infra_blessing": [infra]},
                       {"pushed_model": [pushed]})
        self.ids = [gen.id]

    def _context_type(self, name):
        return self.store.put_context_type(self.pb2.ContextType(name=name))

    def _type(self, kind, name):
        if (kind, name) not in self.types:
            put = self.store.put_artifact_type if kind == "a" else self.store.put_execution_type
            proto = self.pb2.ArtifactType(name=name) if kind == "a" else self.pb2.ExecutionType(name=name)
            self.types[(kind, name)] = put(proto)
        return self.types[(kind, name)]

    def artifact(self, type_name, uri, **properties):
        a = self.pb2.Artifact(type_id=self._type("a", type_name), uri=uri, state=self.pb2.Artifact.LIVE)
        for k, v in properties.items():
            if isinstance(v, int):
                a.custom_properties[k].int_value = v
            else:
                a.custom_properties[k].string_value = v
        [a.id] = self.store.put_artifacts([a])
        return a

    def execution(self, type_name, inputs, outputs, run=False, **properties):
        pb2 = self.pb2
        e = pb2.Execution(type_id=self._type("e", type_name), last_known_state=pb2.Execution.COMPLETE)
        for k, v in properties.items():
            e.custom_properties[k].string_value = v
        events = []
        for kind, channels in ((pb2.Event.INPUT, inputs), (pb2.Event.OUTPUT, outputs)):
            for key, artifacts in channels.items():
                for a in artifacts:
                    event = pb2.Event(type=kind)
                    event.path.steps.add().key = key
                    events.append((a, event))
        contexts = [self.run] if run else []
        e.id, _, _ = self.store.put_execution(e, events, contexts)
        return e


def test_lineage_walks_one_subgraph_from_the_pushed_model_to_the_data(tmp_path):
    path = str(tmp_path / "mlmd.sqlite")
    before_ms = time.time() * 1000 - 1
    Run(path)
    evidence = mlmd.lineage(path, "taxi", 1700000000)
    assert before_ms <= evidence.pop("pushed_at_ms") <= time.time() * 1000 + 1  # when MLMD recorded the push
    assert evidence == {
        "model": "/root/Trainer/model/4", "blessing": "/root/Evaluator/blessing/5",
        "sandbox": "/root/sandbox_validator/blessing/7", "evaluation": "/root/Evaluator/evaluation/6",
        "transform_graph": "/root/Transform/transform_graph/3", "schema": "/root/schema_importer/result/2",
        "examples": "/root/CsvExampleGen/examples/1", "data": "/data/taxi", "data_fingerprint": "fp-1",
        "code_commit": "abc123", "baseline_model": None}


def test_lineage_names_the_model_the_evaluator_compared_with(tmp_path):
    path = str(tmp_path / "mlmd.sqlite")
    Run(path, baseline="/root/Trainer/model/earlier")
    assert mlmd.lineage(path, "taxi", 1700000000)["baseline_model"] == "/root/Trainer/model/earlier"


@pytest.mark.parametrize("blessed, sandbox, message", [(0, 1, "has no blessing"),
                                                        (1, 0, "failed sandbox validation")])
def test_lineage_refuses_what_was_not_blessed(tmp_path, blessed, sandbox, message):
    path = str(tmp_path / "mlmd.sqlite")
    Run(path, blessed=blessed, sandbox_blessed=sandbox)
    with pytest.raises(mlmd.MetadataError, match=f"version 1700000000 of 'taxi' {message}"):
        mlmd.lineage(path, "taxi", 1700000000)


def test_lineage_names_what_is_missing(tmp_path):
    path = str(tmp_path / "mlmd.sqlite")
    with pytest.raises(mlmd.MetadataError, match="no ML Metadata store at .*run the pipeline first"):
        mlmd.lineage(path, "taxi", 1)
    Run(path)
    with pytest.raises(mlmd.MetadataError, match="version 2 of 'taxi' was never pushed"):
        mlmd.lineage(path, "taxi", 2)
    with pytest.raises(mlmd.MetadataError, match="version 1700000000 of 'other' was never pushed"):
        mlmd.lineage(path, "other", 1700000000)  # the destination names the model


def test_runs_statistics_and_tags(tmp_path):
    path = str(tmp_path / "mlmd.sqlite")
    run = Run(path)
    stats = run.artifact("ExampleStatistics", "/root/StatisticsGen/statistics/10")
    run.execution("StatisticsGen", {"examples": [run.store.get_artifacts_by_uri("/root/CsvExampleGen/examples/1")[0]]},
                  {"statistics": [stats]})
    store = mlmd.connect(path)
    assert mlmd.statistics_for_examples(store, "/root/CsvExampleGen/examples/1").uri == stats.uri
    with pytest.raises(mlmd.MetadataError, match="no StatisticsGen output for the examples /nowhere"):
        mlmd.statistics_for_examples(store, "/nowhere")
    assert mlmd.latest_run(store).name == "run-1"
    assert [node for _, node, state in mlmd.run_executions(store, mlmd.latest_run(store))] == [str(run.trainer.id)]
    assert mlmd.tag_latest_run(_config(path), "code_commit", "def456")  # through a connection config, as the runner
    assert mlmd.latest_run(mlmd.connect(path)).custom_properties["code_commit"].string_value == "def456"


def _spans_store(path):
    """ExampleGen's Examples for spans 1, 2 and 2 again (the span as a custom property, driver.py:55-57)
    and a StatisticsGen execution each whose statistics carry the declared span 0 that
    tfx/components/statistics_gen/executor.py:144 copies from the Examples' unset declared span."""
    run = Run(path)
    for name in ("Examples", "ExampleStatistics"):  # TFX declares span on both types
        run.types[("a", name)] = run.store.put_artifact_type(
            run.pb2.ArtifactType(name=name, properties={"span": run.pb2.INT}), can_add_fields=True)
    statistics = []
    for n, span in enumerate((1, 2, 2)):
        examples = run.artifact("Examples", f"/root/CsvExampleGen/examples/{20 + n}", span=span)
        stats = run.artifact("ExampleStatistics", f"/root/StatisticsGen/statistics/{30 + n}")
        stats.properties["span"].int_value = 0
        run.store.put_artifacts([stats])
        run.execution("StatisticsGen", {"examples": [examples]}, {"statistics": [stats]})
        statistics.append(stats)
    return run, statistics


def test_a_statistics_artifact_describes_the_span_its_statistics_gen_read(tmp_path):
    run, (one, two, two_again) = _spans_store(str(tmp_path / "mlmd.sqlite"))
    stamped = run.artifact("ExampleStatistics", "/root/StatisticsGen/statistics/40", span="7")  # a string, as TFX may
    alone = run.artifact("ExampleStatistics", "/root/elsewhere/41")  # no producer: its declared span, 5
    alone.properties["span"].int_value = 5
    run.store.put_artifacts([alone])
    store = mlmd.connect(str(tmp_path / "mlmd.sqlite"))
    artifacts = store.get_artifacts_by_id([one.id, two.id, two_again.id, stamped.id, alone.id])
    assert [a.properties["span"].int_value for a in artifacts[:3]] == [0, 0, 0]  # what `a.span` would read
    assert mlmd.described_spans(store, artifacts) == {one.id: 1, two.id: 2, two_again.id: 2, stamped.id: 7,
                                                      alone.id: 5}
    assert mlmd.described_spans(store, []) == {}


def _config(path):
    from ml_metadata.proto import metadata_store_pb2 as pb2

    config = pb2.ConnectionConfig()
    config.sqlite.filename_uri = path
    config.sqlite.connection_mode = pb2.SqliteMetadataSourceConfig.READWRITE_OPENCREATE
    return config


def test_stable_baseline_is_the_model_behind_the_promoted_version(tmp_path):
    """baseline: stable resolves, through the push's lineage, the model production serves."""
    from tfx.types import standard_artifacts

    from components.baseline import BLESSING, CANDIDATE, MODEL, StableModelStrategy
    from tests.conftest import write_models_config

    path = str(tmp_path / "mlmd.sqlite")
    run = Run(path)
    repo = tmp_path / "repo"
    (repo / "taxi").mkdir(parents=True)

    def artifact(kind, uri, artifact_id):
        a = kind()
        a.uri, a.id = uri, artifact_id
        return a
    trained = artifact(standard_artifacts.Model, "/root/Trainer/model/4", 4)
    other = artifact(standard_artifacts.Model, "/root/Trainer/model/40", 40)
    blessing = artifact(standard_artifacts.ModelBlessing, "/root/Evaluator/blessing/5", 5)
    candidate = artifact(standard_artifacts.Model, "/root/Trainer/model/41", 41)
    inputs = {MODEL: [trained, other], BLESSING: [blessing], CANDIDATE: [candidate]}
    strategy = StableModelStrategy(str(repo), "taxi")
    # Before the first promotion: no models.config, no baseline (change thresholds are skipped).
    assert strategy.resolve_artifacts(run.store, inputs) == {MODEL: [], BLESSING: [], CANDIDATE: [candidate]}
    write_models_config(repo, {"taxi": {"stable": 1700000000}})
    resolved = strategy.resolve_artifacts(run.store, inputs)
    assert resolved[MODEL] == [trained] and resolved[BLESSING] == [blessing] and resolved[CANDIDATE] == [candidate]
    # A cached rerun whose candidate is the stable model itself compares with nothing.
    rerun = strategy.resolve_artifacts(run.store, {**inputs, CANDIDATE: [trained]})
    assert rerun[MODEL] == [] and rerun[BLESSING] == []


def test_artifact_uris_lists_one_type_and_names_a_missing_store(tmp_path):
    path = str(tmp_path / "metadata.sqlite")
    first = mlmd.record_artifact(path, "TransformCache", "/cache/1", {})
    mlmd.record_artifact(path, "Examples", "/examples/1", {"span": 1})
    mlmd.record_artifact(path, "TransformCache", "/cache/2", {})
    assert first > 0 and sorted(mlmd.artifact_uris(path, "TransformCache")) == ["/cache/1", "/cache/2"]
    assert mlmd.artifact_uris(path, "Model") == []  # a type the store never saw
    with pytest.raises(mlmd.MetadataError, match="no ML Metadata store at .*none.sqlite: run the pipeline first"):
        mlmd.artifact_uris(str(tmp_path / "none.sqlite"), "TransformCache")


def test_latest_node_states_takes_each_nodes_newest_execution(tmp_path):
    path = str(tmp_path / "metadata.sqlite")
    store, pb2 = _store(path)
    node_type = store.put_context_type(pb2.ContextType(name="node"))
    execution_type = store.put_execution_type(pb2.ExecutionType(name="Trainer"))
    for name, states in (("taxi.Trainer", [pb2.Execution.COMPLETE, pb2.Execution.CACHED]),
                         ("taxi.Evaluator", [pb2.Execution.CACHED, pb2.Execution.COMPLETE]),
                         ("taxi.Pusher", [])):
        [context_id] = store.put_contexts([pb2.Context(type_id=node_type, name=name)])
        for state in states:
            store.put_execution(pb2.Execution(type_id=execution_type, last_known_state=state), [],
                                [pb2.Context(id=context_id, type_id=node_type, name=name)])
    assert mlmd.latest_node_states(path) == {"Trainer": "CACHED", "Evaluator": "COMPLETE"}
