"""The one place preprocessing lives: a tf.Transform preprocessing_fn built from the spec.

Every raw column arrives as a SparseTensor of shape [batch, 1] (schemas are kept
without fixed shapes) where an absent value is simply absent. The same graph is
embedded in the model's serving signatures, so a value missing at serving time
goes through exactly the code below, as it did in training.
"""

from typing import Any, Dict, List, Mapping, Optional, Tuple

import tensorflow as tf
import tensorflow_transform as tft

from components.feature_spec import CATEGORICAL_TRANSFORMS, Cross, Feature, FeatureSpec, MissingPolicy
from serving.logstore import HOLDBACK_POLICY_PREFIX

XF_SUFFIX = "_xf"
MISSING_SUFFIX = "_missing"
# The training weight of each row (spec `served`): not a model input, the feeder hands it to fit.
SAMPLE_WEIGHT_KEY = "__sample_weight" + XF_SUFFIX


def transformed_name(name: str) -> str:
    return name + XF_SUFFIX


def label_key(spec: FeatureSpec) -> str:
    return transformed_name(spec.label.name)


def vocabulary_name(feature_name: str) -> str:
    return "vocab_" + feature_name


def feature_outputs(feature: Feature) -> List[Tuple[str, str]]:
    """(transformed name, transform) for each model input a feature becomes."""
    first = [(transformed_name(feature.name), feature.transform)]
    return first + [(transformed_name(f"{feature.name}_{t}"), t) for t in feature.extra_transforms]


def categorical_output(feature: Feature) -> str:
    """The transformed name of a feature's first id-valued output: what a cross combines."""
    return next(name for name, t in feature_outputs(feature) if t in CATEGORICAL_TRANSFORMS)


# tf.Transform traces preprocessing_fn as one TF1 graph, as the Transform component and every
# test that runs it under tf.Transform's Beam implementation do (tensorflow_transform.beam.Context).
# In TF2 mode each step traces it as a tf.function again: TFX's executor for the columns to read
# (tfx/components/transform/executor.py, _RunBeamImpl: get_analyze_input_columns and
# get_transform_input_columns), tf.Transform for the analysis graph, the schema and the final
# SavedModel (tensorflow_transform/beam/impl.py, _AnalyzeDatasetCommon.expand and
# _create_v2_saved_model). Measured on the taxi CSV: Transform 48.8 / 45.8 s against
# 61.9 / 56.0 s (0.80x). The model embeds the TF1 graph through TFTransformOutput's
# transform_features_layer, as it embeds a TF2 one.
FORCE_TF_COMPAT_V1 = True


def preprocessing_fn(inputs: Mapping[str, Any], custom_config: Dict[str, Any]) -> Dict[str, tf.Tensor]:
    """Entry point named in the Transform component (custom_config carries the spec)."""
    spec = FeatureSpec.from_custom_config(custom_config)
    outputs = {}
    weight = sample_weight(spec, inputs, _rows(spec, inputs)) if spec.served else None
    analysed = _Analysed(weight if spec.served and spec.served.use == "holdback_only" else None)
    for name, feature in spec.features.items():
        if name not in inputs:
            raise ValueError(f"{spec.source}: features.{name}: column '{name}' is not in the data schema")
        value, present = _dense_with_presence(inputs[name], feature)
        filled = _fill(feature, value, present, analysed)
        for output_name, transform in feature_outputs(feature):
            outputs[output_name] = _transform(feature, transform, filled, value, present, analysed)
        if feature.missing.indicator:
            outputs[transformed_name(name + MISSING_SUFFIX)] = 1.0 - tf.cast(present, tf.float32)
    for cross in spec.crosses.values():
        outputs[transformed_name(cross.name)] = _cross(cross, spec, outputs)
    outputs[label_key(spec)] = _label(spec, inputs, analysed)
    if weight is not None:
        outputs[SAMPLE_WEIGHT_KEY] = weight
    return outputs


