"""TFX Trainer entry point: feeds, trains in stages under a tf.distribute strategy, exports.

`run_fn` is what the pipeline's Trainer calls; `python -m components.trainer` runs the same
`train_and_export` on an existing Transform output (a Kubeflow TFJob replica, deploy/tfjob.yaml).
In a distributed run every process calls it; components/strategy.py decides each one's part.
"""

import argparse
import json
import logging
import math
import os
from typing import Any, Dict, List, Mapping, Optional

import tensorflow as tf
import tensorflow_transform as tft

from components import export, feeder, model as model_lib
from components import strategy as strategy_lib
from components import tuning
from components.feature_spec import FeatureSpec, load as load_spec, parse as parse_spec
from components.preprocessing import SAMPLE_WEIGHT_KEY, label_key, no_row_held_back

METRICS_FILE = "training_metrics.json"


def _skip_autograph_for_tf_keras() -> None:
    """Treat tf_keras like keras: AutoGraph leaves library code alone.

    TensorFlow's AutoGraph allowlist names `keras` but not `tf_keras` (the package behind
    TF_USE_LEGACY_KERAS=1), so the first fit() in every process re-parses Keras' own
    training code: 14-16 s measured here, against 2.5 s with this rule. The rule is the one
    TensorFlow already applies to `keras`. There is no public API for it, hence the guard.
    """
    try:
        from tensorflow.python.autograph.core import config, config_lib
    except ImportError:
        return
    if not any(getattr(rule, "_prefix", None) == "tf_keras" for rule in config.CONVERSION_RULES):
        config.CONVERSION_RULES = (config_lib.DoNotConvert("tf_keras"),) + tuple(config.CONVERSION_RULES)


def run_fn(fn_args) -> None:
    """Called by the TFX Trainer (GenericExecutor) with FnArgs, in every replica of a distributed run."""
    spec = FeatureSpec.from_custom_config(fn_args.custom_config)
    if fn_args.hyperparameters:  # the Tuner's best values (its artifact in ML Metadata) replace the spec's
        values = tuning.hyperparameter_values(fn_args.hyperparameters)
        logging.info("hyperparameters from the Tuner: %s", json.dumps(values, sort_keys=True))
        spec = tuning.with_hyperparameters(spec, values)
    metrics = train_and_export(
        spec,
        transform_output_dir=fn_args.transform_output,
        train_files=fn_args.train_files,
        eval_files=fn_args.eval_files,
        serving_model_dir=fn_args.serving_model_dir,
    )
    if strategy_lib.cluster_role().is_chief:
        _write_metrics(os.path.join(fn_args.model_run_dir, METRICS_FILE), metrics)


def train_and_export(spec: FeatureSpec, transform_output_dir: str, train_files, eval_files,
                     serving_model_dir: str) -> Dict[str, float]:
    """Trains through every stage of the schedule and saves the model; returns eval metrics.

    Every process of a distributed run calls this. Parameter-server cluster servers (worker
    and ps tasks) never return from it: they serve the coordinator until the platform stops them.
    """
    train = spec.training
    strategy_lib.serve_if_cluster_server(train.strategy)
    if train.deterministic and train.strategy["type"] == "parameter_server":
        raise ValueError("training.deterministic: cannot be true with training.strategy.type parameter_server: "
                         "its workers update the variables asynchronously")
    _skip_autograph_for_tf_keras()
    if train.deterministic:
        tf.keras.utils.set_random_seed(train.seed)
        tf.config.experimental.enable_op_determinism()
    strategy = strategy_lib.make_strategy(train.strategy)
    logging.info("training with %s", strategy_lib.describe(strategy))
    tf_transform_output = tft.TFTransformOutput(transform_output_dir)
    feed = _Feed(spec, strategy, tf_transform_output.transformed_feature_spec(), train_files, eval_files)
    with strategy.scope():
        model = model_lib.build(spec, model_lib.input_cardinalities(spec, tf_transform_output))
        if feed.asynchronous:
            _exact_distributed_evaluation(model, eval_files)
    epochs_done = 0
    for i, stage in enumerate(train.schedule):
        # Each stage: a feeder at its own batch size, a new learning rate, the same weights.
        model.optimizer.learning_rate.assign(stage.learning_rate)
        logging.info("stage %d: learning_rate=%g batch_size=%d epochs=%d",
                     i, stage.learning_rate, stage.batch_size, stage.epochs)
        data, steps = feed.training(stage.batch_size)
        model.fit(data, initial_epoch=epochs_done, epochs=epochs_done + stage.epochs, verbose=0,
                  callbacks=[_LogEpoch()], **steps)
        epochs_done += stage.epochs
    results = model.evaluate(feed.evaluation(), return_dict=True, verbose=0)
    _export(model, spec, tf_transform_output, strategy, serving_model_dir)
    return {k: float(v) for k, v in results.items()}


