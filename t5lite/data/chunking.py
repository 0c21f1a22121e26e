"""Cutting tokenized texts into pieces that fit a sequence length, so no text is truncated."""

from __future__ import annotations

import tensorflow as tf


def split_tokens(dataset: tf.data.Dataset, key: str, max_tokens: int, min_tokens: int = 1) -> tf.data.Dataset:
    """{key: [n]} -> consecutive {key: [<= max_tokens]} pieces; pieces under `min_tokens` are dropped.

    Other features are dropped: they describe the whole text, not a piece of it.
    """

    def to_rows(features):
        tokens = features[key]
        size = tf.size(tokens)
        num_rows = (size + max_tokens - 1) // max_tokens
        rows = tf.reshape(tf.pad(tokens, [[0, num_rows * max_tokens - size]]), [num_rows, max_tokens])
        lengths = tf.minimum(max_tokens, size - tf.range(num_rows) * max_tokens)
        keep = lengths >= min_tokens
        return tf.boolean_mask(rows, keep), tf.boolean_mask(lengths, keep)

    return (
        dataset.map(to_rows, num_parallel_calls=tf.data.AUTOTUNE)
        .unbatch()
        .map(lambda row, length: {key: row[:length]}, num_parallel_calls=tf.data.AUTOTUNE)
    )
