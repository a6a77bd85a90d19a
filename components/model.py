"""The Keras model: embeddings for categorical ids, dense inputs for numbers, an MLP head, and
with training.wide a linear part over the ids and crosses (wide-and-deep) added to its logits.

Built from the spec and the Transform output only; knows nothing of raw columns.
"""

from typing import Dict, Mapping

import tensorflow as tf

from components.feature_spec import FeatureSpec
from components.preprocessing import MISSING_SUFFIX, feature_outputs, transformed_name, vocabulary_name


def input_cardinalities(spec: FeatureSpec, tf_transform_output) -> Dict[str, int]:
    """Number of distinct ids per categorical transformed feature (0 for numeric ones)."""
    sizes = {}
    for name, f in spec.features.items():
        for output_name, transform in feature_outputs(f):
            if transform == "vocabulary":
                size = tf_transform_output.vocabulary_size_by_name(vocabulary_name(name)) + f.oov_buckets
            elif transform == "bucketize":
                size = f.buckets
            elif transform == "hash":
                size = f.hash_buckets
            else:
                size = 0
            sizes[output_name] = size
        if f.missing.indicator:
            sizes[transformed_name(name + MISSING_SUFFIX)] = 0
    for cross in spec.crosses.values():
        sizes[transformed_name(cross.name)] = cross.hash_buckets
    return sizes


def build(spec: FeatureSpec, cardinalities: Mapping[str, int]) -> tf.keras.Model:
    """Returns a compiled model; call it inside strategy.scope()."""
    train = spec.training
    inputs, parts, numeric, ids = {}, [], [], {}
    for name, size in sorted(cardinalities.items()):
        if size:
            inputs[name] = ids[name] = tf.keras.Input(shape=(), name=name, dtype=tf.int64)
            dim = min(train.embedding_dim, size)
            parts.append(tf.keras.layers.Embedding(size, dim, name=f"embed_{name}")(inputs[name]))
        else:
            inputs[name] = tf.keras.Input(shape=(), name=name, dtype=tf.float32)
            numeric.append(tf.keras.layers.Reshape((1,))(inputs[name]))
    if numeric:
        parts.append(tf.keras.layers.Concatenate(name="numeric")(numeric) if len(numeric) > 1 else numeric[0])
    x = tf.keras.layers.Concatenate(name="all_features")(parts) if len(parts) > 1 else parts[0]
    for i, units in enumerate(train.hidden_units):
        x = tf.keras.layers.Dense(units, activation="relu", name=f"hidden_{i}")(x)
    width = spec.num_classes if spec.task == "multiclass" else 1
    logits = tf.keras.layers.Dense(width, name="deep_logits")(x)
    if train.wide and ids:
        logits = tf.keras.layers.Add(name="wide_and_deep")([logits, _wide(ids, cardinalities, width)])
    first_rate = train.schedule[0].learning_rate
    optimizer = tf.keras.optimizers.Adam(learning_rate=first_rate)
    if spec.task == "binary":
        out = tf.keras.layers.Activation("sigmoid", name="probability")(logits)
        loss = tf.keras.losses.BinaryCrossentropy()
        metrics = [tf.keras.metrics.BinaryAccuracy(name="accuracy"), tf.keras.metrics.AUC(name="auc")]
    elif spec.task == "multiclass":
        out = tf.keras.layers.Activation("softmax", name="probabilities")(logits)
        loss = tf.keras.losses.SparseCategoricalCrossentropy()
        metrics = [tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
    else:
        out = tf.keras.layers.Activation("linear", name="value")(logits)
        loss = tf.keras.losses.MeanSquaredError()
        metrics = [tf.keras.metrics.MeanAbsoluteError(name="mae"),
                   tf.keras.metrics.RootMeanSquaredError(name="rmse")]
    model = tf.keras.Model(inputs=inputs, outputs=out)
    model.compile(optimizer=optimizer, loss=loss, metrics=metrics)
    return model


def _wide(ids: Mapping[str, tf.Tensor], cardinalities: Mapping[str, int], width: int) -> tf.Tensor:
    """A linear model over one-hot ids: one learned weight per id (an embedding of width 1 per
    output), summed over the inputs; crosses give it the interactions the deep part must learn."""
    weights = [tf.keras.layers.Embedding(cardinalities[name], width, embeddings_initializer="zeros",
                                         name=f"wide_{name}")(ids[name]) for name in sorted(ids)]
    return tf.keras.layers.Add(name="wide_logits")(weights) if len(weights) > 1 else weights[0]
