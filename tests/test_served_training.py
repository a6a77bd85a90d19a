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


def test_a_repeated_holdback_only_feed_is_refused_when_no_row_weighs_more_than_0(tmp_path):
    # Before, the filter of empty batches waited forever on the endless stream (parameter_server's feed).
    from components import feeder
    from components.preprocessing import SAMPLE_WEIGHT_KEY

    def feed(folder, weights, batch_size):
        folder.mkdir()
        path, features = _transformed_files(folder, weights)
        return feeder.make_dataset([path], features, "big_xf", batch_size, shuffle=True, seed=3, deterministic=True,
                                   repeat=True, weight_key=SAMPLE_WEIGHT_KEY, drop_unweighted=True)

    with pytest.raises(ValueError, match=r"no row of the 12 in \[.*part-0.gz'\] weighs more than 0 \(__sample_weight_xf\)"):
        feed(tmp_path / "none", [0.0] * len(ROWS), 4)
    # With rows held back it flows on: a batch of one epoch's 12 rows keeps the 6 that weigh 1 (labels 1 1 1 0 0 0).
    data = feed(tmp_path / "some", _weights(_spec("holdback_only")), len(ROWS))
    assert [sorted(label.numpy().tolist()) for _, label in data.take(3)] == [[0, 0, 0, 1, 1, 1]] * 3


def test_the_evaluator_slices_by_policy_only_when_the_spec_declares_served(taxi_spec):

    from components.evaluation import eval_config

    served = dataclasses.replace(taxi_spec, served=feature_spec.Served("holdback_only", policy_column="who"))
    keys = [list(s.feature_keys) for s in eval_config(served).slicing_specs]
    assert ["who"] in keys
    assert keys == [list(s.feature_keys) for s in eval_config(taxi_spec).slicing_specs] + [["who"]]



# --- what tf.Transform's analyzers see --------------------------------------------------------
# A tiny span where the rows a model decided look nothing like the others: with holdback_only
# every analyzer must describe the 15 held-back or never-served rows alone.
ANALYSED_SPEC = {
    "name": "analysed", "data": {"path": "unused"}, "task": "binary",
    "label": {"name": "big", "column": "y"}, "label_columns": {"y": {"type": "int"}},
    "features": {
        "c": {"type": "string", "transform": "vocabulary", "top_k": 2, "missing": {"fill": ""}},
        "x": {"type": "float", "transform": "zscore", "missing": {"fill": "mean"}},
        "b": {"type": "float", "transform": "bucketize", "buckets": 2, "missing": {"fill": 0.0}},
        "i": {"type": "int", "transform": "passthrough", "missing": {"fill": -1}},  # the row's number
    },
    "served": {"use": "holdback_only"},
}
_KEPT_C = ["a"] * 6 + ["b"] * 5 + ["z"] * 4
_KEPT_X = [0.5, None, 1.0, 1.5, None, 2.0, 0.8, 1.2, 1.1, None, 0.9, 1.4, 0.7, 1.3, 0.6]
_KEPT_B = [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 10.0, 10.5, 11.0, 11.5, 12.0, 12.5, 13.0]  # median 5
_KEPT_POLICY = [("holdback:fallback", "0.1")] * 9 + [("", "")] * 6  # held back, never served
# 20 rows a model decided: their own token, values far above the others'.
_DECIDED = [("m", None if i % 7 == 0 else 100.0 + i, 50.0 + i, ("model", "0.9")) for i in range(20)]


def _analysed_spec():
    return feature_spec.parse(ANALYSED_SPEC, source="analysed.yaml")


def _analysed_rows():
    rows = list(zip(_KEPT_C, _KEPT_X, _KEPT_B, _KEPT_POLICY)) + _DECIDED
    return [{"c": c, "x": "" if x is None else str(x), "b": str(b), "i": str(i), "y": str(i % 2),
             "policy": policy, "propensity": propensity}
            for i, (c, x, b, (policy, propensity)) in enumerate(rows)]


