"""Log-likelihood scoring of candidate outputs: rank classification, as T5's `rank_classification`
and lm-eval-harness's multiple choice score their options.

Each question has an input and some options (token ids). An option's score is log p(option | input)
under the model: the sum of its tokens' log-probabilities, and that sum per token, which does not
favour short options. The best-scoring option is the model's answer.

Each (question, option) pair is one row, fed as training feeds the model (seqio's feature
converters), so a score is minus the loss the model was trained to lower:

  encoder-decoder  encoder: the input; decoder: [start] + option[:-1]; targets: the option
  decoder-only     [start] + input + option, shifted as an LM; only the option's tokens count
  prefix LM        the same, with the start token and the input attending bidirectionally
                   (seqio's `decoder_causal_attention`, one more than the input's length)

Rows go through one compiled function in chunks of `batch_size` rows (the last chunk filled up with
copies of a row), their lengths rounded up to a power of two, so a few shapes cover any data. Padding
is 0, which is why 0 cannot be a token of an input or an option here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import numpy as np

from t5lite.models.params import model_features
from t5lite.train.losses import sequence_log_probs

BATCH_SIZE = 32
MIN_LENGTH = 8  # the shortest padded row length
RANK_BY = ("sum", "mean")
Tokens = Sequence[int]


class OptionScores(NamedTuple):
    """One question's options, in order: log p(option | input) summed over the option's tokens, that
    sum per token, and the number of tokens."""

    sum: np.ndarray  # [options] float32
    mean: np.ndarray  # [options] float32
    length: np.ndarray  # [options] int32


def option_log_likelihoods(
    model: nn.Module,
    params,
    inputs: Sequence[Tokens],
    options: Sequence[Sequence[Tokens]],
    *,
    prefix_lm: bool = False,
    batch_size: int = BATCH_SIZE,
) -> list[OptionScores]:
    """The scores of each question's options given its input.

    inputs: one token-id list per question: the encoder's input, or a decoder-only model's context
      (which may be empty; the start token is added here).
    options: per question, its candidate outputs (token-id lists, none empty).
    prefix_lm: the decoder was trained as a prefix LM; its context attends bidirectionally.
    """
    config = model.config
    _check(config, inputs, options, prefix_lm, batch_size)
    pairs = [(list(x), list(o)) for x, opts in zip(inputs, options) for o in opts]
    rows = (
        _encoder_decoder_rows(config, pairs) if config.is_encoder_decoder else _decoder_rows(config, pairs, prefix_lm)
    )
    sums = _score_rows(model, params, rows, batch_size)  # [pairs]
    lengths = np.array([len(o) for _, o in pairs], np.int32)
    scores, start = [], 0
    for opts in options:
        end = start + len(opts)
        scores.append(OptionScores(sums[start:end], sums[start:end] / lengths[start:end], lengths[start:end]))
        start = end
    return scores


def rank_classify(scores: Sequence[OptionScores], by: str = "sum") -> np.ndarray:
    """The index of each question's best option [questions], by summed or per-token log-likelihood
    (the first of equals)."""
    if by not in RANK_BY:
        raise ValueError(f"by={by!r} is not a way to rank options. Allowed values: {', '.join(RANK_BY)}.")
    return np.array([int(np.argmax(getattr(s, by))) for s in scores], np.int32)


def rank_metrics(scores: Sequence[OptionScores], labels: Sequence[int]) -> dict[str, float]:
    """Percentages of questions whose best option is the labelled one: `rank_accuracy` ranks by the
    summed log-likelihood, `rank_accuracy_norm` by the per-token one (lm-eval's acc_norm divides by
    the option's bytes instead, which does not depend on the tokenizer)."""
    labels = np.asarray(labels)
    if len(labels) != len(scores) or not len(labels):
        raise ValueError(f"Got {len(labels)} labels for {len(scores)} questions; give one per question (at least one).")
    if any(not 0 <= label < len(s.sum) for label, s in zip(labels, scores)):
        raise ValueError("A label is not the index of one of its question's options.")
    return {
        "rank_accuracy": 100.0 * float(np.mean(rank_classify(scores, "sum") == labels)),
        "rank_accuracy_norm": 100.0 * float(np.mean(rank_classify(scores, "mean") == labels)),
    }


def evaluate_choices(
    model: nn.Module,
    params,
    examples: Sequence[tuple[str, Sequence[str], int]],
    encode: Callable[[str], Tokens],
    *,
    prefix_lm: bool = False,
    add_eos: bool = True,
    batch_size: int = BATCH_SIZE,
) -> dict[str, float]:
    """`rank_metrics` of multiple-choice questions as text, (context, choices, label) each (e.g.
    `t5lite.data.multiple_choice.multiple_choice_examples`), tokenized with `encode` (a vocabulary's).
    With `add_eos` the context and each choice end in EOS, as seqio tokenizes a task's "inputs" and
    "targets" (add_eos=True) for training; without it they are plain running text, as a causal LM
    pre-trained on documents sees them."""
    eos = [model.config.eos_id] if add_eos else []
    inputs = [list(encode(context)) + eos for context, _, _ in examples]
    options = [[list(encode(choice)) + eos for choice in choices] for _, choices, _ in examples]
    scores = option_log_likelihoods(model, params, inputs, options, prefix_lm=prefix_lm, batch_size=batch_size)
    return rank_metrics(scores, [label for _, _, label in examples])


def _encoder_decoder_rows(config, pairs) -> dict[str, np.ndarray]:
    """The encoder reads the input; the decoder is fed [start] + option[:-1] and predicts the option."""
    encoder = _padded([x for x, _ in pairs], config)  # [rows, S]
    targets = _padded([o for _, o in pairs], config)  # [rows, T]
    return {
        "encoder_input_tokens": encoder,
        "decoder_input_tokens": _shifted(targets, config.start_id),
        "decoder_target_tokens": targets,
        "decoder_loss_weights": (targets > 0).astype(np.int32),
    }


def _decoder_rows(config, pairs, prefix_lm: bool) -> dict[str, np.ndarray]:
    """Row [start] + input + option, as seqio's (prefix) LM feature converter makes it: targets are
    input + option, the loss falls on the option, and a prefix LM's region is [start] + input."""
    targets = _padded([x + o for x, o in pairs], config)  # [rows, L]
    position = np.arange(targets.shape[1])
    context = np.array([len(x) for x, _ in pairs])[:, None]  # [rows, 1]
    rows = {
        "decoder_input_tokens": _shifted(targets, config.start_id),
        "decoder_target_tokens": targets,
        "decoder_loss_weights": ((position >= context) & (targets > 0)).astype(np.int32),
    }
    if prefix_lm:
        rows["decoder_causal_attention"] = (position <= context).astype(np.int32)
    return rows


def _padded(token_lists, config) -> np.ndarray:
    """Right-padded with 0 to the longest list rounded up to a power of two [rows, length]."""
    longest = max(len(t) for t in token_lists)
    length = max(MIN_LENGTH, 1 << (longest - 1).bit_length())
    if config.position_encoding == "learned":
        if longest > config.max_length:
            raise ValueError(
                f"A row needs {longest} positions but the model learned max_length={config.max_length}; "
                f"shorten the inputs or options."
            )
        length = min(length, config.max_length)
    rows = np.zeros((len(token_lists), length), np.int32)
    for row, tokens in zip(rows, token_lists):
        row[: len(tokens)] = tokens
    return rows


def _shifted(targets: np.ndarray, start_id: int) -> np.ndarray:
    """Decoder inputs: the targets one step later, after the start token."""
    return np.concatenate([np.full((len(targets), 1), start_id, np.int32), targets[:, :-1]], axis=1)


def _score_rows(model, params, rows: dict[str, np.ndarray], batch_size: int) -> np.ndarray:
    """Summed loss-weighted log-probabilities [rows], computed `batch_size` rows at a time."""
    count = len(rows["decoder_target_tokens"])
    padded = -(-count // batch_size) * batch_size
    order = np.minimum(np.arange(padded), count - 1)  # the last chunk repeats the last row
    chunks = [
        _forward(model, params, {name: value[order[i : i + batch_size]] for name, value in rows.items()})
        for i in range(0, padded, batch_size)
    ]
    return np.concatenate([np.asarray(chunk) for chunk in chunks])[:count]


@functools.partial(jax.jit, static_argnames="model")
def _forward(model, params, batch):
    logits = model.apply({"params": params}, **model_features(model.config, batch), enable_dropout=False)
    return sequence_log_probs(logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"])


def _check(config, inputs, options, prefix_lm: bool, batch_size: int) -> None:
    """A ValueError saying what is wrong with the questions, if anything is."""
    if prefix_lm and config.is_encoder_decoder:
        raise ValueError(
            "prefix_lm=True is for decoder-only models; an encoder-decoder attends to its inputs through the encoder."
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer.")
    if len(inputs) != len(options):
        raise ValueError(f"Got {len(inputs)} inputs and {len(options)} option lists; give one of each per question.")
    if not len(inputs):
        raise ValueError("There are no questions to score; pass at least one input with its options.")
    for q, (x, opts) in enumerate(zip(inputs, options)):
        if config.is_encoder_decoder and not len(x):
            raise ValueError(f"Question {q} has an empty input; an encoder-decoder needs at least one input token.")
        _check_ids(f"The input of question {q}", x, config.vocab_size)
        if not len(opts):
            raise ValueError(f"Question {q} has no options; give at least one.")
        for i, option in enumerate(opts):
            if not len(option):
                raise ValueError(f"Option {i} of question {q} has no tokens; an option needs at least one to score.")
            _check_ids(f"Option {i} of question {q}", option, config.vocab_size)


def _check_ids(what: str, tokens: Tokens, vocab_size: int) -> None:
    ids = np.asarray(tokens)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"{what} must be a list of integer token ids; got {tokens!r:.200}.")
    if ids.size and (ids.min() < 1 or ids.max() >= vocab_size):
        raise ValueError(
            f"{what} holds ids outside [1, vocab_size={vocab_size}): min {ids.min()}, max {ids.max()} "
            f"(0 is padding, so it cannot be a token here)."
        )
