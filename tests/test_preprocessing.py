"""preprocessing_fn under tf.Transform's Beam implementation, checked against numpy.

The expected values are computed here from the raw numbers, not read back from the code.
"""

import math
import tempfile

import numpy as np
import pytest

from components import feature_spec

SPEC = {
    "name": "tiny", "data": {"path": "unused"}, "task": "binary",
    "label": {"name": "big", "derive": {"column": "t", "op": ">", "other": "y", "scale": 0.2}},
    "label_columns": {"t": {"type": "float", "missing": {"fill": 0.0}}},
    "features": {
        "x": {"type": "float", "transform": ["zscore", "bucketize"], "buckets": 2,
              "missing": {"fill": "mean", "indicator": True}},
        "y": {"type": "float", "transform": "log", "missing": {"fill": 0.0}},
        "n": {"type": "int", "transform": "bucketize", "buckets": 2, "missing": {"fill": 0}},
        "c": {"type": "string", "transform": "vocabulary", "top_k": 2, "oov_buckets": 1, "missing": {"fill": ""}},
        "h": {"type": "string", "transform": "hash", "hash_buckets": 8, "missing": {"fill": ""}},
        "p": {"type": "float", "transform": "passthrough", "missing": {"fill": -1.0}},
    },
    # x crosses through its bucket id: its first view (zscore) is a float
    "crosses": {"c_x_n": {"features": ["c", "n"], "hash_buckets": 16}, "x_x_c": {"features": ["x", "c"]}},
}
#        x      y     n   c     h      p     t
ROWS = [(1.0, 10.0, 1, "a", "u", 0.5, 3.0),
        (2.0, None, 2, "a", "v", None, 1.0),
        (None, 20.0, 3, "b", "u", 1.5, None),
        (5.0, 5.0, 4, "a", None, 2.5, 0.5),
        (4.0, 0.0, 10, "c", "w", 3.5, 0.1),
        (None, 30.0, 11, "b", "u", 4.5, 9.0),
        (3.0, 8.0, 12, None, "v", 5.5, 1.0),
        (6.0, 2.0, 13, "a", "w", 6.5, 0.0)]
COLUMNS = ["x", "y", "n", "c", "h", "p", "t"]


def _instances(rows):
    return [{k: ([] if v is None else [v]) for k, v in zip(COLUMNS, row)} for row in rows]


@pytest.fixture(scope="module")
def transformed():
    import tensorflow as tf
    import tensorflow_transform.beam as tft_beam
    from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

    from components.preprocessing import preprocessing_fn

    spec = feature_spec.parse(SPEC, source="tiny.yaml")
    dtypes = {"int": tf.int64, "float": tf.float32, "string": tf.string}
    raw = {n: tf.io.VarLenFeature(dtypes[f.type]) for n, f in spec.columns.items()}
    metadata = dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(raw))
    config = spec.to_custom_config()
    unseen = [(None, None, None, "zzz", "u", None, None)]  # every value missing or unseen
    with tft_beam.Context(temp_dir=tempfile.mkdtemp()):
        (out, _), transform_fn = (_instances(ROWS), metadata) | tft_beam.AnalyzeAndTransformDataset(
            lambda inputs: preprocessing_fn(inputs, config))
        new, _ = ((_instances(unseen), metadata), transform_fn) | tft_beam.TransformDataset()
    return out, new[0]


def _column(i):
    return [row[i] for row in ROWS]


def _zscore(values):
    a = np.asarray(values, dtype=np.float64)
    return (a - a.mean()) / a.std()


def test_zscore_fills_missing_with_the_mean_of_present_values(transformed):
    out, _ = transformed
    present = [v for v in _column(0) if v is not None]
    filled = [v if v is not None else sum(present) / len(present) for v in _column(0)]
    np.testing.assert_allclose([r["x_xf"] for r in out], _zscore(filled), rtol=1e-5, atol=1e-6)
    assert [r["x_missing_xf"] for r in out] == [0.0 if v is not None else 1.0 for v in _column(0)]


def test_a_second_transform_is_a_second_input_over_the_same_filled_values(transformed):
    out, new = transformed
    present = [v for v in _column(0) if v is not None]
    mean = sum(present) / len(present)
    filled = [v if v is not None else mean for v in _column(0)]
    buckets = [r["x_bucketize_xf"] for r in out]
    # Two buckets split at the median of the filled values: order is kept, both are used.
    assert set(buckets) == {0, 1}
    order = np.argsort(filled, kind="stable")
    assert [buckets[i] for i in order] == sorted(buckets)
    assert new["x_bucketize_xf"] == out[2]["x_bucketize_xf"]  # missing -> the mean's bucket


