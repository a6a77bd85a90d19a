"""The Tuner: a search over the spec's tuning.search_space, wired before the Trainer for
LocalDagRunner and Kubeflow, whose best values are what the Trainer trains with."""

import dataclasses
import json
import os

import pytest
import yaml

from tests.conftest import TAXI_SPEC

SEARCH = {"hidden_units": [[8], [16, 8]], "wide": [True, False]}
UNITS = {"8": (8,), "16,8": (16, 8)}  # KerasTuner's choice strings and the layer sizes they stand for


def _tuned_raw():
    with open(TAXI_SPEC) as f:
        raw = yaml.safe_load(f)
    raw["tuning"] = {"search_space": SEARCH, "trials": 2, "epochs": 1}
    return raw


@pytest.fixture(scope="module")
def tuned_spec_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tuned") / "taxi_tuned.yaml"  # relative paths stay repo-relative
    path.write_text(yaml.safe_dump(_tuned_raw()))
    return str(path)


def test_with_hyperparameters_sets_only_the_chosen_training_keys(taxi_spec):
    from components.tuning import with_hyperparameters

    tuned = with_hyperparameters(taxi_spec, {"learning_rate": 0.02, "hidden_units": "16,8", "embedding_dim": 3,
                                             "wide": 1, "tuner/trial_id": "0001"})
    before, after = taxi_spec.training, tuned.training
    assert after.schedule[0].learning_rate == 0.02 and after.schedule[1:] == before.schedule[1:]
    assert (after.hidden_units, after.embedding_dim) == ((16, 8), 3) and after.wide is True  # 1: KerasTuner's bool
    assert dataclasses.replace(after, schedule=before.schedule, hidden_units=before.hidden_units,
                               embedding_dim=before.embedding_dim, wide=before.wide) == before
    with pytest.raises(ValueError, match="'dropout' is not a tunable training key .* tuning.search_space"):
        with_hyperparameters(taxi_spec, {"dropout": 0.1})


def _node(pipeline_ir, node_id):
    return next(n.pipeline_node for n in pipeline_ir.nodes if n.pipeline_node.node_info.id == node_id)


def test_local_dag_runner_compiles_the_tuner_into_the_trainers_hyperparameters(tuned_spec_path, tmp_path):
    from tfx.dsl.compiler import compiler

    from components import feature_spec
    from pipelines import pipeline as pipeline_lib

    spec = feature_spec.load(tuned_spec_path)
    env = pipeline_lib.Environment(pipeline_root=str(tmp_path), model_repository=str(tmp_path))
    ir = compiler.Compiler().compile(pipeline_lib.create_pipeline(spec, env))
    (channel,) = _node(ir, "Trainer").inputs.inputs["hyperparameters"].channels
    assert (channel.producer_node_query.id, channel.output_key) == ("Tuner", "best_hyperparameters")
    tuner = _node(ir, "Tuner")
    assert {k: c.channels[0].producer_node_query.id for k, c in tuner.inputs.inputs.items()} == {
        "examples": "Transform", "transform_graph": "Transform", "schema": "ImportSchemaGen"}
    config = json.loads(tuner.parameters.parameters["custom_config"].field_value.string_value)
    assert config["feature_spec"]["tuning"]["search_space"] == SEARCH
    # Without a tuning block there is no Tuner and the Trainer has no hyperparameters input.
    untuned = compiler.Compiler().compile(pipeline_lib.create_pipeline(feature_spec.load(TAXI_SPEC), env))
    assert "Tuner" not in {n.pipeline_node.node_info.id for n in untuned.nodes}
    assert "hyperparameters" not in _node(untuned, "Trainer").inputs.inputs


def test_kubeflow_compiles_the_tuner_into_the_trainers_hyperparameters(tmp_path, monkeypatch):
    from components import feature_spec
    from pipelines import kubeflow_runner
    from tests.test_kubeflow import IMAGE, KUBEFLOW_ENV

    # The training image holds configs/ only: the tuned spec stands in for taxi.yaml there.
    tuned = feature_spec.parse(_tuned_raw(), source=TAXI_SPEC)
    monkeypatch.setattr(kubeflow_runner.feature_spec, "load", lambda path: tuned)
    output = str(tmp_path / "tuned_pipeline.yaml")
    kubeflow_runner.compile_pipeline(TAXI_SPEC, KUBEFLOW_ENV, image=IMAGE, output=output)
    with open(output) as f:
        tasks = yaml.safe_load(f)["root"]["dag"]["tasks"]
    wired = tasks["Trainer"]["inputs"]["artifacts"]["hyperparameters"]["taskOutputArtifact"]
    assert wired == {"producerTask": "Tuner", "outputArtifactKey": "best_hyperparameters"}
    assert "Tuner" in tasks["Trainer"]["dependentTasks"]
    assert tasks["Tuner"]["inputs"]["artifacts"]["examples"]["taskOutputArtifact"]["producerTask"] == "Transform"


