"""T5's span-corruption objective as a seqio preprocessor (Raffel et al. 2020, section 3.1.4).

A chunk of n tokens gets round(n * noise_density) noise tokens in round(noise / mean span
length) spans, placed uniformly at random; the first token is never noise. The inputs keep
the other tokens and put one sentinel where each span was; the targets list every span after
its sentinel. Sentinels count down from the top of the vocabulary (`<extra_id_0>` is the last
id), as seqio's vocabularies number their extra ids. Long texts are cut into chunks whose
corrupted inputs fill `inputs` exactly (568 raw tokens for 512, as in T5).

T5 builds those chunks from a stream of documents (`concatenate=True`, the default): one random
aligned chunk of at most 65536 tokens from each document (`select_random_chunk`), 128 documents
joined end to end without a separator (`reduce_concat_tokens`), then cut into 568-token pieces
(`split_tokens`), so nearly every example is full length. `concatenate=False` corrupts each
document on its own, its last piece shorter.

The `t5` package holds the original; seqio does not, and we do not depend on `t5`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import gin
import numpy as np
import seqio
import tensorflow as tf

from t5lite.data import chunking

NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0
MAX_DOCUMENT_CHUNK = 65536  # T5 keeps one random chunk of this many tokens of a longer document
DOCUMENTS_PER_CONCATENATION = 128


def noise_counts(
    length: int, noise_density: float = NOISE_DENSITY, mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH
) -> tuple[int, int]:
    """(noise tokens, noise spans) for a chunk of `length` >= 2 tokens: at least one of each.

    Every noise span needs a clean span before it, so there are no more spans than clean tokens.
    """
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = min(max(round(num_noise / mean_noise_span_length), 1), length - num_noise)
    return num_noise, num_spans


def corrupted_lengths(
    length: int, noise_density: float = NOISE_DENSITY, mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH
) -> tuple[int, int]:
    """(inputs, targets) lengths, each with its EOS, after corrupting `length` tokens."""
    num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
    return length - num_noise + num_spans + 1, num_noise + num_spans + 1


def raw_length(
    inputs_length: int,
    targets_length: int | None = None,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> int:
    """The longest chunk whose corrupted inputs (and targets, if given) fit the lengths."""

    def fits(n):
        n_inputs, n_targets = corrupted_lengths(n, noise_density, mean_noise_span_length)
        return n_inputs <= inputs_length and (targets_length is None or n_targets <= targets_length)

    if not fits(2):
        raise ValueError(
            f"Sequence lengths inputs={inputs_length}, targets={targets_length} are too short for "
            f"span corruption; use at least 4 for each."
        )
    n = 2
    while fits(n + 1):  # both lengths grow monotonically with n
        n += 1
    return n


def targets_length_for(
    inputs_length: int, noise_density: float = NOISE_DENSITY, mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH
) -> int:
    """The targets length that span corruption fills for `inputs_length` (T5: 512 -> 114)."""
    n = raw_length(inputs_length, None, noise_density, mean_noise_span_length)
    return corrupted_lengths(n, noise_density, mean_noise_span_length)[1]


@gin.configurable(module="t5lite.data", denylist=["dataset", "sequence_length", "output_features"])
def span_corruption(
    dataset: tf.data.Dataset,
    sequence_length: Mapping[str, int] | None,
    output_features: Mapping[str, seqio.Feature],
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
    concatenate: bool = True,
) -> tf.data.Dataset:
    """Tokenized {"targets"} -> {"inputs", "targets"} without EOS (append it afterwards)."""
    if not 0 < noise_density < 1 or mean_noise_span_length < 1:
        raise ValueError(
            f"noise_density={noise_density} must be in (0, 1) and mean_noise_span_length="
            f"{mean_noise_span_length} at least 1."
        )
    if not sequence_length or "inputs" not in sequence_length or "targets" not in sequence_length:
        raise ValueError(
            f"span_corruption needs task_feature_lengths for 'inputs' and 'targets', got "
            f"{sequence_length}; T5 uses {{'inputs': 512, 'targets': 114}} (see targets_length_for)."
        )
    vocabulary = output_features["targets"].vocabulary
    max_tokens = raw_length(
        sequence_length["inputs"], sequence_length["targets"], noise_density, mean_noise_span_length
    )
    counts = np.array(
        [(0, 0), (0, 0)] + [noise_counts(n, noise_density, mean_noise_span_length) for n in range(2, max_tokens + 1)],
        np.int32,
    )
    if counts[-1, 1] > vocabulary.extra_ids:
        raise ValueError(
            f"Span corruption of {max_tokens} tokens makes up to {counts[-1, 1]} spans, but the "
            f"vocabulary has only {vocabulary.extra_ids} extra ids for sentinels; use a vocabulary "
            f"with more extra_ids or shorter sequences."
        )
    if concatenate:
        dataset = concatenate_documents(select_random_chunk(dataset, MAX_DOCUMENT_CHUNK), DOCUMENTS_PER_CONCATENATION)
    dataset = chunking.split_tokens(dataset, "targets", max_tokens, min_tokens=2)
    corrupt = functools.partial(_corrupt, counts=tf.constant(counts), vocab_size=vocabulary.vocab_size)
    return seqio.map_over_dataset(corrupt, num_seeds=2)(dataset)


def select_random_chunk(dataset: tf.data.Dataset, max_length: int) -> tf.data.Dataset:
    """Each non-empty {"targets"} document -> one of its consecutive `max_length`-token chunks,
    chosen uniformly (the last may be shorter); the rest of a long document is not used."""

    @functools.partial(seqio.map_over_dataset, num_seeds=1)
    def chunk(features, seed):
        tokens = features["targets"]
        count = (tf.size(tokens) + max_length - 1) // max_length
        start = max_length * tf.random.stateless_uniform([], seed, 0, count, dtype=tf.int32)
        return {"targets": tokens[start : start + max_length]}

    return chunk(dataset.filter(lambda features: tf.size(features["targets"]) > 0))


def concatenate_documents(dataset: tf.data.Dataset, documents: int) -> tf.data.Dataset:
    """{"targets"} documents -> one {"targets"} of `documents` consecutive ones joined end to end."""
    batches = dataset.map(lambda features: {"targets": features["targets"]}).padded_batch(documents)
    # Padding is id 0, which no tokenized text holds.
    return batches.map(
        lambda batch: {"targets": tf.boolean_mask(batch["targets"], batch["targets"] > 0)},
        num_parallel_calls=tf.data.AUTOTUNE,
    )


def _corrupt(features, seeds, counts, vocab_size):
    tokens = features["targets"]
    noise = _noise_mask(tf.size(tokens), counts, seeds)
    return {
        "inputs": _replace_spans(tokens, noise, vocab_size),
        "targets": _replace_spans(tokens, tf.logical_not(noise), vocab_size),
    }


def _noise_mask(length: tf.Tensor, counts: tf.Tensor, seeds) -> tf.Tensor:
    """Boolean [length]: alternating clean and noise spans with random lengths, clean first."""
    num_noise, num_spans = counts[length][0], counts[length][1]
    noise_lengths = _random_composition(num_noise, num_spans, seeds[0])
    clean_lengths = _random_composition(length - num_noise, num_spans, seeds[1])
    span_lengths = tf.reshape(tf.stack([clean_lengths, noise_lengths], axis=1), [-1])
    span_starts = tf.cumsum(span_lengths)[:-1]
    is_start = tf.scatter_nd(span_starts[:, None], tf.ones_like(span_starts), [length])
    return tf.math.floormod(tf.cumsum(is_start), 2) == 1


def _random_composition(total: tf.Tensor, parts: tf.Tensor, seed) -> tf.Tensor:
    """`parts` positive integers summing to `total`, uniform over all such sequences."""
    cuts = tf.sort(seqio.utils.stateless_shuffle(tf.range(1, total), seed)[: parts - 1])
    bounds = tf.concat([[0], cuts, [total]], axis=0)
    return bounds[1:] - bounds[:-1]


def _replace_spans(tokens: tf.Tensor, drop: tf.Tensor, vocab_size: int) -> tf.Tensor:
    """Replaces each run of `drop` tokens with the next sentinel (vocab_size - 1, - 2, ...)."""
    previous = tf.concat([[False], drop[:-1]], axis=0)
    first = tf.logical_and(drop, tf.logical_not(previous))
    sentinels = vocab_size - tf.cumsum(tf.cast(first, tokens.dtype))
    tokens = tf.where(first, sentinels, tokens)
    return tf.boolean_mask(tokens, tf.logical_not(tf.logical_and(drop, previous)))