def served_weights(spec: FeatureSpec, train_files) -> tuple:
    """(the column fit takes as sample weights or None, whether training drops the rows of weight 0)
    for the spec's `served` block; the Trainer and the Tuner feed by this one rule. Transform wrote
    each row's weight (components/preprocessing.py sample_weight). With holdback_only and no row
    of the training split weighing more than 0 it refuses before any step, naming the fix: fit
    would fail raw, or wait forever on a repeated feed."""
    if not spec.served:
        return None, False
    holdback_only = spec.served.use == "holdback_only"
    if holdback_only:
        rows, weighted = feeder.weighted_rows(train_files, SAMPLE_WEIGHT_KEY)
        if not weighted:
            raise ValueError(no_row_held_back(spec, rows, f"of the training split ({list(train_files)})"))
    return SAMPLE_WEIGHT_KEY, holdback_only


class _Feed:
    """The trainer's input under its strategy (the tf.data pipeline itself is components/feeder.py)."""

    def __init__(self, spec: FeatureSpec, strategy: tf.distribute.Strategy, feature_spec, train_files, eval_files):
        self._train, self._feature_spec, self._label = spec.training, feature_spec, label_key(spec)
        self._train_files, self._eval_files = train_files, eval_files
        self._weight, self._holdback_only = served_weights(spec, train_files)
        self.asynchronous = strategy_lib.is_parameter_server(strategy)
        # Synchronous workers shard each global batch by DATA (feeder): every worker must read
        # the examples in the same order, or their shares overlap. Parameter-server workers each
        # read their own copy of the data: an unseeded shuffle gives each a different order.
        self._ordered = self._train.deterministic or strategy_lib.is_multi_worker(strategy)
        self._seed = None if self.asynchronous else self._train.seed
        self._examples_per_epoch = None

    def _dataset(self, files, batch_size, shuffle, repeat=False, training=False):
        return feeder.make_dataset(files, self._feature_spec, self._label, batch_size, shuffle=shuffle,
                                   seed=self._seed, deterministic=self._ordered,
                                   shuffle_buffer=self._train.shuffle_buffer, repeat=repeat,
                                   weight_key=self._weight, drop_unweighted=training and self._holdback_only)

    def training(self, batch_size: int):
        """(data, extra fit arguments) for one stage."""
        if not self.asynchronous:
            return self._dataset(self._train_files, batch_size, shuffle=True, training=True), {}
        # The coordinator hands out steps to whichever worker is free, from endless streams.
        if self._examples_per_epoch is None:
            self._examples_per_epoch = (self._train.strategy.get("examples_per_epoch")
                                        or _count_examples(self._train_files))
        return (self._dataset(self._train_files, batch_size, shuffle=True, repeat=True, training=True),
                {"steps_per_epoch": math.ceil(self._examples_per_epoch / batch_size)})

    def evaluation(self):
        if not self.asynchronous:
            return self._dataset(self._eval_files, 1024, shuffle=False)
        # Exact evaluation builds the dataset on each worker from a function.
        return tf.keras.utils.experimental.DatasetCreator(
            lambda input_context: self._dataset(self._eval_files, 1024, shuffle=False))


def _export(model: tf.keras.Model, spec: FeatureSpec, tf_transform_output, strategy, serving_model_dir: str) -> None:
    """Every process saves (collective reads need them all); only the chief's copy is kept."""
    with strategy_lib.save_location(strategy, serving_model_dir) as target_dir:
        model.save(target_dir, save_format="tf", signatures=export.signatures(model, spec, tf_transform_output))
        export.set_method_names(target_dir)
        if target_dir != serving_model_dir:
            logging.info("non-chief %s: saved to %s, which is removed now",
                         strategy_lib.cluster_role().describe(), target_dir)
    if strategy_lib.is_chief(strategy):
        path = os.path.join(serving_model_dir, export.SERVING_SPEC_FILE)
        tf.io.gfile.makedirs(os.path.dirname(path))
        with tf.io.gfile.GFile(path, "w") as f:
            f.write(json.dumps(export.serving_spec(spec, tf_transform_output), indent=2))