def test_the_searchs_best_values_are_what_the_trainer_trains_with(small_transform, tmp_path, monkeypatch):
    """tuner_fn's search as TFX's Tuner executor runs it and writes it; the file read back as TFX's
    Trainer executor reads it into fn_args.hyperparameters; run_fn trains the spec those values give."""
    from tfx.components.trainer.fn_args_utils import FnArgs
    from tfx.components.tuner import executor as tuner_executor
    from tfx.types import standard_artifacts

    from components import feature_spec, trainer, tuning

    spec = feature_spec.parse(_tuned_raw(), source="taxi_tuned.yaml")
    graph_dir, train_files, eval_files = small_transform
    custom_config = spec.to_custom_config()
    result = tuning.tuner_fn(FnArgs(train_files=[train_files], eval_files=[eval_files],
                                    transform_graph_path=graph_dir, working_dir=str(tmp_path / "work"),
                                    custom_config=custom_config))
    result.tuner.search(**result.fit_kwargs)
    outputs = {"best_hyperparameters": [standard_artifacts.HyperParameters()],
               "tuner_results": [standard_artifacts.TunerResults()]}
    for key, (artifact,) in outputs.items():
        artifact.uri = str(tmp_path / key)
        os.makedirs(artifact.uri)
    tuner_executor.write_best_hyperparameters(result.tuner, outputs)
    with open(tmp_path / "tuner_results" / "tuner_results.json") as f:
        trials = json.load(f)
    # Each trial scored by its val_auc, best first.
    assert len(trials) == 2 and 1.0 >= trials[0]["score"] >= trials[1]["score"] >= 0.0, trials
    with open(tmp_path / "best_hyperparameters" / "best_hyperparameters.txt") as f:
        best = json.load(f)
    assert best["values"] == {k: v for k, v in trials[0].items() if k in SEARCH}  # the top-scoring trial

    trained = []
    monkeypatch.setattr(trainer, "train_and_export", lambda spec, **_: trained.append(spec) or {})
    trainer.run_fn(FnArgs(custom_config=custom_config, hyperparameters=best, transform_output=graph_dir,
                          train_files=[train_files], eval_files=[eval_files], model_run_dir=str(tmp_path / "run"),
                          serving_model_dir=str(tmp_path / "model")))
    (used,) = trained
    assert used.training.hidden_units == UNITS[best["values"]["hidden_units"]]
    assert used.training.wide is bool(best["values"]["wide"])
    assert used.training.schedule == spec.training.schedule  # learning_rate was not searched


@pytest.mark.parametrize("edit, changed", [
    (lambda raw: raw["tuning"]["search_space"].update(embedding_dim=[2, 4]), {"Tuner"}),
    (lambda raw: raw.update(thresholds={"AUC": {"lower": 0.8}}), {"Evaluator"}),
], ids=["search_space", "thresholds"])
def test_the_tuners_cache_key_holds_only_what_it_reads(tmp_path, edit, changed):
    """An unchanged rerun, or one that edits only what the Tuner does not read, reuses its search
    from the cache; a search-space edit reruns the Tuner without touching the Trainer's parameters."""
    from tests.test_pipeline_e2e import _node_parameters

    def spec_file(change=None):  # one path: the spec's file name is part of every node's parameters
        raw = _tuned_raw()
        if change:
            change(raw)
        path = tmp_path / "taxi_tuned.yaml"
        path.write_text(yaml.safe_dump(raw))
        return str(path)

    before = _node_parameters(spec_file(), str(tmp_path))
    after = _node_parameters(spec_file(edit), str(tmp_path))
    assert "Tuner" in before and before.keys() == after.keys()
    assert {n for n in before if before[n] != after[n]} == changed