def _rows(spec: FeatureSpec, inputs: Mapping[str, Any]) -> tf.Tensor:
    """The batch's number of rows, read from the label's first source column (present in every
    schema: the label is built from it)."""
    label = spec.label
    source = inputs[label.derive["column"] if label.derive else label.column]
    return tf.shape(source, out_type=tf.int32)[0]


class _Analysed:
    """The rows every tf.Transform analyzer of preprocessing_fn sees.

    Spec `served.use: holdback_only`: only the rows that weigh more than 0 in training (held back,
    or never served). The rows a model decided are dropped from the fit, and their values must not
    shape the features either (vocabularies, fills, z-scores, bucket boundaries), or the model's
    own answers would still reach the next model through its preprocessing. Otherwise (no `served`
    block, or inverse_propensity: see the README's "Training on served spans") every row.
    The transforms still apply to every row; only what the analyzers compute changes.
    """

    def __init__(self, weight: Optional[tf.Tensor]):
        self.rows = None if weight is None else weight > 0

    @property
    def every_row(self) -> bool:
        return self.rows is None

    def of(self, x: tf.Tensor, present: Optional[tf.Tensor] = None) -> tf.Tensor:
        """x's values at the analysed rows ([batch] tensors), where `present` too if given."""
        keep = present if self.every_row else (self.rows if present is None else tf.logical_and(self.rows, present))
        return x if keep is None else tf.boolean_mask(x, keep)


def _cross(cross: Cross, spec: FeatureSpec, outputs: Mapping[str, tf.Tensor]) -> tf.Tensor:
    """One id per combination of the features' ids ("3|17"), hashed: no vocabulary of pairs to learn,
    and a combination never seen in training still gets a bucket."""
    ids = [tf.strings.as_string(outputs[categorical_output(spec.features[f])]) for f in cross.features]
    return tft.hash_strings(tf.strings.join(ids, separator="|"), cross.hash_buckets)


def sample_weight(spec: FeatureSpec, inputs: Mapping[str, Any], rows: tf.Tensor) -> tf.Tensor:
    """Each row's training weight from its served policy and propensity (spec `served.use`).

    inverse_propensity: 1 / propensity, 1 where the row was never served (no propensity, or one
    that is not above 0). The proxy's propensity is its policy's (1 - share, share), not its
    answer's: the weighted rows count each policy's population once, a mean of the outcomes with
    and without the model, not an unbiased estimate (ops/feedback_loop.py measures it);
    holdback_only: 1 for held-back rows and rows never served, 0 for rows another policy (a model,
    a client's pinned version) decided: the feeder drops those. A column absent from the schema
    means no span in the data was served.
    """
    served = spec.served
    if served.use == "inverse_propensity":
        if served.propensity_column not in inputs:
            return tf.ones([rows], tf.float32)
        propensity, present = _dense_with_presence(
            inputs[served.propensity_column], Feature(served.propensity_column, "float", "passthrough",
                                                      MissingPolicy(1.0)))
        # No assertion here: the serving signatures embed this graph and feed an absent column as 0.
        # The proxy logs no propensity of 0 (a row it served had a chance above 0 of its answer).
        return tf.where(tf.logical_and(present, propensity > 0), 1.0 / tf.maximum(propensity, 1e-12), 1.0)
    if served.policy_column not in inputs:
        return tf.ones([rows], tf.float32)
    policy, present = _dense_with_presence(
        inputs[served.policy_column], Feature(served.policy_column, "string", "vocabulary", MissingPolicy("")))
    held_back = tf.equal(tf.strings.substr(policy, 0, len(HOLDBACK_POLICY_PREFIX)), HOLDBACK_POLICY_PREFIX)
    unbiased = tf.logical_or(tf.logical_or(tf.logical_not(present), tf.equal(policy, "")), held_back)
    return tf.cast(unbiased, tf.float32)


