"""Hyperparameters: the TFX Tuner's entry point and the one rule that applies chosen values to a spec.

The Tuner (opt-in: the spec's `tuning` block) runs a KerasTuner random search over
`tuning.search_space` and writes the best values as a HyperParameters artifact, recorded in
ML Metadata. The Trainer receives that artifact (its `hyperparameters` input) and `run_fn`
applies it with `with_hyperparameters`, the function every trial's model is built through.
An unchanged rerun takes the Tuner's output from the TFX cache instead of searching again.
"""

import dataclasses
from typing import Any, Dict, Mapping

from components.feature_spec import TUNABLE, FeatureSpec

# KerasTuner's Choice takes numbers, strings and bools only: a list of layer sizes travels as "64,32".
_UNITS_SEPARATOR = ","


def choice_value(key: str, value: Any) -> Any:
    """A search-space value as KerasTuner's Choice holds it."""
    if key == "hidden_units":
        return _UNITS_SEPARATOR.join(str(u) for u in value)
    if key == "learning_rate":
        return float(value)
    return value


def with_hyperparameters(spec: FeatureSpec, values: Mapping[str, Any]) -> FeatureSpec:
    """The spec with the training keys `values` names set (KerasTuner's own "tuner/..." keys are skipped)."""
    training, changes = spec.training, {}
    for key, value in values.items():
        if key.startswith("tuner/"):
            continue
        if key not in TUNABLE:
            raise ValueError(f"hyperparameter '{key}' is not a tunable training key (tunable: {', '.join(TUNABLE)}); "
                             "the Tuner's search space comes from the spec's tuning.search_space")
        if key == "learning_rate":
            first = dataclasses.replace(training.schedule[0], learning_rate=float(value))
            changes["schedule"] = (first,) + tuple(training.schedule[1:])
        elif key == "hidden_units":
            units = value.split(_UNITS_SEPARATOR) if isinstance(value, str) else value
            changes["hidden_units"] = tuple(int(u) for u in units)
        else:  # KerasTuner keeps a bool choice as 0/1
            changes[key] = bool(value) if key == "wide" else int(value)
    return dataclasses.replace(spec, training=dataclasses.replace(training, **changes))


def hyperparameter_values(config: Mapping[str, Any]) -> Dict[str, Any]:
    """The chosen values of a keras_tuner.HyperParameters config (what the Tuner's artifact holds)."""
    return dict(config.get("values") or {})


_OBJECTIVES = {"binary": ("auc", "max"), "multiclass": ("accuracy", "max"), "regression": ("loss", "min")}


def tuner_fn(fn_args):
    """Called by the TFX Tuner with FnArgs; returns the tuner and its search() arguments."""
    import keras_tuner
    import tensorflow_transform as tft
    from tfx.components.tuner.component import TunerFnResult

    from components import feeder, model as model_lib
    from components.preprocessing import label_key
    from components.trainer import _skip_autograph_for_tf_keras, served_weights

    spec = FeatureSpec.from_custom_config(fn_args.custom_config)
    tf_transform_output = tft.TFTransformOutput(fn_args.transform_graph_path)
    cardinalities = model_lib.input_cardinalities(spec, tf_transform_output)
    space = spec.tuning.search_space

    def build(hp):
        values = {k: hp.Choice(k, [choice_value(k, v) for v in vs]) for k, vs in space.items()}
        return model_lib.build(with_hyperparameters(spec, values), cardinalities)

    metric, direction = _OBJECTIVES[spec.task]
    oracle = keras_tuner.oracles.RandomSearchOracle(
        objective=keras_tuner.Objective("val_" + metric, direction), max_trials=spec.tuning.trials,
        seed=spec.training.seed)
    tuner = _tf_keras_search()(oracle, hypermodel=build, directory=fn_args.working_dir, project_name=spec.name)
    feature_spec = tf_transform_output.transformed_feature_spec()
    # Served rows are weighted (or dropped) as the Trainer weighs them: trials scored on other
    # rows than the model is trained on would pick its hyperparameters for another population.
    weight, holdback_only = served_weights(spec, fn_args.train_files)

    def data(files, batch_size, shuffle, training):
        return feeder.make_dataset(files, feature_spec, label_key(spec), batch_size, shuffle=shuffle,
                                   seed=spec.training.seed, deterministic=spec.training.deterministic,
                                   shuffle_buffer=spec.training.shuffle_buffer, weight_key=weight,
                                   drop_unweighted=training and holdback_only)

    _skip_autograph_for_tf_keras()
    return TunerFnResult(tuner=tuner, fit_kwargs={
        "x": data(fn_args.train_files, spec.training.schedule[0].batch_size, shuffle=True, training=True),
        "validation_data": data(fn_args.eval_files, 1024, shuffle=False, training=False),
        "epochs": spec.tuning.epochs})


def _tf_keras_search():
    """KerasTuner's search loop around tf_keras models.

    KerasTuner 1.4 builds on Keras 3 when it is installed (it is, beside tf_keras, which TFX 1.16
    trains with) and its Keras `Tuner` refuses a tf_keras model. Its framework-neutral BaseTuner
    leaves each trial's training to run_trial, which fits and scores the model here.
    """
    from keras_tuner.engine import base_tuner

    class TfKerasSearch(base_tuner.BaseTuner):
        def run_trial(self, trial, x, validation_data, epochs):
            model = self.hypermodel.build(trial.hyperparameters)
            model.fit(x, epochs=epochs, verbose=0)
            scores = model.evaluate(validation_data, return_dict=True, verbose=0)
            return {"val_" + k: float(v) for k, v in scores.items()}

    return TfKerasSearch
