"""Trainer behaviour on the small transform: staged schedule, determinism.

Strategies (mirrored, multi-worker, parameter server) are tested in test_distributed.py.
"""

import logging

from components import feature_spec
from tests.conftest import fast_spec


def test_deterministic_runs_give_identical_metrics_and_predictions(taxi_spec, small_transform, tmp_path):
    import numpy as np
    import tensorflow as tf

    from components.trainer import train_and_export

    graph_dir, train_files, eval_files = small_transform
    spec = fast_spec(taxi_spec, deterministic=True, seed=11,
                     schedule=(feature_spec.Stage(0.003, 64, 1), feature_spec.Stage(0.001, 256, 1)))
    runs = [train_and_export(spec, graph_dir, [train_files], [eval_files], str(tmp_path / f"m{i}"))
            for i in range(2)]
    assert runs[0] == runs[1]
    # Every feature but the required payment_type missing: exercises the fill path too.
    only_payment = tf.train.Example(features=tf.train.Features(feature={
        "payment_type": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"Cash"]))})).SerializeToString()
    examples = tf.constant([only_payment] * 3)
    preds = [tf.saved_model.load(str(tmp_path / f"m{i}")).signatures["serving_tf_example"](examples=examples)
             for i in range(2)]
    np.testing.assert_array_equal(preds[0]["probabilities"].numpy(), preds[1]["probabilities"].numpy())


def test_each_stage_sets_its_learning_rate_and_batch_size(taxi_spec, small_transform, tmp_path, caplog, monkeypatch):
    from components import feeder, trainer

    graph_dir, train_files, eval_files = small_transform
    batch_sizes, rates = [], []
    real_make_dataset = feeder.make_dataset

    def spy(files, spec, label, batch_size, **kw):
        batch_sizes.append((batch_size, kw["shuffle"]))
        return real_make_dataset(files, spec, label, batch_size, **kw)

    monkeypatch.setattr(feeder, "make_dataset", spy)
    real_fit = None
    import tensorflow as tf

    real_fit = tf.keras.Model.fit

    def fit(self, *args, **kwargs):
        rates.append(round(float(self.optimizer.learning_rate.numpy()), 6))
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(tf.keras.Model, "fit", fit)
    spec = fast_spec(taxi_spec, schedule=(feature_spec.Stage(0.01, 32, 1), feature_spec.Stage(0.002, 512, 2)))
    with caplog.at_level(logging.INFO):
        trainer.train_and_export(spec, graph_dir, [train_files], [eval_files], str(tmp_path / "m"))
    assert [b for b, shuffled in batch_sizes if shuffled] == [32, 512]
    assert rates == [0.01, 0.002]
    epochs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [e.split(":")[0] for e in epochs] == ["epoch 1", "epoch 2", "epoch 3"]  # weights carried on