def _exact_distributed_evaluation(model: tf.keras.Model, eval_files) -> None:
    """Parameter-server evaluation that sees every eval example once (Keras' exact evaluation).

    Without it, Keras needs a step count and a repeated dataset, and workers evaluate
    overlapping batches. Exact evaluation splits the eval data into shards by FILE (it ignores
    the dataset's DATA policy), so there can be no more shards than files: with one file a
    single worker evaluates it all. The only switch is compile's `pss_evaluation_shards`, so
    the model is compiled again with its own configuration (before training: a fresh
    optimizer is fine).
    """
    files = sum((tf.io.gfile.glob(pattern) for pattern in eval_files), [])
    if not files:
        raise ValueError(f"no eval files match {list(eval_files)}")
    # Keras' own heuristic is 5 shards per worker; fewer when there are fewer files.
    shards = min(len(files), 5 * len(strategy_lib.cluster_role().cluster["worker"]))
    config = tf.keras.saving.deserialize_keras_object(model.get_compile_config())
    model.compile(**config, pss_evaluation_shards=shards)


def _count_examples(file_patterns) -> int:
    files = tf.data.Dataset.list_files(list(file_patterns), shuffle=False)
    records = files.interleave(lambda path: tf.data.TFRecordDataset(path, compression_type="GZIP"),
                               num_parallel_calls=tf.data.AUTOTUNE)
    count = int(records.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1))
    if not count:
        raise ValueError(f"no training examples in {list(file_patterns)}")
    logging.info("parameter_server: an epoch is %d examples (counted; set "
                 "training.strategy.examples_per_epoch to skip the count)", count)
    return count


def _write_metrics(path: str, metrics: Dict[str, float]) -> None:
    tf.io.gfile.makedirs(os.path.dirname(path) or ".")
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(json.dumps(metrics, indent=2, sort_keys=True))


class _LogEpoch(tf.keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        logging.info("epoch %d: %s", epoch + 1, " ".join(f"{k}={v:.4f}" for k, v in (logs or {}).items()))


def _json_object(text: str) -> Dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object such as {{\"type\": \"multi_worker\"}}, got {text!r}")
    return value


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m components.trainer",
        description="Trains and exports like the pipeline's Trainer, on an existing Transform output; "
                    "run it in every replica of a distributed job (the cluster comes from TF_CONFIG).")
    parser.add_argument("--spec", required=True, help="the dataset's feature spec (YAML)")
    parser.add_argument("--strategy", type=_json_object,
                        help="JSON that replaces the spec's training.strategy block, e.g. '{\"type\": \"multi_worker\"}'")
    parser.add_argument("--transform_graph", required=True, help="Transform's transform_graph directory")
    parser.add_argument("--train_files", required=True, nargs="+", help="transformed training TFRecord patterns")
    parser.add_argument("--eval_files", required=True, nargs="+", help="transformed eval TFRecord patterns")
    parser.add_argument("--serving_model_dir", required=True, help="where the chief exports the SavedModel")
    parser.add_argument("--metrics_file", help="where the chief writes the evaluation metrics (JSON)")
    return parser


def spec_with_strategy(spec: FeatureSpec, strategy: Mapping[str, Any]) -> FeatureSpec:
    """The spec with another training.strategy block, checked like one written in the file."""
    raw = {**spec.raw, "training": {**(spec.raw.get("training") or {}), "strategy": dict(strategy)}}
    return parse_spec(raw, source=f"{spec.source} (--strategy)")


def main(argv: Optional[List[str]] = None) -> None:
    """Runs train_and_export (the code run_fn runs) outside TFX, e.g. in each replica of a TFJob.

    Only the chief writes the export and the metrics file.
    """
    args = argument_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    tf.get_logger().propagate = False  # TensorFlow's logger prints for itself
    spec = load_spec(args.spec)
    if args.strategy is not None:
        spec = spec_with_strategy(spec, args.strategy)
    metrics = train_and_export(spec, args.transform_graph, args.train_files, args.eval_files,
                               args.serving_model_dir)
    logging.info("evaluation: %s", json.dumps(metrics, sort_keys=True))
    if args.metrics_file and strategy_lib.cluster_role().is_chief:
        _write_metrics(args.metrics_file, metrics)


if __name__ == "__main__":
    main()