@pytest.fixture(scope="module")
def served_transform(tmp_path_factory):
    """(the span's CSV, its rows as read back, the Transform graph's folder, (train, eval) files, the
    transformed rows in the span's order) of one tf.Transform run over the span."""
    import tensorflow as tf
    import tensorflow_transform as tft

    from tests.conftest import analyze_and_transform, read_rows, write_sample

    spec = _analysed_spec()
    folder = tmp_path_factory.mktemp("served_transform")
    path = write_sample(_analysed_rows(), str(folder / "span"))
    rows = read_rows(path)
    graph_dir, train, evaluation = analyze_and_transform(spec, rows, rows[:4], str(folder))
    parsing = tft.TFTransformOutput(graph_dir).transformed_feature_spec()
    data = tf.data.TFRecordDataset(tf.io.gfile.glob(train), compression_type="GZIP")
    transformed = [{k: v.numpy().item() for k, v in tf.io.parse_single_example(e, parsing).items()} for e in data]
    return path, rows, graph_dir, (train, evaluation), sorted(transformed, key=lambda r: r["i_xf"])


def _frame(path):
    """The span's CSV as pandas reads it, and which rows weigh more than 0 (held back or never served)."""
    import pandas as pd

    frame = pd.read_csv(path)
    return frame, frame.policy.isna() | frame.policy.str.startswith("holdback:", na=False)


def test_holdback_only_vocabulary_is_counted_on_the_rows_no_model_decided(served_transform):
    import tensorflow_transform as tft

    path, _, graph_dir, _, transformed = served_transform
    frame, kept = _frame(path)
    vocabulary = [v.decode() for v in tft.TFTransformOutput(graph_dir).vocabulary_by_name("vocab_c")]
    assert vocabulary == frame.c[kept].value_counts().index[:2].tolist() == ["a", "b"]
    assert frame.c.value_counts().index[:2].tolist() == ["m", "a"]  # what every row would have made
    assert [r["c_xf"] for r in transformed] == [{"a": 0, "b": 1}.get(c, 2) for c in frame.c]  # "m": out of vocabulary


def test_holdback_only_mean_fill_and_z_score_are_those_of_the_rows_no_model_decided(served_transform):
    import numpy as np

    path, _, _, _, transformed = served_transform
    frame, kept = _frame(path)
    assert [r["i_xf"] for r in transformed] == list(range(len(frame)))

    def z_scores(analysed):  # tft.scale_to_z_score of the mean-filled column, as numpy reads it
        filled = frame.x.fillna(frame.x[analysed].mean())
        return ((filled - filled[analysed].mean()) / filled[analysed].std(ddof=0)).to_numpy()

    np.testing.assert_allclose([r["x_xf"] for r in transformed], z_scores(kept), rtol=1e-5, atol=1e-5)
    every_row = z_scores(np.ones(len(frame), bool))
    assert np.abs(every_row - z_scores(kept)).max() > 1.0  # the model's rows would have moved them


def test_holdback_only_bucket_boundaries_are_quantiles_of_the_rows_no_model_decided(served_transform):
    import numpy as np

    path, _, _, _, transformed = served_transform
    frame, kept = _frame(path)
    median = float(np.median(frame.b[kept]))  # 15 values: the middle one, 5.0
    assert [r["b_xf"] for r in transformed] == [int(b >= median) for b in frame.b]
    every_row = float(np.median(frame.b))  # 52.0, among the model's rows
    assert sum(int(b >= every_row) != r["b_xf"] for b, r in zip(frame.b, transformed)) >= 8


@pytest.fixture(scope="module")
def served_model(served_transform, tmp_path_factory):
    """The SavedModel train_and_export writes from the span's Transform run, loaded."""
    import tensorflow as tf

    from components.trainer import train_and_export
    from tests.conftest import fast_spec

    _, _, graph_dir, (train, evaluation), _ = served_transform
    spec = _analysed_spec()
    model_dir = str(tmp_path_factory.mktemp("served_model") / "model")
    train_and_export(fast_spec(spec, schedule=(feature_spec.Stage(0.05, 8, 2),)), graph_dir, [train], [evaluation],
                     model_dir)
    return tf.saved_model.load(model_dir)


