"""Serving signatures: the Transform graph rides inside the SavedModel.

serving_default     raw features as named tensors (one value per row) -> predictions
serving_tf_example  serialized tf.Example                               -> predictions (Evaluator)
classification      `inputs`: serialized tf.Example -> `classes`, `scores`  (TF Serving :classify)
regression          `inputs`: serialized tf.Example -> `outputs`            (TF Serving :regress)
transform_features  serialized tf.Example (label included)              -> transformed features (Evaluator)

`classification` / `regression` carry TF Serving's classify / regress method names, which
tf.saved_model.save cannot set: `set_method_names` writes them into saved_model.pb after the
save (TF Serving's classifier.cc and regressor.cc refuse any other method name).

A required feature (spec `required: true`) is enforced by the model itself: a row without a
value fails the call with INVALID_ARGUMENT, so TF Serving and the local server refuse it alike.

A missing value at serving is "" for strings and NaN for numbers (int columns are
taken as float64 so they can carry NaN; every int below 2**53 is exact). Such values
are dropped from the sparse input, exactly as an empty CSV cell is absent from the
training tf.Example, and the Transform graph then fills them by the same policy.
"""

import math
import os
from typing import Any, Dict, List

import tensorflow as tf

from components.feature_spec import FeatureSpec
from serving import model_config
from serving.wire import CLASSIFY_METHOD, REGRESS_METHOD

SERVING_DTYPES = {"string": tf.string, "float": tf.float32, "int": tf.float64}


SERVING_SPEC_FILE = model_config.SERVING_SPEC_FILE  # the repository layout's owner names it
# The signatures TF Serving's Classify and Regress APIs run (method names: serving/wire.py).
CLASSIFY_SIGNATURE, REGRESS_SIGNATURE = "classification", "regression"


def serving_spec(spec: FeatureSpec, tf_transform_output=None) -> Dict:
    """What a server needs to know beyond the signatures, written beside the SavedModel.

    The serving side reads this file instead of importing training code: which inputs must
    be present (the rest may be left out and are filled like missing training values), the
    class names in the order of the model's probability columns, and (given the Transform's
    output) each vocabulary feature's training vocabulary, by which the proxy counts served
    values the model never saw (serving/proxy.py PROXY_MODEL_REPOSITORY).
    """
    written = {
        "task": spec.task,
        "classes": list(spec.label.classes),
        "features": {name: {"type": f.type, "required": f.required} for name, f in spec.features.items()},
    }
    if tf_transform_output is not None:
        from components.preprocessing import vocabulary_name

        written["vocabularies"] = {
            name: [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                   for v in tf_transform_output.vocabulary_by_name(vocabulary_name(name))]
            for name, f in spec.features.items() if "vocabulary" in f.transforms}
    return written


def serving_input_specs(spec: FeatureSpec) -> Dict[str, tf.TensorSpec]:
    return {name: tf.TensorSpec([None], SERVING_DTYPES[f.type], name=name)
            for name, f in spec.features.items()}


def _to_sparse(value: tf.Tensor, column_type: str) -> tf.SparseTensor:
    present = tf.not_equal(value, "") if column_type == "string" else tf.logical_not(tf.math.is_nan(value))
    rows = tf.where(present)
    values = tf.boolean_mask(value, present)
    if column_type == "int":
        values = tf.cast(values, tf.int64)
    indices = tf.concat([rows, tf.zeros_like(rows)], axis=1)
    return tf.SparseTensor(indices, values, tf.stack([tf.shape(value, out_type=tf.int64)[0], 1]))


def _present(name: str, value) -> tf.Tensor:
    """Per row: does it carry a value for the feature? (value: a dense raw tensor or a sparse one)."""
    if isinstance(value, tf.SparseTensor):
        rows = tf.shape(value, out_type=tf.int64)[0]
        counts = tf.math.bincount(value.indices[:, 0], minlength=rows, maxlength=rows, dtype=tf.int64)
        return counts > 0
    return tf.not_equal(value, "") if value.dtype == tf.string else tf.logical_not(tf.math.is_nan(value))


def _require(spec: FeatureSpec, features: Dict[str, Any]) -> List[tf.Operation]:
    """Assertions that every row has a value for each required feature (INVALID_ARGUMENT if not)."""
    checks = []
    for name, f in spec.features.items():
        if f.required:
            checks.append(tf.debugging.Assert(
                tf.reduce_all(_present(name, features[name])),
                [f"feature {name} is required (spec: required: true) but a row has no value for it "
                 f"(an empty string, NaN or absent): send a value for {name} in every row"], name=f"require_{name}"))
    return checks


def _outputs(spec: FeatureSpec, prediction: tf.Tensor) -> Dict[str, tf.Tensor]:
    if spec.task == "regression":
        return {"value": tf.reshape(prediction, [-1])}
    if spec.task == "binary":
        positive = tf.reshape(prediction, [-1])
        probabilities = tf.stack([1.0 - positive, positive], axis=1)
    else:
        probabilities = prediction
    class_ids = tf.argmax(probabilities, axis=1)
    outputs = {
        "probabilities": probabilities,
        "class_ids": class_ids,
        "classes": tf.gather(tf.constant(spec.label.classes), class_ids),
    }
    if spec.task == "binary":
        outputs["score"] = positive  # probability of classes[1]; what the Evaluator reads
    return outputs


