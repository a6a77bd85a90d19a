"""`baseline: stable` compiled: the Evaluator's baseline model comes from the stable-model resolver
(components/baseline.py StableModelStrategy) in the IR TFX's compiler builds for LocalDagRunner, and the
Kubeflow compile refuses it naming the file, the key and the fix (KubeflowV2DagRunner's step builder
compiles TFX's two stock resolver strategies only). Compiles only: no component runs."""

import pytest

from tests.conftest import TAXI_SPEC


@pytest.fixture(scope="module")
def stable_pipeline(taxi_spec, tmp_path_factory):
    from pipelines import pipeline as pipeline_lib

    root = tmp_path_factory.mktemp("stable")
    env = pipeline_lib.Environment(pipeline_root=str(root / "root"), model_repository=str(root / "models"),
                                   baseline="stable")
    return pipeline_lib.create_pipeline(taxi_spec, env), env


def test_the_evaluators_baseline_comes_from_the_stable_model_resolver(stable_pipeline):
    from tfx.dsl.components.common import resolver

    from components.baseline import StableModelStrategy

    built, env = stable_pipeline
    nodes = {c.id: c for c in built.components}
    assert "latest_blessed_model_resolver" not in nodes
    stable = nodes["stable_model_resolver"]
    assert stable.exec_properties[resolver.RESOLVER_STRATEGY_CLASS] is StableModelStrategy
    assert stable.exec_properties[resolver.RESOLVER_CONFIG] == {
        "model_repository": env.model_repository, "model_name": "taxi", "label": "stable"}
    assert nodes["Evaluator"].inputs["baseline_model"].producer_component_id == "stable_model_resolver"


def test_the_local_compile_wires_the_stable_strategy_into_the_evaluators_input(stable_pipeline):
    """TFX 1.16's compiler (the one LocalDagRunner calls) turns the resolver into an input graph whose op is
    the strategy's class path with its config as kwargs (tfx/dsl/components/common/resolver.py:252,
    tfx/dsl/compiler/node_inputs_compiler.py:123-127), and the
    Evaluator's baseline_model input queries that node's output."""
    from tfx.dsl.compiler import compiler

    built, env = stable_pipeline
    ir = {n.pipeline_node.node_info.id: n.pipeline_node for n in compiler.Compiler().compile(built).nodes}
    [channel] = ir["Evaluator"].inputs.inputs["baseline_model"].channels
    assert channel.producer_node_query.id == "stable_model_resolver"
    [graph] = ir["stable_model_resolver"].inputs.input_graphs.values()
    ops = [n.op_node for n in graph.nodes.values() if n.HasField("op_node")]
    [op] = [o for o in ops if o.op_type == "components.baseline.StableModelStrategy"]
    assert {k: v.value.field_value.string_value for k, v in op.kwargs.items()} == {
        "model_repository": env.model_repository, "model_name": "taxi", "label": "stable"}
    # The candidate is an input: the resolver runs after the Trainer and can leave a cached rerun's model out.
    assert "Trainer" in ir["stable_model_resolver"].upstream_nodes
    assert "stable_model_resolver" in ir["Evaluator"].upstream_nodes


def test_the_kubeflow_compile_refuses_the_stable_baseline_naming_file_key_and_fix(tmp_path):
    import yaml

    from pipelines import kubeflow_runner
    from tests.test_kubeflow import IMAGE, KUBEFLOW_ENV

    with open(KUBEFLOW_ENV) as f:
        env = {**yaml.safe_load(f), "baseline": "stable"}
    env_path = tmp_path / "kubeflow.yaml"
    env_path.write_text(yaml.safe_dump(env))
    with pytest.raises(kubeflow_runner.KubeflowError) as refused:
        kubeflow_runner.compile_pipeline(TAXI_SPEC, str(env_path), image=IMAGE, output=str(tmp_path / "p.yaml"))
    message = str(refused.value)
    assert message.startswith(f"{env_path}: baseline: stable ")
    assert "components/baseline.py" in message and "use none" in message and "latest_blessed" in message
    assert not (tmp_path / "p.yaml").exists()


def test_the_local_runner_builds_the_pipeline_with_the_environment_files_baseline(tmp_path, monkeypatch):
    """`baseline: stable` in the local environment file reaches create_pipeline (it was dropped: every local
    run compared with the latest blessed model). Stops at create_pipeline: nothing runs."""
    import yaml

    from pipelines import local_runner, pipeline as pipeline_lib
    from tests.conftest import REPO

    with open(f"{REPO}/configs/local.yaml") as f:
        env = yaml.safe_load(f)
    env.update(baseline="stable", pipeline_root=str(tmp_path / "root"), metadata_path=str(tmp_path / "m.sqlite"),
               model_repository=str(tmp_path / "models"))
    env_path = tmp_path / "local.yaml"
    env_path.write_text(yaml.safe_dump(env))
    built = []

    class Built(Exception):
        pass

    def create_pipeline(spec, environment, **kwargs):
        built.append(environment)
        raise Built()
    monkeypatch.setattr(pipeline_lib, "create_pipeline", create_pipeline)
    with pytest.raises(Built):
        local_runner.run(TAXI_SPEC, str(env_path), summary_path=str(tmp_path / "summary.json"), quiet=True,
                         check_data=False)
    [environment] = built
    assert environment.baseline == "stable" and environment.model_repository == str(tmp_path / "models")
