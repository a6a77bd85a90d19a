"""The model's wide part: a linear term per id of each categorical input and cross, added to the deep logit."""

import dataclasses

import numpy as np


def _inputs(ids):
    import tensorflow as tf

    return {"c_xf": tf.constant(ids, tf.int64), "pc_xf": tf.constant([i % 3 for i in ids], tf.int64),
            "x_xf": tf.constant([0.5] * len(ids), tf.float32)}


def _logit(p):
    return np.log(p / (1 - p))


def test_the_wide_part_adds_one_weight_per_id_to_the_logit(taxi_spec):
    from components import model as model_lib

    cardinalities = {"c_xf": 4, "pc_xf": 3, "x_xf": 0}
    spec = dataclasses.replace(taxi_spec, training=dataclasses.replace(taxi_spec.training, wide=True))
    model = model_lib.build(spec, cardinalities)
    ids = [0, 1, 2, 3]
    before = _logit(model(_inputs(ids)).numpy().reshape(-1).astype(np.float64))
    weights = model.get_layer("wide_c_xf")
    weights.set_weights([np.array([[0.0], [0.75], [0.0], [-1.5]], np.float32)])
    after = _logit(model(_inputs(ids)).numpy().reshape(-1).astype(np.float64))
    np.testing.assert_allclose(after - before, [0.0, 0.75, 0.0, -1.5], atol=1e-4)