def no_row_held_back(spec: FeatureSpec, rows: int, where: str) -> str:
    """The error when holdback_only leaves nothing to train on: each of the `rows` rows `where`
    describes weighs 0 in sample_weight (a model decided it). Shared by the data gate and the Trainer."""
    served = spec.served
    return (f"{spec.source}: served.use: holdback_only trains only on rows held back from the model "
            f"(column '{served.policy_column}' starting '{HOLDBACK_POLICY_PREFIX}') or never served (empty), and "
            f"none of the {rows} rows {where} is one: 0 held back. Hold back a share of users in the proxy "
            "(PROXY_HOLDBACK_SHARE, e.g. 0.1) and export the spans again once their labels arrive (make export-span), "
            "or set served.use: inverse_propensity to train on every served row weighted by 1 / propensity "
            "(which keeps about half of the model's feedback bias: README, 'Training on served spans')")


def _dense_with_presence(x: Any, feature: Feature):
    """Turns a raw column into a dense [batch] tensor and a bool mask of present values."""
    dtype = {"int": tf.int64, "float": tf.float32, "string": tf.string}[feature.type]
    if isinstance(x, tf.SparseTensor):
        x = tf.SparseTensor(x.indices, x.values, tf.stack([x.dense_shape[0], 1]))
        placeholder = tf.constant("" if feature.type == "string" else 0, dtype=x.dtype)
        present = tf.sparse.to_dense(
            tf.SparseTensor(x.indices, tf.ones_like(x.values, tf.bool), x.dense_shape), False)[:, 0]
        value = tf.sparse.to_dense(x, placeholder)[:, 0]
    else:
        value = tf.reshape(x, [-1])
        present = tf.ones_like(value, tf.bool)
    if feature.type == "float":  # a NaN is a missing value too
        value = tf.cast(value, tf.float32)
        present = tf.logical_and(present, tf.logical_not(tf.math.is_nan(value)))
    return tf.cast(value, dtype), present


def _fill(feature: Feature, value: tf.Tensor, present: tf.Tensor, analysed: _Analysed) -> tf.Tensor:
    fill = feature.missing.fill
    if fill == "mean":
        value = tf.cast(value, tf.float32)
        # The mean of the values actually present, computed once over the training data.
        fill_value = tft.mean(analysed.of(value, present))
    else:
        fill_value = tf.constant(fill if feature.type != "int" else int(fill), dtype=value.dtype)
    return tf.where(present, value, tf.cast(fill_value, value.dtype))


def _transform(feature: Feature, t: str, filled: tf.Tensor, value: tf.Tensor, present: tf.Tensor,
               analysed: _Analysed) -> tf.Tensor:
    """One output of a feature from its filled values.

    A column filled with its mean is analysed from its present values only (`value` where
    `present`): an analyzer over `filled` would wait for tft.mean's result, and tf.Transform would
    make a second full pass over the data for it. One pass computes every statistic below.
    The analyzers see the `analysed` rows only; a column analysed whole keeps tft's own
    analyze-and-apply functions.
    """
    if t == "vocabulary":
        if analysed.every_row:
            return tft.compute_and_apply_vocabulary(
                filled, top_k=feature.top_k, num_oov_buckets=feature.oov_buckets,
                vocab_filename=vocabulary_name(feature.name))
        # What tft.compute_and_apply_vocabulary does, with the analyzer's rows chosen.
        vocabulary = tft.vocabulary(analysed.of(filled), top_k=feature.top_k,
                                    vocab_filename=vocabulary_name(feature.name))
        return tft.apply_vocabulary(filled, vocabulary, num_oov_buckets=feature.oov_buckets)
    if t == "hash":
        as_string = filled if feature.type == "string" else tf.strings.as_string(filled)
        return tft.hash_strings(as_string, feature.hash_buckets)
    numeric = tf.cast(filled, tf.float32)
    mean_filled = feature.missing.fill == "mean"
    whole = analysed.every_row and not mean_filled
    # The values the analyzers see; with a constant fill, every analysed row holds one.
    observed = analysed.of(tf.cast(value, tf.float32), present) if mean_filled else analysed.of(numeric)
    if t in ("zscore", "log"):
        scale = (lambda x: x) if t == "zscore" else (lambda x: tf.math.log1p(tf.maximum(x, 0.0)))
        if whole:
            return tft.scale_to_z_score(scale(numeric))
        if not mean_filled:  # every analysed row holds a value: no row of a fill apart
            return _z_score_of_mixture(scale(numeric), scale(observed), 0.0, observed)
        return _z_score_of_mixture(scale(numeric), scale(observed), scale(tft.mean(observed)), analysed.of(present))
    if t == "bucketize":
        if whole:
            return tft.bucketize(numeric, feature.buckets)
        # Boundaries from `observed`. With a mean fill, the present values only, so they no longer
        # count the fill values (a spike of identical values at the mean) as data: they move
        # slightly against quantiles of the filled column. A missing value still goes to the
        # bucket its fill (the mean) falls in.
        boundaries = tft.quantiles(observed, feature.buckets,
                                   epsilon=min(1.0 / feature.buckets, 0.01))  # tft.bucketize's default
        return tft.apply_buckets(numeric, boundaries)
    if t == "passthrough":
        return numeric
    raise ValueError(f"features.{feature.name}.transform: unknown transform '{t}'")