def test_log_is_zscore_of_log1p_with_constant_fill(transformed):
    out, _ = transformed
    logged = [math.log1p(v if v is not None else 0.0) for v in _column(1)]
    np.testing.assert_allclose([r["y_xf"] for r in out], _zscore(logged), rtol=1e-5, atol=1e-6)


def test_vocabulary_keeps_top_k_by_frequency_and_sends_the_rest_to_oov(transformed):
    out, new = transformed
    ids = {c: r["c_xf"] for c, r in zip(_column(3), out)}
    assert ids["a"] == 0 and ids["b"] == 1  # "a" x4, "b" x2: the two kept
    assert ids["c"] == 2 and ids[None] == 2  # rare value and the missing fill share the OOV bucket
    assert new["c_xf"] == 2  # a value never seen in training


def test_bucketize_splits_at_the_quantile(transformed):
    out, _ = transformed
    buckets = [r["n_xf"] for r in out]
    assert buckets == sorted(buckets) and set(buckets) == {0, 1}  # n is increasing


def test_hash_is_stable_and_in_range(transformed):
    import tensorflow as tf

    out, new = transformed
    hashed = [r["h_xf"] for r in out]
    strings = [v if v is not None else "" for v in _column(4)]
    expected = tf.strings.to_hash_bucket_fast(strings, 8).numpy().tolist()
    assert hashed == expected and all(0 <= h < 8 for h in hashed)
    assert new["h_xf"] == hashed[0]  # "u" again


def test_a_cross_hashes_the_ids_its_features_are_given(transformed):
    import tensorflow as tf

    out, new = transformed
    for rows in (out, [new]):
        pairs = [f"{r['c_xf']}|{r['n_xf']}" for r in rows]
        assert [r["c_x_n_xf"] for r in rows] == tf.strings.to_hash_bucket_fast(pairs, 16).numpy().tolist()
        pairs = [f"{r['x_bucketize_xf']}|{r['c_xf']}" for r in rows]
        assert [r["x_x_c_xf"] for r in rows] == tf.strings.to_hash_bucket_fast(pairs, 1000).numpy().tolist()
    assert len({r["c_x_n_xf"] for r in out}) > 4  # pairs are told apart, not folded into few buckets


def test_passthrough_and_label(transformed):
    out, new = transformed
    assert [r["p_xf"] for r in out] == pytest.approx([v if v is not None else -1.0 for v in _column(5)])
    expected_label = [int((t or 0.0) > 0.2 * (y or 0.0)) for y, t in zip(_column(1), _column(6))]
    assert [r["big_xf"] for r in out] == expected_label
    # A row missing everything is filled by the same policy at transform time.
    assert new["x_missing_xf"] == 1.0 and new["p_xf"] == -1.0


# A mean-filled column analysed from its present values (one tf.Transform phase, not two).
MEAN_SPEC = {
    "name": "mean", "data": {"path": "unused"}, "task": "binary",
    "label": {"name": "big", "derive": {"column": "t", "op": ">", "other": "z", "scale": 1.0}},
    "label_columns": {"t": {"type": "float", "missing": {"fill": 0.0}}},
    "features": {
        "z": {"type": "float", "transform": ["zscore", "log"], "missing": {"fill": "mean"}},
        "b": {"type": "float", "transform": "bucketize", "buckets": 2, "missing": {"fill": "mean"}},
    },
}
_RNG = np.random.default_rng(3)
_Z = [None if m else float(v) for v, m in zip(_RNG.lognormal(2.0, 1.0, 60), _RNG.random(60) < 0.3)]
# b: 1..20 and one 1000 present, 19 missing: the mean (57.6) is far above the present median (11).
_B = [float(v) for v in range(1, 21)] + [1000.0] + [None] * 19
_B += [None] * (60 - len(_B))
_T = [float(v) for v in _RNG.normal(5.0, 2.0, 60)]


def _mean_instances(rows):
    return [{k: ([] if v is None else [v]) for k, v in zip(("z", "b", "t"), row)} for row in rows]


def _raw_feature_spec(spec):
    import tensorflow as tf

    from tests.conftest import raw_types

    dtypes = {"int": tf.int64, "float": tf.float32, "string": tf.string}
    return {n: tf.io.VarLenFeature(dtypes[t]) for n, t in raw_types(spec).items()}


def _raw_metadata(spec):
    from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

    return dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(_raw_feature_spec(spec)))


