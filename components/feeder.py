"""tf.data input pipeline over the Transform's materialized examples.

Files are read in parallel (interleave), records parsed in parallel after batching
(one vectorised parse per batch), and prefetch keeps the next batch ready while the
trainer works on the current one.
"""

from typing import Mapping, Optional, Sequence, Tuple

import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE


def make_dataset(file_patterns: Sequence[str], feature_spec: Mapping[str, tf.io.FixedLenFeature],
                 label_key: str, batch_size: int, *, shuffle: bool, seed: int,
                 deterministic: bool, shuffle_buffer: int = 10000, repeat: bool = False,
                 weight_key: Optional[str] = None, drop_unweighted: bool = False) -> tf.data.Dataset:
    """Batches of (features, label), or (features, label, weight) with weight_key: Keras' fit takes
    the third element as sample weights. drop_unweighted removes rows of weight 0 (the spec's
    served.use holdback_only) and yields (features, label); the eval data keeps every row.

    With repeat and drop_unweighted, data in which no row weighs more than 0 is refused (ValueError)
    before any batch: the filter of empty batches would otherwise wait forever on the endless stream.
    """
    if repeat and drop_unweighted:
        rows, weighted = weighted_rows(file_patterns, weight_key)
        if not weighted:
            raise ValueError(f"no row of the {rows} in {list(file_patterns)} weighs more than 0 ({weight_key}): "
                             "drop_unweighted over a repeated dataset would never yield a batch; feed data with "
                             "rows held back, or keep every row (drop_unweighted=False)")
    ds = _records(file_patterns, deterministic)
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=False)
    ds = ds.map(lambda records: _split_label(tf.io.parse_example(records, feature_spec), label_key,
                                             weight_key, drop_unweighted),
                num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    if drop_unweighted:  # a batch with no row left would be a step on nothing
        ds = ds.filter(lambda features, label: tf.size(label) > 0)
    options = tf.data.Options()
    options.deterministic = deterministic
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options).prefetch(AUTOTUNE)


def weighted_rows(file_patterns: Sequence[str], weight_key: str) -> Tuple[int, int]:
    """(rows, rows that weigh more than 0) of the examples, in one pass that parses the weight alone."""
    weight_spec = {weight_key: tf.io.FixedLenFeature([], tf.float32)}
    weights = _records(file_patterns, deterministic=False).batch(4096).map(
        lambda records: tf.io.parse_example(records, weight_spec)[weight_key], num_parallel_calls=AUTOTUNE)
    counts = weights.reduce(tf.zeros([2], tf.int64), lambda n, w: n + tf.stack(
        [tf.size(w, out_type=tf.int64), tf.math.count_nonzero(w > 0, dtype=tf.int64)]))
    return int(counts[0]), int(counts[1])


def _records(file_patterns: Sequence[str], deterministic: bool) -> tf.data.Dataset:
    files = tf.data.Dataset.list_files(list(file_patterns), shuffle=False)  # sorted, reproducible
    return files.interleave(lambda path: tf.data.TFRecordDataset(path, compression_type="GZIP"),
                            cycle_length=4, num_parallel_calls=AUTOTUNE, deterministic=deterministic)


def _split_label(features, label_key, weight_key=None, drop_unweighted=False):
    label = features.pop(label_key)
    if weight_key is None:
        return features, label
    weight = features.pop(weight_key)
    if drop_unweighted:
        kept = weight > 0
        return {k: tf.boolean_mask(v, kept) for k, v in features.items()}, tf.boolean_mask(label, kept)
    return features, label, weight