def _z_score_of_mixture(scaled: tf.Tensor, observed: tf.Tensor, fill: tf.Tensor, rows: tf.Tensor) -> tf.Tensor:
    """tft.scale_to_z_score(scaled) as its analyzers would compute it over the analysed rows (one
    element of `rows` each), of which those with a value hold `observed` and the others `fill`, from
    statistics of `observed` alone (one analysis pass instead of two).

    The filled column is a mixture of the present values (count n_p, mean m_p, variance v_p) and
    n - n_p copies of the fill f: its mean is (n_p m_p + (n - n_p) f) / n and its variance
    (n_p (v_p + (m_p - m)^2) + (n - n_p)(f - m)^2) / n. For a plain mean fill f = m_p, so the mean
    stays m_p and the variance is v_p n_p / n.
    """
    n_present = tf.cast(tft.size(observed), tf.float64)
    n_missing = tf.cast(tft.size(rows), tf.float64) - n_present
    n = n_present + n_missing
    m_p = tft.mean(observed, output_dtype=tf.float64)
    v_p = tft.var(observed, output_dtype=tf.float64)
    f = tf.cast(fill, tf.float64)
    mean = (n_present * m_p + n_missing * f) / n
    var = (n_present * (v_p + tf.square(m_p - mean)) + n_missing * tf.square(f - mean)) / n
    # As tft.scale_to_z_score: a constant column is only centred.
    mean, std = tf.cast(mean, tf.float32), tf.cast(tf.sqrt(var), tf.float32)
    centred = scaled - mean
    return tf.where(tf.not_equal(std, 0.0), centred / std, centred)


def _label(spec: FeatureSpec, inputs: Mapping[str, Any], analysed: _Analysed) -> tf.Tensor:
    label = spec.label
    columns = spec.columns

    def filled(name):
        value, present = _dense_with_presence(inputs[name], columns[name])
        return _fill(columns[name], value, present, analysed)

    if label.derive:
        left = tf.cast(filled(label.derive["column"]), tf.float32)
        right = tf.cast(filled(label.derive["other"]), tf.float32) * label.derive["scale"]
        op = {">": tf.greater, ">=": tf.greater_equal, "<": tf.less, "<=": tf.less_equal}[label.derive["op"]]
        return tf.cast(op(left, right), tf.int64)
    value = filled(label.column)
    if spec.task == "regression":
        return tf.cast(value, tf.float32)
    if spec.label_by_name:
        # Class ids follow the order in label.classes; a value outside them becomes -1 (the
        # schema's domain check stops such data before it gets here).
        as_string = value if value.dtype == tf.string else tf.strings.as_string(value)
        matches = tf.equal(as_string[:, None], tf.constant(label.classes)[None, :])
        return tf.where(tf.reduce_any(matches, axis=1), tf.argmax(tf.cast(matches, tf.int64), axis=1),
                        tf.constant(-1, tf.int64))
    return tf.cast(value, tf.int64)
