"""Training on served spans (spec `served`): propensities become sample weights in the fit, the
holdback-only mode drops the rows a model decided, and the Evaluator slices by policy.

The expected probabilities are the weighted label means, worked out here by hand: a model with
one constant input and a bias, trained to convergence, predicts exactly that mean.
"""

import dataclasses

import pytest

from components import feature_spec

# (policy, propensity, label): 4 held-back rows, 6 rows a model answered, 2 rows never served.
ROWS = ([("holdback:fallback", 0.1, 1)] * 3 + [("holdback:fallback", 0.1, 0)]
        + [("model", 0.9, 0)] * 6 + [(None, None, 0)] * 2)
UNWEIGHTED = 3 / 12
INVERSE_PROPENSITY = 3 * 10 / (4 * 10 + 6 / 0.9 + 2)  # 0.616
HOLDBACK_ONLY = 3 / 6  # held-back and never-served rows only


def _spec(use):
    return feature_spec.parse({
        "name": "tiny", "data": {"path": "unused"}, "task": "binary",
        "label": {"name": "big", "column": "y"}, "label_columns": {"y": {"type": "int"}},
        "features": {"x": {"type": "float", "transform": "passthrough"}},
        "training": {"deterministic": True, "seed": 3, "shuffle_buffer": 16,
                     "schedule": [{"learning_rate": 0.2, "batch_size": len(ROWS), "epochs": 60}]},
        "served": {"use": use}}, source="tiny.yaml")


def _sparse(values, dtype):
    import tensorflow as tf

    present = [i for i, v in enumerate(values) if v is not None]
    return tf.SparseTensor([[i, 0] for i in present], tf.constant([values[i] for i in present], dtype),
                           [len(values), 1])


def _weights(spec, rows=ROWS, columns=("policy", "propensity")):
    import tensorflow as tf

    from components.preprocessing import sample_weight

    inputs = {}
    if "policy" in columns:
        inputs["policy"] = _sparse([p for p, _, _ in rows], tf.string)
    if "propensity" in columns:
        inputs["propensity"] = _sparse([q for _, q, _ in rows], tf.float32)
    return sample_weight(spec, inputs, tf.constant(len(rows))).numpy().tolist()


def test_weights_from_policy_and_propensity():
    assert _weights(_spec("inverse_propensity")) == pytest.approx([10.0] * 4 + [1 / 0.9] * 6 + [1.0] * 2)
    assert _weights(_spec("holdback_only")) == [1.0] * 4 + [0.0] * 6 + [1.0] * 2
    # Spans that were never served lack the columns: every row weighs 1.
    assert _weights(_spec("inverse_propensity"), columns=()) == [1.0] * len(ROWS)
    assert _weights(_spec("holdback_only"), columns=()) == [1.0] * len(ROWS)


def test_an_absent_or_zero_propensity_weighs_one():
    # The serving signatures feed an absent propensity column as 0: it must not fail nor divide by 0.
    assert _weights(_spec("inverse_propensity"), rows=[("model", 0.0, 1), (None, None, 0), ("model", 0.5, 1)]) == [
        1.0, 1.0, 2.0]


def _transformed_files(tmp_path, weights):
    import tensorflow as tf

    from components.preprocessing import SAMPLE_WEIGHT_KEY

    path = str(tmp_path / "part-0.gz")
    with tf.io.TFRecordWriter(path, options="GZIP") as writer:
        for (_, _, label), weight in zip(ROWS, weights):
            writer.write(tf.train.Example(features=tf.train.Features(feature={
                "x_xf": tf.train.Feature(float_list=tf.train.FloatList(value=[1.0])),
                "big_xf": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
                SAMPLE_WEIGHT_KEY: tf.train.Feature(float_list=tf.train.FloatList(value=[weight])),
            })).SerializeToString())
    feature_spec_ = {"x_xf": tf.io.FixedLenFeature([], tf.float32), "big_xf": tf.io.FixedLenFeature([], tf.int64),
                     SAMPLE_WEIGHT_KEY: tf.io.FixedLenFeature([], tf.float32)}
    return path, feature_spec_


def _fit(spec, tmp_path, weighted=True):
    """The trainer's feed for `spec` over the rows' transformed examples, into a bias-only model."""
    import tensorflow as tf

    from components import trainer

    path, features = _transformed_files(tmp_path, _weights(spec))
    if not weighted:
        spec = dataclasses.replace(spec, served=None)
    trainer._skip_autograph_for_tf_keras()  # as train_and_export does: 15 s less on the first fit
    feed = trainer._Feed(spec, tf.distribute.get_strategy(), features, [path], [path])
    stage = spec.training.schedule[0]
    data, _ = feed.training(stage.batch_size)
    rows = sum(int(tf.size(batch[1])) for batch in data)
    tf.keras.utils.set_random_seed(spec.training.seed)
    x = tf.keras.Input(shape=(), name="x_xf")
    model = tf.keras.Model({"x_xf": x}, tf.keras.layers.Dense(1, activation="sigmoid")(
        tf.keras.layers.Reshape((1,))(x)))
    model.compile(optimizer=tf.keras.optimizers.Adam(stage.learning_rate), loss="binary_crossentropy")
    # One epoch of `epochs` steps: the same updates as `epochs` passes over the one batch, less overhead.
    model.fit(data.repeat(), steps_per_epoch=stage.epochs, epochs=1, verbose=0)
    return float(model({"x_xf": tf.constant([1.0])})[0, 0]), rows, data.element_spec


def test_inverse_propensity_weights_reach_the_fit(tmp_path):
    spec = _spec("inverse_propensity")
    weighted, rows, element = _fit(spec, tmp_path)
    unweighted, _, plain = _fit(spec, tmp_path, weighted=False)
    assert len(element) == 3 and len(plain) == 2  # (features, label, sample weight) vs (features, label)
    assert rows == len(ROWS)
    assert weighted == pytest.approx(INVERSE_PROPENSITY, abs=0.02)
    assert unweighted == pytest.approx(UNWEIGHTED, abs=0.02)


def test_holdback_only_drops_the_rows_a_model_decided(tmp_path):
    prediction, rows, element = _fit(_spec("holdback_only"), tmp_path)
    assert rows == 6 and len(element) == 2
    assert prediction == pytest.approx(HOLDBACK_ONLY, abs=0.02)


def test_the_evaluator_slices_by_policy_only_when_the_spec_declares_served(taxi_spec):

    from components.evaluation import eval_config

    served = dataclasses.replace(taxi_spec, served=feature_spec.Served("holdback_only", policy_column="who"))
    keys = [list(s.feature_keys) for s in eval_config(served).slicing_specs]
    assert ["who"] in keys
    assert keys == [list(s.feature_keys) for s in eval_config(taxi_spec).slicing_specs] + [["who"]]