def test_holdback_only_with_no_row_held_back_stops_the_trainer_before_it_builds_a_model(served_transform, tmp_path):
    """Every row of the span answered by a model: Transform's own output with each row's weight set to 0."""
    import tensorflow as tf

    from components.feeder import weighted_rows
    from components.preprocessing import SAMPLE_WEIGHT_KEY
    from components.trainer import train_and_export

    path, _, graph_dir, (train, evaluation), _ = served_transform
    frame, kept = _frame(path)
    assert weighted_rows([train], SAMPLE_WEIGHT_KEY) == (len(frame), int(kept.sum()))  # 35 rows, 15 kept
    none_kept = str(tmp_path / "none-kept.gz")
    with tf.io.TFRecordWriter(none_kept, options="GZIP") as writer:
        for record in tf.data.TFRecordDataset(tf.io.gfile.glob(train), compression_type="GZIP"):
            example = tf.train.Example.FromString(record.numpy())
            example.features.feature[SAMPLE_WEIGHT_KEY].float_list.value[:] = [0.0]
            writer.write(example.SerializeToString())
    model_dir = tmp_path / "model"
    with pytest.raises(ValueError) as raised:
        train_and_export(_analysed_spec(), graph_dir, [none_kept], [evaluation], str(model_dir))
    message = str(raised.value)
    assert message.startswith("analysed.yaml: served.use: holdback_only trains only on rows held back from the model "
                              "(column 'policy' starting 'holdback:') or never served"), message
    for part in (f"none of the {len(frame)} rows of the training split (['{none_kept}']) is one: 0 held back",
                 "PROXY_HOLDBACK_SHARE", "make export-span", "served.use: inverse_propensity"):
        assert part in message, part
    assert not model_dir.exists()  # nothing trained, nothing exported


def _example(row, served=None):
    import tensorflow as tf

    feature = {"c": tf.train.Feature(bytes_list=tf.train.BytesList(value=[row["c"].encode()])),
               "b": tf.train.Feature(float_list=tf.train.FloatList(value=[float(row["b"])])),
               "i": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(row["i"])]))}
    if row["x"]:
        feature["x"] = tf.train.Feature(float_list=tf.train.FloatList(value=[float(row["x"])]))
    if served is not None:
        policy, propensity = served
        feature["policy"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[policy.encode()]))
        feature["propensity"] = tf.train.Feature(float_list=tf.train.FloatList(value=[propensity]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def test_the_serving_signatures_take_no_policy_nor_propensity(served_model):
    for name in ("serving_default", "classification"):
        _, inputs = served_model.signatures[name].structured_input_signature
        assert "policy" not in inputs and "propensity" not in inputs
    _, inputs = served_model.signatures["serving_default"].structured_input_signature
    assert sorted(inputs) == sorted(ANALYSED_SPEC["features"])


def test_a_rows_answer_does_not_depend_on_the_policy_or_propensity_it_carries(served_model, served_transform):
    import numpy as np
    import tensorflow as tf

    _, rows, _, _, _ = served_transform
    classify = served_model.signatures["classification"]
    scores = [classify(inputs=tf.constant([_example(r, served) for r in rows]))["scores"].numpy()
              for served in (None, ("model", 0.9), ("holdback:fallback", 0.1), ("", 0.0))]
    for other in scores[1:]:
        np.testing.assert_array_equal(other, scores[0])
    raw = served_model.signatures["serving_default"](
        c=tf.constant([r["c"] for r in rows]), b=tf.constant([float(r["b"]) for r in rows]),
        i=tf.constant([float(r["i"]) for r in rows], tf.float64),
        x=tf.constant([float(r["x"]) if r["x"] else float("nan") for r in rows]))
    np.testing.assert_allclose(raw["probabilities"].numpy(), scores[0], rtol=1e-6)
    assert len({round(float(p), 6) for p in scores[0][:, 1]}) > 3  # the rows' answers differ: the inputs count


def test_the_tuner_feeds_served_rows_as_the_trainer_does(served_transform, tmp_path):
    """holdback_only: the search trains on the rows that weigh more than 0 only, and scores each
    trial on weighted validation rows, as the Trainer's feed does (components/trainer.py served_weights)."""
    from tfx.components.trainer.fn_args_utils import FnArgs

    from components import tuning
    from components.preprocessing import SAMPLE_WEIGHT_KEY

    path, _, graph_dir, (train, evaluation), _ = served_transform
    frame, kept = _frame(path)
    spec = feature_spec.parse({**ANALYSED_SPEC, "tuning": {"search_space": {"embedding_dim": [2, 4]}, "trials": 1,
                                                           "epochs": 1}}, source="analysed.yaml")
    result = tuning.tuner_fn(FnArgs(train_files=[train], eval_files=[evaluation], transform_graph_path=graph_dir,
                                    working_dir=str(tmp_path / "work"), custom_config=spec.to_custom_config()))
    batches = list(result.fit_kwargs["x"])
    assert all(len(b) == 2 and SAMPLE_WEIGHT_KEY not in b[0] for b in batches)  # (features, label), weight-0 rows gone
    assert sum(int(label.shape[0]) for _, label in batches) == int(kept.sum()) == 15
    validation = list(result.fit_kwargs["validation_data"])
    assert all(len(b) == 3 for b in validation)  # (features, label, weight): every row, weighted
