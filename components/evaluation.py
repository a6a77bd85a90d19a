"""TFMA EvalConfig from the spec: metrics per task, plots, confidence intervals, slices, value and
change thresholds; and metric_name(), the one place TFMA's metric keys become readable names."""

import json
from typing import Dict, List

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
# ROC and precision-recall curves come from the confusion matrices at these many thresholds; the
# calibration plot groups predictions into this many buckets. Few enough to keep the evaluation
# output and the SVG small, enough to draw a smooth curve.
PLOTS = [("ConfusionMatrixPlot", {"num_thresholds": 100}), ("CalibrationPlot", {"num_buckets": 10})]
# Multiclass metrics computed one class against the rest, then macro-averaged.
MACRO_AVERAGED = ["AUC", "Precision", "Recall"]
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


_AGGREGATION_PREFIX = {"macro_average": "macro", "weighted_macro_average": "weighted_macro",
                       "micro_average": "micro"}
_SUB_KEY_LABEL = (("class_id", "class"), ("top_k", "top"), ("k", "k"))


def metric_name(key) -> str:
    """The readable name of a TFMA MetricKey or PlotKey: "auc", "macro_auc", "auc_class_2",
    "precision_top_3", "auc_diff" (the change against the baseline). TFMA's own display joins the
    aggregation proto's text into the name ("macro_average: true\\n_auc"); every reader of
    evaluation results names metrics through this function instead."""
    fields = key.DESCRIPTOR.fields_by_name
    name = key.name
    if "aggregation_type" in fields and key.HasField("aggregation_type"):
        name = f"{_AGGREGATION_PREFIX[key.aggregation_type.WhichOneof('type')]}_{name}"
    if key.HasField("sub_key"):
        for field, label in _SUB_KEY_LABEL:
            if key.sub_key.HasField(field):
                name += f"_{label}_{getattr(key.sub_key, field).value}"
    if "is_diff" in fields and key.is_diff:
        name += "_diff"
    return name


def _metric_class(class_name: str):
    """The class TFMA instantiates for a MetricConfig's class_name: its own metrics first, then
    Keras' (SparseCategoricalAccuracy, MeanAbsoluteError), as TFMA resolves them."""
    import tensorflow as tf

    return getattr(tfma.metrics, class_name, None) or getattr(tf.keras.metrics, class_name)


def threshold_metric_names(spec: FeatureSpec) -> Dict[str, str]:
    """{threshold's metric class (spec key): the metric_name() its value is reported under}."""
    from tensorflow_model_analysis.proto import metrics_for_slice_pb2

    names = {}
    for t in spec.thresholds:
        key = metrics_for_slice_pb2.MetricKey(name=_metric_class(t.metric)().name)
        if spec.task == "multiclass" and t.metric in MACRO_AVERAGED:
            key.aggregation_type.macro_average = True
        names[t.metric] = metric_name(key)
    return names


def _plots() -> List[tfma.MetricConfig]:
    return [tfma.MetricConfig(class_name=name, config=json.dumps(config)) for name, config in PLOTS]


def _policy_slice(spec: FeatureSpec) -> List[tfma.SlicingSpec]:
    """With spec `served`: a slice per served policy. Its holdback:<policy> slice is the unbiased
    estimate (answers no model under training decided); rows never served have no policy value."""
    return [tfma.SlicingSpec(feature_keys=[spec.served.policy_column])] if spec.served else []


def eval_config(spec: FeatureSpec) -> tfma.EvalConfig:
    thresholds = {t.metric: t for t in spec.thresholds}
    known = METRICS[spec.task] + (MACRO_AVERAGED if spec.task == "multiclass" else [])
    unknown = sorted(set(thresholds) - set(known))
    if unknown:
        raise ValueError(f"{spec.source}: thresholds.{unknown[0]}: not a metric computed for a "
                         f"{spec.task} task (computed: {', '.join(known)})")
    specs: List[tfma.MetricsSpec] = [tfma.MetricsSpec(
        metrics=[_metric(m, thresholds) for m in METRICS[spec.task]] + (_plots() if spec.task == "binary" else []))]
    if spec.task == "multiclass":
        # One-vs-rest AUC, precision and recall, macro-averaged over the classes.
        classes = tfma.BinarizationOptions(class_ids={"values": list(range(spec.num_classes))})
        specs.append(tfma.MetricsSpec(
            metrics=[_metric(m, thresholds) for m in MACRO_AVERAGED], binarize=classes,
            aggregate=tfma.AggregationOptions(
                macro_average=True, class_weights={i: 1.0 for i in range(spec.num_classes)})))
        specs.append(tfma.MetricsSpec(metrics=_plots(), binarize=classes))  # per class: plots cannot be averaged
    return tfma.EvalConfig(
        model_specs=[tfma.ModelSpec(
            # The Trainer saves a Keras model (components/model.py). Named here, TFMA takes it as
            # such; left empty, TFMA 0.47 finds it out by loading the whole model once more just
            # to look at its class (utils/model_util.py get_model_type, lines 166-177): measured
            # here 9.4 of the Evaluator's 75 s under a profiler.
            model_type=tfma.constants.TF_KERAS,
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
