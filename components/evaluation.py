"""TFMA EvalConfig from the spec: metrics per task, slices, value and change thresholds."""

from typing import List

import tensorflow_model_analysis as tfma

from components.feature_spec import FeatureSpec, Threshold
from components.preprocessing import label_key

# The Evaluator feeds serialized examples to this signature and gets the label from
# transform_features, so the label is derived by the very graph used in training.
EVAL_SIGNATURE = "serving_tf_example"
PREDICTION_KEYS = {"binary": "score", "multiclass": "probabilities", "regression": "value"}
METRICS = {
    "binary": ["ExampleCount", "AUC", "BinaryAccuracy", "Precision", "Recall", "Calibration",
               "MeanLabel", "MeanPrediction"],
    "multiclass": ["ExampleCount", "SparseCategoricalAccuracy"],
    "regression": ["ExampleCount", "MeanAbsoluteError", "RootMeanSquaredError", "MeanLabel",
                   "MeanPrediction"],
}
# Metrics that can fall: for them a threshold's `change` is the largest allowed drop.
LOWER_IS_BETTER = {"MeanAbsoluteError", "RootMeanSquaredError", "MeanSquaredError"}


def _metric(name: str, thresholds) -> tfma.MetricConfig:
    if name not in thresholds:
        return tfma.MetricConfig(class_name=name)
    # Gate on the overall slice only: small slices (e.g. 20 disputed fares) are reported, not
    # gated, or noise in them would block every release.
    return tfma.MetricConfig(class_name=name, per_slice_thresholds=[tfma.PerSliceMetricThreshold(
        slicing_specs=[tfma.SlicingSpec()], threshold=_threshold(thresholds[name]))])


def _threshold(t: Threshold) -> tfma.MetricThreshold:
    threshold = tfma.MetricThreshold()
    if t.lower is not None or t.upper is not None:
        bounds = {}
        if t.lower is not None:
            bounds["lower_bound"] = {"value": t.lower}
        if t.upper is not None:
            bounds["upper_bound"] = {"value": t.upper}
        threshold.value_threshold.CopyFrom(tfma.GenericValueThreshold(**bounds))
    if t.change is not None:
        # Ignored on the first run, when no blessed baseline exists yet.
        if t.metric in LOWER_IS_BETTER:
            direction = tfma.MetricDirection.LOWER_IS_BETTER
        else:
            direction = tfma.MetricDirection.HIGHER_IS_BETTER
        threshold.change_threshold.CopyFrom(tfma.GenericChangeThreshold(
            direction=direction, absolute={"value": t.change}))
    return threshold


def _policy_slice(spec: FeatureSpec) -> List[tfma.SlicingSpec]:
    """With spec `served`: a slice per served policy. Its holdback:<policy> slice is the unbiased
    estimate (answers no model under training decided); rows never served have no policy value."""
    return [tfma.SlicingSpec(feature_keys=[spec.served.policy_column])] if spec.served else []


def eval_config(spec: FeatureSpec) -> tfma.EvalConfig:
    thresholds = {t.metric: t for t in spec.thresholds}
    known = METRICS[spec.task] + (["AUC", "Precision", "Recall"] if spec.task == "multiclass" else [])
    unknown = sorted(set(thresholds) - set(known))
    if unknown:
        raise ValueError(f"{spec.source}: thresholds.{unknown[0]}: not a metric computed for a "
                         f"{spec.task} task (computed: {', '.join(known)})")
    specs: List[tfma.MetricsSpec] = [tfma.MetricsSpec(metrics=[_metric(m, thresholds) for m in METRICS[spec.task]])]
    if spec.task == "multiclass":
        # One-vs-rest AUC, precision and recall, macro-averaged over the classes.
        specs.append(tfma.MetricsSpec(
            metrics=[_metric(m, thresholds) for m in ("AUC", "Precision", "Recall")],
            binarize=tfma.BinarizationOptions(class_ids={"values": list(range(spec.num_classes))}),
            aggregate=tfma.AggregationOptions(
                macro_average=True, class_weights={i: 1.0 for i in range(spec.num_classes)})))
    return tfma.EvalConfig(
        model_specs=[tfma.ModelSpec(
            signature_name=EVAL_SIGNATURE,
            preprocessing_function_names=["transform_features"],
            label_key=label_key(spec),
            prediction_key=PREDICTION_KEYS[spec.task])],
        slicing_specs=[tfma.SlicingSpec()] + [tfma.SlicingSpec(feature_keys=list(s)) for s in spec.slices]
        + _policy_slice(spec),
        metrics_specs=specs,
        # TFMA would also compute the model's compiled Keras metrics and loss (accuracy, auc,
        # mae, rmse, loss): the same numbers as the metrics above under other names, each an
        # extra combiner on every slice. The trainer's own evaluation already reports them.
        options=tfma.Options(include_default_metrics={"value": False}))
