"""`make parity`: the same rows through every path a prediction can take, compared.

    (a) training path   Transform's materialized eval features fed to the model in process
    (b) serving_default raw features as named tensors (missing: "" / NaN)
    (c) serving_tf_example serialized tf.Examples
    (d) REST            the local TF-Serving-compatible server

Rows of (a) are matched to raw rows by the model's own transform_features output (an exact
match is itself a check that the embedded Transform graph reproduces what Transform wrote).
Then the Evaluator's overall metrics are recomputed from the REST predictions.
Writes build/parity.json. Goal: 0 rows differ by more than 1e-6.

    python -m ops.parity [--model taxi] [--version N] [--limit ROWS]
"""

import argparse
import glob
import json
import os
import sys
from typing import Dict, List

import numpy as np

TOLERANCE = 1e-6


def _records(pattern: str, limit: int) -> List[bytes]:
    import tensorflow as tf

    files = sorted(glob.glob(pattern))
    dataset = tf.data.TFRecordDataset(files, compression_type="GZIP")
    return [r.numpy() for r in (dataset.take(limit) if limit else dataset)]


def _score(outputs) -> np.ndarray:
    key = "probabilities" if "probabilities" in outputs else "value"
    return np.asarray(outputs[key], dtype=np.float64).reshape(len(outputs[key]), -1)


def _rest(model_repository: str, model: str, version: int, rows: List[Dict]) -> np.ndarray:
    import http.client

    from serving import model_config
    from serving.core import Servables
    from serving.json_tensor import dumps
    from serving.repository import Repository
    from serving.server import LocalServer

    config = model_config.single_model(model, os.path.join(model_repository, model), versions=[version])
    server = LocalServer(Servables(Repository(config=config, poll_seconds=3600)), rest_port=0).start()
    conn = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=60)
    scores = []
    try:
        for start in range(0, len(rows), 100):
            conn.request("POST", f"/v1/models/{model}/versions/{version}:predict",
                         body=dumps({"instances": rows[start:start + 100]}))
            response = json.loads(conn.getresponse().read())
            if "error" in response:
                raise RuntimeError(f"REST error: {response['error']}")
            predictions = response["predictions"]
            key = "probabilities" if "probabilities" in predictions[0] else "value"
            scores.extend(np.reshape(p[key], -1) for p in predictions)
    finally:
        server.stop()
    return np.asarray(scores, dtype=np.float64)


def _match_training_path(loaded, examples, materialized, label_key, feature_tolerance=1e-5):
    """Scores of (a) in the order of `examples`, matched through transformed features.

    Each raw row goes through the model's transform_features; the materialized row with the
    same transformed values is its training-path twin. Exact matches first; otherwise the
    nearest row within `feature_tolerance` (float32 ops can differ in the last bit between
    Beam's batches and a serving call). Returns (scores, labels, largest feature difference).
    """
    import tensorflow as tf

    fn = loaded.signatures["transform_features"]
    keys = sorted(_model_input_keys(loaded))
    served = {k: v.numpy() for k, v in fn(examples=tf.constant(examples)).items()}
    spec = {k: tf.io.FixedLenFeature([], v.dtype) for k, v in fn.structured_outputs.items()}
    written = {k: v.numpy() for k, v in tf.io.parse_example(tf.constant(materialized), spec).items()}
    served_matrix = np.stack([served[k].astype(np.float64) for k in keys], axis=1)
    written_matrix = np.stack([written[k].astype(np.float64) for k in keys], axis=1)
    model_inputs = {k: tf.constant(written[k]) for k in keys}
    scores_written = _score({k: v.numpy() for k, v in _model_outputs(loaded, model_inputs).items()})
    index: Dict[bytes, int] = {}
    for i, row in enumerate(written_matrix):
        index.setdefault(row.tobytes(), i)
    out = np.full((len(examples), scores_written.shape[1]), np.nan)
    labels = np.full(len(examples), np.nan)
    largest = 0.0
    for i, row in enumerate(served_matrix):
        j = index.get(row.tobytes())
        if j is None:
            distance = np.abs(written_matrix - row).max(axis=1)
            j = int(distance.argmin())
            if distance[j] > feature_tolerance:
                continue
            largest = max(largest, float(distance[j]))
        out[i], labels[i] = scores_written[j], written[label_key][j]
    return out, labels, largest


def _model_input_keys(loaded) -> set:
    """The transformed features the Keras model takes, from its own call signature."""
    return set(loaded.__call__.concrete_functions[0].structured_input_signature[0][0])


def _label_key(loaded) -> str:
    """The transformed label: the one Transform output that is neither an input of the Keras model
    (its own call signature says which) nor the training weight. A name rule (e.g. "not a raw
    feature plus a suffix") breaks on crosses, whose names no raw feature starts."""
    from components.preprocessing import SAMPLE_WEIGHT_KEY

    others = sorted(set(loaded.signatures["transform_features"].structured_outputs) - _model_input_keys(loaded)
                    - {SAMPLE_WEIGHT_KEY})
    if len(others) != 1:
        raise SystemExit(f"transform_features has {len(others)} outputs the model does not take ({others}); "
                         "expected exactly one, the label")
    return others[0]