# The signatures hold no Python control flow on tensors, so AutoGraph has nothing to convert; left
# on, it transpiles them and every function they reach (tf.Transform's, Keras') at each trace.
# Measured on the taxi model: the export (model.save with these signatures) took 0.70x the time
# with both rules, in the same process, interleaved; every signature's answers bit-identical.
_AUTOGRAPH = False


def signatures(model: tf.keras.Model, spec: FeatureSpec, tf_transform_output) -> Dict[str, tf.types.experimental.ConcreteFunction]:
    model.tft_layer = tf_transform_output.transform_features_layer()  # tracked, so it is saved
    model_inputs = list(model.input.keys()) if isinstance(model.input, dict) else model.input_names
    raw_spec = tf_transform_output.raw_feature_spec()
    serving_raw_spec = {k: v for k, v in raw_spec.items() if k in spec.features}

    # One traced transform for every serving signature: called straight from each, the TF1
    # Transform graph is pruned and copied into the SavedModel once per signature
    # (tensorflow_transform/saved/saved_transform_io_v2.py _apply_v1_transform_model_in_v2 prunes
    # on every call). Every serving signature feeds it the same sparse raw features (schemas keep
    # no fixed shapes). The transform_features signature takes the label too: its own copy.
    transform = tf.function(model.tft_layer, autograph=_AUTOGRAPH, input_signature=[
        {name: tf.SparseTensorSpec([None, None], raw_spec[name].dtype) for name in spec.features}])

    def predict(raw_features, checked):
        with tf.control_dependencies(_require(spec, checked)):
            transformed = transform(raw_features)
        return _outputs(spec, model({k: transformed[k] for k in model_inputs}))

    def predict_examples(examples):
        parsed = tf.io.parse_example(examples, serving_raw_spec)
        return predict(parsed, parsed)

    @tf.function(autograph=_AUTOGRAPH)
    def serve_raw(**features):
        return predict({name: _to_sparse(features[name], spec.features[name].type) for name in spec.features},
                       features)

    @tf.function(autograph=_AUTOGRAPH, input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def serve_tf_example(examples):
        return predict_examples(examples)

    @tf.function(autograph=_AUTOGRAPH, input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def classify(inputs):
        probabilities = predict_examples(inputs)["probabilities"]
        names = tf.broadcast_to(tf.constant(spec.label.classes), tf.shape(probabilities))
        return {"classes": names, "scores": probabilities}

    @tf.function(autograph=_AUTOGRAPH, input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def regress(inputs):
        return {"outputs": predict_examples(inputs)["value"]}

    @tf.function(autograph=_AUTOGRAPH, input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def transform_features(examples):
        return model.tft_layer(tf.io.parse_example(examples, raw_spec))

    return {
        "serving_default": serve_raw.get_concrete_function(**serving_input_specs(spec)),
        "serving_tf_example": serve_tf_example.get_concrete_function(),
        "transform_features": transform_features.get_concrete_function(),
        **({REGRESS_SIGNATURE: regress.get_concrete_function()} if spec.task == "regression"
           else {CLASSIFY_SIGNATURE: classify.get_concrete_function()}),
    }


def set_method_names(saved_model_dir: str) -> None:
    """Gives `classification` / `regression` TF Serving's classify / regress method names.

    tf.saved_model.save writes every signature as a predict signature; the method name is only
    read by servers (tf.saved_model.load ignores it), so it is set in saved_model.pb after the save.
    """
    from tensorflow.core.protobuf import saved_model_pb2

    path = os.path.join(saved_model_dir, "saved_model.pb")
    saved_model = saved_model_pb2.SavedModel.FromString(tf.io.gfile.GFile(path, "rb").read())
    for meta_graph in saved_model.meta_graphs:
        for name, method in ((CLASSIFY_SIGNATURE, CLASSIFY_METHOD), (REGRESS_SIGNATURE, REGRESS_METHOD)):
            if name in meta_graph.signature_def:
                meta_graph.signature_def[name].method_name = method
    with tf.io.gfile.GFile(path + ".tmp", "wb") as f:
        f.write(saved_model.SerializeToString())
    tf.io.gfile.rename(path + ".tmp", path, overwrite=True)


def raw_inputs(examples: List[bytes], input_specs: Dict[str, tf.TensorSpec]) -> Dict[str, tf.Tensor]:
    """serving_default's inputs for serialized raw tf.Examples; an absent value becomes "" or NaN."""
    parsed = [tf.train.Example.FromString(e).features.feature for e in examples]
    columns = {}
    for name, spec in input_specs.items():
        values = []
        for feature in parsed:
            kind = feature[name].WhichOneof("kind") if name in feature else None
            value = list(getattr(feature[name], kind).value) if kind else []
            if spec.dtype == tf.string:
                values.append(value[0] if value else b"")
            else:
                values.append(float(value[0]) if value else math.nan)
        columns[name] = tf.constant(values, spec.dtype)
    return columns