@pytest.fixture(scope="module")
def mean_filled():
    import tensorflow_transform.beam as tft_beam

    from components.preprocessing import preprocessing_fn

    spec = feature_spec.parse(MEAN_SPEC, source="mean.yaml")
    config = spec.to_custom_config()
    with tft_beam.Context(temp_dir=tempfile.mkdtemp()):
        (out, _), _ = (_mean_instances(zip(_Z, _B, _T)), _raw_metadata(spec)) | tft_beam.AnalyzeAndTransformDataset(
            lambda inputs: preprocessing_fn(inputs, config))
    return out


def test_zscore_and_log_after_a_mean_fill_equal_the_scores_of_the_filled_column(mean_filled):
    present = np.array([v for v in _Z if v is not None], dtype=np.float32)
    filled = np.array([v if v is not None else present.mean() for v in _Z], dtype=np.float32)
    assert 10 < sum(v is None for v in _Z) < 30
    np.testing.assert_allclose([r["z_xf"] for r in mean_filled], _zscore(filled), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose([r["z_log_xf"] for r in mean_filled], _zscore(np.log1p(filled)),
                               rtol=1e-5, atol=1e-5)


def test_bucketize_after_a_mean_fill_splits_the_present_values_and_gives_missing_the_means_bucket(mean_filled):
    buckets = {}
    for v, r in zip(_B, mean_filled):
        buckets.setdefault(v, set()).add(r["b_xf"])
    # The present median (about 11) splits, not the filled column's (the mean, 57.6, 19 times).
    assert all(buckets[float(v)] == {0} for v in range(1, 11))
    assert all(buckets[float(v)] == {1} for v in range(12, 21)) and buckets[1000.0] == {1}
    assert buckets[None] == {1}  # the mean's bucket


def _analysis_phases(spec):
    """The number of full passes tf.Transform's analysis makes for the spec's preprocessing_fn,
    read from the phases it lays out in the Beam pipeline (built, not run)."""
    import apache_beam as beam
    import tensorflow_transform.beam as tft_beam

    from components.preprocessing import preprocessing_fn

    config = spec.to_custom_config()
    pipeline = beam.Pipeline()
    with tft_beam.Context(temp_dir=tempfile.mkdtemp()):
        _ = (pipeline | beam.Create([]), _raw_metadata(spec)) | tft_beam.AnalyzeDataset(
            lambda inputs: preprocessing_fn(inputs, config))
    labels = set()

    class Labels(beam.pipeline.PipelineVisitor):
        def enter_composite_transform(self, node):
            labels.add(node.full_label.rsplit("/", 1)[-1])

        def visit_transform(self, node):
            labels.add(node.full_label.rsplit("/", 1)[-1])

    pipeline.visit(Labels())
    return len({label for label in labels if label.startswith("ApplySavedModel[Phase")})


def test_taxi_and_mean_fills_are_analysed_in_one_pass(taxi_spec):
    assert _analysis_phases(feature_spec.parse(MEAN_SPEC, source="mean.yaml")) == 1
    assert _analysis_phases(taxi_spec) == 1


def _served(use):
    return feature_spec.parse({**SPEC, "served": {"use": use}}, source="tiny.yaml")


def _analyzer_columns(spec):
    """The raw columns tf.Transform's analyzers read for the spec's preprocessing_fn (traced, not run)."""
    import tensorflow_transform as tft

    from components.preprocessing import preprocessing_fn

    import tensorflow as tf

    config = spec.to_custom_config()
    # What Transform hands preprocessing_fn for a VarLenFeature: [batch, values] sparse tensors.
    specs = {n: tf.SparseTensorSpec([None, None], f.dtype) for n, f in _raw_feature_spec(spec).items()}
    return set(tft.get_analyze_input_columns(lambda inputs: preprocessing_fn(inputs, config), specs))


def test_only_holdback_only_makes_the_analyzers_read_the_served_columns():
    # x: mean, z-score, quantiles; y: z-score of log1p; n: quantiles; c: vocabulary. h is hashed,
    # p passed through and t filled with a constant: no analyzer reads them.
    analysed = {"x", "y", "n", "c"}
    assert _analyzer_columns(feature_spec.parse(SPEC, source="tiny.yaml")) == analysed
    # inverse_propensity: the analyzers see every row unweighted, as without `served`: the graph
    # taxi and every spec without `served` get is the one tf.Transform's own functions build.
    assert _analyzer_columns(_served("inverse_propensity")) == analysed
    # holdback_only: each analyzer sees the rows no model decided, told apart by their policy.
    assert _analyzer_columns(_served("holdback_only")) == analysed | {"policy"}


def test_holdback_only_is_analysed_in_one_pass_too():
    assert _analysis_phases(_served("holdback_only")) == 1
