"""The exported SavedModel's three signatures, on taxi rows full of gaps."""

import math

import numpy as np
import pytest


def _raw_inputs(rows, spec):
    """JSON-style columns, as a REST client sends them: "" / NaN for a missing value."""
    import tensorflow as tf

    inputs = {}
    for name, f in spec.features.items():
        if f.type == "string":
            inputs[name] = tf.constant([r[name] for r in rows], tf.string)
        else:
            dtype = tf.float32 if f.type == "float" else tf.float64
            inputs[name] = tf.constant([float(r[name]) if r[name] != "" else math.nan for r in rows], dtype)
    return inputs


def _examples(rows, spec, columns):
    """Serialized tf.Examples as CsvExampleGen writes them: an empty cell is an empty list."""
    import tensorflow as tf

    out = []
    for r in rows:
        feature = {}
        for name in columns:
            f, v = spec.columns[name], r[name]
            if f.type == "string":
                feature[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode()] if v else []))
            elif f.type == "float":
                feature[name] = tf.train.Feature(float_list=tf.train.FloatList(value=[float(v)] if v else []))
            else:
                feature[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v)] if v else []))
        out.append(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    return tf.constant(out)


@pytest.fixture(scope="module")
def loaded(small_model):
    import tensorflow as tf

    return tf.saved_model.load(small_model[0])


@pytest.fixture(scope="module")
def eval_rows(taxi_rows):
    return taxi_rows[1500:]


def test_every_signature_is_exported_with_tf_servings_method_names(loaded, small_model):
    from tensorflow.core.protobuf import saved_model_pb2

    assert set(loaded.signatures) == {"serving_default", "serving_tf_example", "transform_features", "classification"}
    with open(f"{small_model[0]}/saved_model.pb", "rb") as f:
        (graph,) = saved_model_pb2.SavedModel.FromString(f.read()).meta_graphs
    # classifier.cc (PreProcessClassification): one DT_STRING input named "inputs"; outputs
    # "classes" (DT_STRING) and/or "scores" (DT_FLOAT); the method name TF Serving checks.
    classification = graph.signature_def["classification"]
    assert classification.method_name == "tensorflow/serving/classify"
    assert list(classification.inputs) == ["inputs"] and classification.inputs["inputs"].dtype == 7
    assert {k: v.dtype for k, v in classification.outputs.items()} == {"classes": 7, "scores": 1}
    assert graph.signature_def["serving_default"].method_name == "tensorflow/serving/predict"


def _pruned_transforms_reached(graph, signature_name):
    """The pruned Transform-graph functions (tf.Transform's TF1 graph applied in TF2:
    tensorflow_transform/saved/saved_transform_io_v2.py _apply_v1_transform_model_in_v2, which
    prunes it at each call) that a signature's function calls, directly or through others."""
    library = {f.signature.name: f for f in graph.graph_def.library.function}
    output = next(iter(graph.signature_def[signature_name].outputs.values())).name.split(":")[0]
    start = next(n.attr["f"].func.name for n in graph.graph_def.node if n.name == output)
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name in seen or name not in library:
            continue
        seen.add(name)
        todo += [n.attr["f"].func.name for n in library[name].node_def if "f" in n.attr] + \
            [n.op for n in library[name].node_def if n.op in library]
    return {name for name in seen if name.startswith("__inference_pruned_")}


def test_the_serving_signatures_share_one_copy_of_the_transform_graph(small_model):
    """Each copy of the pruned Transform graph is ~800 nodes that every load (server, sandbox,
    Evaluator) deserializes and every export traces; serving_default, serving_tf_example and
    classification reach the same one (components/export.py signatures)."""
    from tensorflow.core.protobuf import saved_model_pb2

    with open(f"{small_model[0]}/saved_model.pb", "rb") as f:
        (graph,) = saved_model_pb2.SavedModel.FromString(f.read()).meta_graphs
    reached = {name: _pruned_transforms_reached(graph, name)
               for name in ("serving_default", "serving_tf_example", "classification")}
    assert all(len(pruned) == 1 for pruned in reached.values()), reached
    assert len(set.union(*reached.values())) == 1, reached


def test_a_required_feature_is_refused_by_the_model_itself(loaded, taxi_spec, eval_rows):
    import tensorflow as tf

    inputs = _raw_inputs(eval_rows[:3], taxi_spec)
    inputs["payment_type"] = tf.constant(["Cash", "", "Cash"])
    with pytest.raises(tf.errors.InvalidArgumentError, match="payment_type is required"):
        loaded.signatures["serving_default"](**inputs)
    examples = _examples(eval_rows[:2], taxi_spec, [c for c in taxi_spec.features if c != "payment_type"])
    with pytest.raises(tf.errors.InvalidArgumentError, match="payment_type is required"):
        loaded.signatures["classification"](inputs=examples)


def test_serving_default_takes_named_raw_features_without_the_label(loaded, taxi_spec):
    _, kwargs = loaded.signatures["serving_default"].structured_input_signature
    assert set(kwargs) == set(taxi_spec.features)
    assert "tips" not in kwargs and taxi_spec.label.name not in kwargs


def test_raw_and_tf_example_calls_agree_on_rows_with_missing_values(loaded, taxi_spec, eval_rows):
    assert any(r["company"] == "" for r in eval_rows) and any(r["pickup_census_tract"] == "" for r in eval_rows)
    raw = loaded.signatures["serving_default"](**_raw_inputs(eval_rows, taxi_spec))
    # No tips column: the label and its source are not needed at serving.
    by_example = loaded.signatures["serving_tf_example"](examples=_examples(eval_rows, taxi_spec, taxi_spec.features))
    np.testing.assert_allclose(raw["probabilities"].numpy(), by_example["probabilities"].numpy(), atol=1e-6)
    assert raw["classes"].numpy().tolist() == by_example["classes"].numpy().tolist()
    assert set(raw["classes"].numpy().tolist()) <= {b"no", b"yes"}
    np.testing.assert_allclose(raw["probabilities"].numpy().sum(axis=1), 1.0, atol=1e-6)


def test_absent_value_is_treated_like_a_missing_training_value(loaded, taxi_spec, eval_rows):
    """Blank every optional feature: serving's ""/NaN must equal training's empty cell."""
    import tensorflow as tf

    blank = [{k: ("" if k in taxi_spec.features and not taxi_spec.features[k].required else v)
              for k, v in r.items()} for r in eval_rows[:50]]
    raw = loaded.signatures["serving_default"](**_raw_inputs(blank, taxi_spec))
    by_example = loaded.signatures["serving_tf_example"](examples=_examples(blank, taxi_spec, taxi_spec.features))
    np.testing.assert_allclose(raw["probabilities"].numpy(), by_example["probabilities"].numpy(), atol=1e-6)
    # The Evaluator's path: transform_features (label sources included) then the model.
    transformed = loaded.signatures["transform_features"](examples=_examples(blank, taxi_spec, taxi_spec.columns))
    model_inputs = {k: v for k, v in transformed.items() if k != "big_tipper_xf"}
    assert "company_missing_xf" in model_inputs and float(tf.reduce_min(model_inputs["company_missing_xf"])) == 1.0
    # Blanking changes predictions (the features matter) but never breaks them.
    full = loaded.signatures["serving_default"](**_raw_inputs(eval_rows[:50], taxi_spec))
    assert not np.allclose(full["probabilities"].numpy(), raw["probabilities"].numpy())
    assert np.isfinite(raw["probabilities"].numpy()).all()


def test_transform_features_derives_the_label_as_training_did(loaded, taxi_spec, eval_rows):
    transformed = loaded.signatures["transform_features"](examples=_examples(eval_rows, taxi_spec, taxi_spec.columns))
    expected = [int((float(r["tips"] or 0)) > 0.2 * float(r["fare"] or 0)) for r in eval_rows]
    assert transformed["big_tipper_xf"].numpy().tolist() == expected


def test_small_model_learns(small_model):
    _, metrics = small_model
    assert metrics["auc"] > 0.85  # the majority class alone gives AUC 0.5


def test_the_serving_spec_carries_each_vocabulary_features_training_values(small_model, taxi_spec, taxi_rows):
    import json
    import os

    with open(os.path.join(small_model[0], "assets.extra", "serving_spec.json")) as f:
        vocabularies = json.load(f)["vocabularies"]
    assert set(vocabularies) == {n for n, f in taxi_spec.features.items() if "vocabulary" in f.transforms}
    trained_on = taxi_rows[:1500]  # conftest's small_transform analyses these
    assert set(vocabularies["payment_type"]) - {""} == {r["payment_type"] for r in trained_on} - {""}
    assert set(vocabularies["trip_start_hour"]) == {r["trip_start_hour"] for r in trained_on}  # ints as digits


def test_crosses_are_computed_by_the_serving_graph_as_the_transform_computed_them(
        loaded, taxi_spec, eval_rows, small_transform):
    import tensorflow as tf
    import tensorflow_transform as tft

    from components.preprocessing import categorical_output, transformed_name

    graph_dir, _, eval_files = small_transform
    assert taxi_spec.crosses, "configs/taxi.yaml declares crosses"
    keys = sorted({transformed_name(c) for c in taxi_spec.crosses}
                  | {categorical_output(taxi_spec.features[f]) for c in taxi_spec.crosses.values() for f in c.features})
    # The Transform component's Beam output for the eval rows, and the model's own graph on the same rows.
    feature_spec = tft.TFTransformOutput(graph_dir).transformed_feature_spec()
    records = tf.data.TFRecordDataset(tf.io.gfile.glob(eval_files), compression_type="GZIP")
    parsed = tf.io.parse_example(tf.stack(list(records)), {k: feature_spec[k] for k in keys})
    served = loaded.signatures["transform_features"](examples=_examples(eval_rows, taxi_spec, taxi_spec.columns))
    beam_rows = sorted(zip(*(parsed[k].numpy().reshape(-1).tolist() for k in keys)))
    served_rows = sorted(zip(*(served[k].numpy().reshape(-1).tolist() for k in keys)))
    assert len(beam_rows) == len(eval_rows) and beam_rows == served_rows
    first_cross = keys.index(transformed_name(next(iter(taxi_spec.crosses))))
    assert len({row[first_cross] for row in served_rows}) > 10  # the cross tells rows apart


def test_every_transformed_feature_is_served_as_the_transform_wrote_it(loaded, taxi_spec, eval_rows, small_transform):
    """The TF1 transform graph (preprocessing.FORCE_TF_COMPAT_V1), run by tf.Transform's Beam
    implementation and embedded in the model (TFTransformOutput.transform_features_layer), gives every
    output alike. Ids, buckets, indicators and the label are equal; z-scores may differ by two float32
    steps (found alike with tf.function graphs): the graph Beam runs and the one the model serves
    are optimized apart. Beam writes the rows in no set order, so each column is compared
    sorted: a z-score is monotone in its input, so sorting keeps each value beside its counterpart."""
    import tensorflow as tf
    import tensorflow_transform as tft

    graph_dir, _, eval_files = small_transform
    feature_spec = tft.TFTransformOutput(graph_dir).transformed_feature_spec()
    records = tf.data.TFRecordDataset(tf.io.gfile.glob(eval_files), compression_type="GZIP")
    written = tf.io.parse_example(tf.stack(list(records)), feature_spec)
    served = loaded.signatures["transform_features"](examples=_examples(eval_rows, taxi_spec, taxi_spec.columns))
    assert set(served) == set(feature_spec)
    floats = 0
    for name in feature_spec:
        beam, model = (np.sort(np.asarray(t[name]).reshape(-1)) for t in (written, served))
        assert beam.shape == (len(eval_rows),) and model.shape == beam.shape, name
        if beam.dtype == np.float32 and not np.array_equal(beam, np.round(beam)):
            floats += 1
            step = np.spacing(np.abs(beam).max())  # a float32 step at the column's largest value
            np.testing.assert_allclose(model, beam, rtol=0, atol=2 * step, err_msg=name)
        else:
            assert np.array_equal(beam, model.astype(beam.dtype)), name
    assert floats >= 4  # the z-scores of fare, trip_miles, trip_seconds and trip_start_timestamp


def test_parity_tells_the_label_from_the_crosses_by_the_models_own_inputs(loaded, taxi_spec):
    # ops/parity.py once took "an _xf output that no raw feature name starts" as the label: a cross
    # (payment_x_miles_xf) matches that too, and parity then fed the model without it.
    from components.preprocessing import label_key, transformed_name
    from ops import parity

    assert taxi_spec.crosses
    assert parity._label_key(loaded) == label_key(taxi_spec)
    assert {transformed_name(c) for c in taxi_spec.crosses} <= parity._model_input_keys(loaded)


def test_a_missing_latitude_is_served_as_the_bucket_of_the_training_mean(loaded, taxi_spec, taxi_rows, eval_rows):
    """Bucket boundaries come from present values only; a missing value gets the mean's bucket."""
    train_latitudes = [float(r["pickup_latitude"]) for r in taxi_rows[:1500] if r["pickup_latitude"] != ""]
    assert len(train_latitudes) < 1500  # the training rows had gaps to fill
    row = next(r for r in eval_rows if r["pickup_latitude"] != "")
    missing, at_mean = dict(row, pickup_latitude=""), dict(row, pickup_latitude=repr(float(np.mean(train_latitudes))))
    out = loaded.signatures["transform_features"](examples=_examples([missing, at_mean], taxi_spec, taxi_spec.columns))
    assert out["pickup_latitude_missing_xf"].numpy().tolist() == [1.0, 0.0]
    buckets = out["pickup_latitude_xf"].numpy().tolist()
    assert buckets[0] == buckets[1] and 0 < buckets[0] < 19  # the mean sits inside, not at an edge


# --- the regression signature, on a really exported regression model -----------------------

@pytest.fixture(scope="module")
def regression_model(tmp_path_factory):
    """(model_dir, spec, rows): train_and_export on configs/synthetic_regression.yaml, small and fast."""
    from components import feature_spec
    from components.trainer import train_and_export
    from tests import datasets
    from tests.conftest import REPO, analyze_and_transform, fast_spec, read_rows

    spec = feature_spec.load(f"{REPO}/configs/synthetic_regression.yaml")
    out = tmp_path_factory.mktemp("regression")
    rows = read_rows(datasets.write_regression_csv(str(out / "data.csv"), rows=400, seed=3))
    graph_dir, train, evaluation = analyze_and_transform(spec, rows[:300], rows[300:], str(out / "transform"))
    model_dir = str(out / "model")
    train_and_export(fast_spec(spec, schedule=(feature_spec.Stage(0.01, 64, 1),)), graph_dir, [train], [evaluation],
                     model_dir)
    return model_dir, spec, rows[300:310]


def test_the_regression_signature_has_tf_servings_regress_method_and_tensors(regression_model):
    from tensorflow.core.protobuf import saved_model_pb2

    model_dir, _, _ = regression_model
    with open(f"{model_dir}/saved_model.pb", "rb") as f:
        (graph,) = saved_model_pb2.SavedModel.FromString(f.read()).meta_graphs
    assert "regression" in graph.signature_def and "classification" not in graph.signature_def
    # regressor.cc:158-161 and :174-177 check the method name; :180-183 one input and one output;
    # :186-205 the input named "inputs" (kRegressInputs), the output "outputs" (kRegressOutputs);
    # :249-252 the output DT_FLOAT. The input is serialized tf.Examples: DT_STRING (7); DT_FLOAT is 1.
    regression = graph.signature_def["regression"]
    assert regression.method_name == "tensorflow/serving/regress"
    assert {k: v.dtype for k, v in regression.inputs.items()} == {"inputs": 7}
    assert {k: v.dtype for k, v in regression.outputs.items()} == {"outputs": 1}


def test_regress_over_rest_and_grpc_answers_as_serving_default(regression_model, tmp_path):
    """:regress on the local server (REST and gRPC) gives, row for row, serving_default's `value`
    for the same rows: J:1103-1127 writes {"results": [value, ...]}, regressor.cc:240-262 reads
    the one DT_FLOAT output."""
    import json
    import shutil
    import urllib.request

    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc, regression_pb2

    from tests.conftest import serve

    model_dir, spec, rows = regression_model
    shutil.copytree(model_dir, tmp_path / "parcels" / "1")
    server = serve(tmp_path, grpc=True)
    try:
        def post(verb, body):
            request = urllib.request.Request(f"{server.url}/v1/models/parcels:{verb}", data=json.dumps(body).encode(),
                                             method="POST")
            with urllib.request.urlopen(request, timeout=30) as r:
                return json.loads(r.read())

        number = {n for n, f in spec.features.items() if f.type != "string"}
        examples = [{n: (float(r[n]) if spec.features[n].type == "float" else int(r[n])) if n in number else r[n]
                     for n in spec.features if r[n] != ""} for r in rows]
        instances = [{n: (float(r[n]) if r[n] != "" else math.nan) if n in number else r[n] for n in spec.features}
                     for r in rows]
        assert any(len(e) < len(spec.features) for e in examples)  # gaps: absent in a tf.Example, NaN / "" in a row
        regressed = post("regress", {"signature_name": "regression", "examples": examples})["results"]
        predicted = post("predict", {"instances": instances})["predictions"]  # one output: bare values (J:1035-1040)
        assert len(regressed) == len(rows) and len(set(regressed)) > 1
        np.testing.assert_allclose(regressed, predicted, atol=1e-5)

        stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}"))
        req = regression_pb2.RegressionRequest()
        req.model_spec.name, req.model_spec.signature_name = "parcels", "regression"
        for e in examples:
            feature = req.input.example_list.examples.add().features.feature
            for name, value in e.items():
                if isinstance(value, str):
                    feature[name].bytes_list.value.append(value.encode())
                elif isinstance(value, int):
                    feature[name].int64_list.value.append(value)
                else:
                    feature[name].float_list.value.append(value)
        by_grpc = [r.value for r in stub.Regress(req, timeout=30).result.regressions]
        assert [np.float32(v) for v in regressed] == [np.float32(v) for v in by_grpc]
        inputs = server.servables.repository.resolve("parcels").signatures["serving_default"].structured_input_signature[1]
        preq = predict_pb2.PredictRequest()
        preq.model_spec.name = "parcels"
        for name, tensor_spec in inputs.items():
            preq.inputs[name].CopyFrom(tf.make_tensor_proto([i[name] for i in instances], dtype=tensor_spec.dtype))
        value = tf.make_ndarray(stub.Predict(preq, timeout=30).outputs["value"])
        np.testing.assert_allclose(by_grpc, value, atol=1e-5)
    finally:
        server.stop()