def _model_outputs(loaded, transformed):
    """The Keras model alone, as training called it: transformed features in, predictions out."""
    import tensorflow as tf

    prediction = loaded(transformed)
    prediction = tf.reshape(prediction, [tf.shape(prediction)[0], -1])
    if prediction.shape[1] == 1 and "probabilities" in loaded.signatures["serving_default"].structured_outputs:
        prediction = tf.concat([1.0 - prediction, prediction], axis=1)  # binary: both columns, as served
        return {"probabilities": prediction}
    key = "probabilities" if "probabilities" in loaded.signatures["serving_default"].structured_outputs else "value"
    return {key: prediction}


def online_metrics(labels: np.ndarray, positive_scores: np.ndarray) -> Dict:
    """The metrics the REST answers reach on rows with a known label, for a binary model. AUC is
    ops.ab.statistics.auc (scikit-learn's): None where only one class is present, where it is not
    defined, so the JSON holds null there and never NaN."""
    from ops.ab.statistics import auc

    labels, positive_scores = np.asarray(labels), np.asarray(positive_scores)
    return {"auc": auc(labels == 1, positive_scores),
            "binary_accuracy": float(((positive_scores > 0.5) == (labels == 1)).mean()),
            "example_count": int(len(labels))}


def run(model: str = "taxi", version: int = None, limit: int = 0, model_repository: str = "build/model_repository",
        metadata: str = None, out_path: str = "build/parity.json") -> Dict:
    import tensorflow as tf

    from ops import release
    from pipelines.report import load_metrics

    metadata = metadata or f"build/metadata/{model}.sqlite"
    base = os.path.join(model_repository, model)
    if not version:
        from serving import model_config

        version = model_config.latest_complete(base)
        if version is None:
            raise SystemExit(f"{base}: no complete version (a numeric folder with saved_model.pb); "
                             f"run the pipeline first or pass --version")
    evidence = release.lineage(metadata, model, version)
    examples = _records(os.path.join(evidence["examples"], "Split-eval", "*"), limit)
    materialized_dir = os.path.join(os.path.dirname(os.path.dirname(evidence["transform_graph"])),
                                    "transformed_examples", os.path.basename(evidence["transform_graph"]))
    materialized = _records(os.path.join(materialized_dir, "Split-eval", "*"), 0)
    loaded = tf.saved_model.load(os.path.join(base, str(version)))
    _, inputs = loaded.signatures["serving_default"].structured_input_signature
    label_key = _label_key(loaded)
    from components.export import raw_inputs
    from serving.json_tensor import instances

    columns = raw_inputs(examples, inputs)
    paths = {
        "serving_default": _score({k: v.numpy() for k, v in loaded.signatures["serving_default"](**columns).items()}),
        "serving_tf_example": _score({k: v.numpy() for k, v in
                                      loaded.signatures["serving_tf_example"](examples=tf.constant(examples)).items()}),
        "rest": _rest(model_repository, model, version, instances({k: v.numpy() for k, v in columns.items()})).reshape(len(examples), -1),
    }
    training, labels, feature_diff = _match_training_path(loaded, examples, materialized, label_key)
    report = {"model": model, "version": version, "rows": len(examples), "tolerance": TOLERANCE,
              "training_path_unmatched_rows": int(np.isnan(training[:, 0]).sum()),
              "transformed_feature_max_abs_diff": feature_diff, "paths": {}}
    matched = ~np.isnan(training[:, 0])
    for name, scores in paths.items():
        diff = np.abs(scores[matched] - training[matched]).max(axis=1)
        report["paths"][name] = {"max_abs_diff": float(diff.max()) if diff.size else None,
                                 "rows_over_tolerance": int((diff > TOLERANCE).sum())}
    evaluation = load_metrics(evidence["evaluation"]).get("Overall", {})
    rest = paths["rest"]
    if rest.shape[1] == 2 and matched.any():
        online = online_metrics(labels[matched], rest[matched, 1])
        report["metrics"] = {"online_from_rest": online,
                             "offline_evaluator": {k: evaluation.get(k) for k in online}}
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=2)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="taxi")
    parser.add_argument("--version", type=int)
    parser.add_argument("--limit", type=int, default=0, help="compare only the first N eval rows (0: all)")
    args = parser.parse_args(argv)
    from pipelines import pages

    report = run(args.model, args.version, args.limit)
    print(f"rows compared: {report['rows']} (training path matched: "
          f"{report['rows'] - report['training_path_unmatched_rows']}; transformed features differ by at most "
          f"{report['transformed_feature_max_abs_diff']:.1e})")
    for name, r in report["paths"].items():
        print(f"  {name:>18} vs training path: max |diff| {r['max_abs_diff']:.2e}, "
              f"rows over {TOLERANCE:g}: {r['rows_over_tolerance']}")
    for name, metrics in report.get("metrics", {}).items():
        print(f"  {name}: " + ", ".join(f"{k}={pages.number(v, 6)}" for k, v in metrics.items()))
    bad = sum(r["rows_over_tolerance"] for r in report["paths"].values()) + report["training_path_unmatched_rows"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
