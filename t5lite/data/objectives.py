"""Pre-training objectives on raw text: which features they make and the seqio preprocessors.

Sources yield {"text": string}; each objective tokenizes it and cuts long texts into pieces
that fit `task_feature_lengths`, so nothing is silently truncated:

  span_corruption  {"inputs", "targets"}  T5's denoising objective (span_corruption.py)
  prefix_lm        {"inputs", "targets"}  a piece split at a random point: continue the text
  lm               {"targets"}            plain next-token prediction

The causal and prefix-LM objectives put EOS only where a text really ends, so a model learns
to stop at the end of a paragraph, not at an arbitrary cut.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import seqio
import tensorflow as tf

from t5lite.data import chunking
from t5lite.data.span_corruption import span_corruption

OBJECTIVES = ("span_corruption", "prefix_lm", "lm")


def output_features(objective: str, vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
    check_objective(objective)
    keys = ("targets",) if objective == "lm" else ("inputs", "targets")
    return {key: seqio.Feature(vocabulary, add_eos=True) for key in keys}


def preprocessors(objective: str) -> list[Callable[..., tf.data.Dataset]]:
    """The seqio preprocessors that turn {"text"} examples into the objective's features."""
    check_objective(objective)
    if objective == "span_corruption":
        tokenize = functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False)
        return [_text_as_targets, tokenize, span_corruption, seqio.preprocessors.append_eos_after_trim]
    tokenize = functools.partial(seqio.preprocessors.tokenize_and_append_eos, copy_pretokenized=False)
    return [_text_as_targets, tokenize, prefix_lm if objective == "prefix_lm" else lm]


def check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"Unknown objective {objective!r}. Allowed values: {', '.join(OBJECTIVES)}.")


@seqio.map_over_dataset
def _text_as_targets(features):
    return {"targets": features["text"]}


def lm(dataset: tf.data.Dataset, sequence_length: Mapping[str, int] | None) -> tf.data.Dataset:
    """Tokenized {"targets"} (EOS included) -> pieces of at most `targets` tokens."""
    _check_lengths("lm", sequence_length, ("targets",))
    return chunking.split_tokens(dataset, "targets", sequence_length["targets"])


def prefix_lm(
    dataset: tf.data.Dataset, sequence_length: Mapping[str, int] | None, output_features: Mapping[str, seqio.Feature]
) -> tf.data.Dataset:
    """Tokenized {"targets"} (EOS included) -> {"inputs": prefix + EOS, "targets": the rest}."""
    _check_lengths("prefix_lm", sequence_length, ("inputs", "targets"))
    max_inputs, max_targets = sequence_length["inputs"] - 1, sequence_length["targets"]
    dataset = chunking.split_tokens(dataset, "targets", max_inputs + max_targets, min_tokens=2)
    eos = output_features["inputs"].vocabulary.eos_id

    @functools.partial(seqio.map_over_dataset, num_seeds=1)
    def split(features, seed):
        tokens = features["targets"]
        n = tf.size(tokens)
        # Any split leaving 1..max_inputs tokens of prefix and 1..max_targets of continuation.
        lowest, highest = tf.maximum(1, n - max_targets), tf.minimum(n - 1, max_inputs)
        point = tf.random.stateless_uniform([], seed, lowest, highest + 1, dtype=tf.int32)
        return {"inputs": tf.concat([tokens[:point], [eos]], axis=0), "targets": tokens[point:]}

    return split(dataset)


def _check_lengths(objective: str, sequence_length: Mapping[str, int] | None, keys: tuple[str, ...]) -> None:
    if not sequence_length or any(sequence_length.get(key, 0) < 2 for key in keys):
        raise ValueError(
            f"The {objective} objective needs task_feature_lengths of at least 2 for "
            f"{' and '.join(map(repr, keys))}, got {sequence_length}."
        )
