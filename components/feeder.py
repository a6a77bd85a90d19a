"""tf.data input pipeline over the Transform's materialized examples.

Files are read in parallel (interleave), records parsed in parallel after batching
(one vectorised parse per batch), and prefetch keeps the next batch ready while the
trainer works on the current one.
"""

from typing import Mapping, Optional, Sequence

import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE


def make_dataset(file_patterns: Sequence[str], feature_spec: Mapping[str, tf.io.FixedLenFeature],
                 label_key: str, batch_size: int, *, shuffle: bool, seed: int,
                 deterministic: bool, shuffle_buffer: int = 10000, repeat: bool = False,
                 weight_key: Optional[str] = None, drop_unweighted: bool = False) -> tf.data.Dataset:
    """Batches of (features, label), or (features, label, weight) with weight_key: Keras' fit takes
    the third element as sample weights. drop_unweighted removes rows of weight 0 (the spec's
    served.use holdback_only) and yields (features, label); the eval data keeps every row."""
    files = tf.data.Dataset.list_files(list(file_patterns), shuffle=False)  # sorted, reproducible
    ds = files.interleave(
        lambda path: tf.data.TFRecordDataset(path, compression_type="GZIP"),
        cycle_length=4, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
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


def _split_label(features, label_key, weight_key=None, drop_unweighted=False):
    label = features.pop(label_key)
    if weight_key is None:
        return features, label
    weight = features.pop(weight_key)
    if drop_unweighted:
        kept = weight > 0
        return {k: tf.boolean_mask(v, kept) for k, v in features.items()}, tf.boolean_mask(label, kept)
    return features, label, weight
