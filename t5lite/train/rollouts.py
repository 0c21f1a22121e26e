"""Rollouts: responses sampled from the policy for a batch of prompts, as rows the model can score.

Prompts come from an unpacked seqio batch: an encoder-decoder's `encoder_input_tokens`, or a
causal decoder's `causal_prefix_lm` rows (the prompt is the part without loss weight). Each prompt
is repeated `group_size` times (a GRPO group: consecutive rows), its responses sampled with the
compiled decoder inside the step, each row with its own key. The result is a batch in the
training layout (for a decoder: prompt then response in one row), so the policy, the reference
and a reward model score it as they score training data, plus the response-aligned view ([N, T],
response tokens first) that advantages and losses are computed in.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from t5lite.config import ModelConfig
from t5lite.decoding import DecodingOptions, sample_traced
from t5lite.models import build

KINDS = ("encoder_decoder", "causal_prefix_lm")  # prompts the decoder generates from as it trained


class Rollout(NamedTuple):
    batch: dict  # the prompts and responses as training rows (decoder_target_tokens [N, L], ...)
    responses: jax.Array  # [N, T] sampled tokens, 0 after EOS
    mask: jax.Array  # [N, T] float: the response's tokens, EOS included
    targets: jax.Array  # [N, T] the task's targets of each row's prompt
    offsets: jax.Array  # [N] where each response starts in the batch's decoder rows


def prompts_and_targets(batch, kind: str) -> tuple[jax.Array | None, jax.Array, jax.Array]:
    """(encoder inputs or None, decoder prompts [B, P] right-padded, targets [B, T]) of a task batch."""
    tokens = batch["decoder_target_tokens"]
    if kind == "encoder_decoder":
        return batch["encoder_input_tokens"], jnp.zeros((tokens.shape[0], 0), jnp.int32), tokens
    weighted = batch["decoder_loss_weights"] > 0
    prompt_lengths = jnp.argmax(weighted, axis=1)  # the targets start where the loss weight does
    targets = response_view(jnp.where(weighted, tokens, 0), prompt_lengths, tokens.shape[1])
    return None, jnp.where(weighted, 0, tokens), targets


def response_view(rows, offsets, length: int):
    """[N, L] -> [N, length]: each row's values from its offset on (0 past the row's end)."""
    index = offsets[:, None] + jnp.arange(length)
    gathered = jnp.take_along_axis(rows, jnp.minimum(index, rows.shape[1] - 1), axis=1)
    return jnp.where(index < rows.shape[1], gathered, 0)


def response_mask(responses, eos_id: int):
    """[N, T] float: the tokens up to and including each response's first EOS (all T without one)."""
    positions = jnp.arange(responses.shape[1])
    ended = jnp.any(responses == eos_id, axis=1)
    last = jnp.where(ended, jnp.argmax(responses == eos_id, axis=1), responses.shape[1] - 1)
    return (positions <= last[:, None]).astype(jnp.float32)


def rollout(
    config: ModelConfig, params, batch, kind: str, key, options: DecodingOptions, group_size: int = 1
) -> Rollout:
    """`group_size` sampled responses per prompt of `batch` (options.max_new_tokens tokens at most)."""
    length = options.max_new_tokens  # the task's targets length: a decoder's rows hold prompt, then response
    encoder, prompts, targets = prompts_and_targets(batch, kind)
    if kind != "encoder_decoder":
        prompts = prompts[:, : prompts.shape[1] - length]
    encoder, prompts, targets = (
        None if x is None else jnp.repeat(x, group_size, axis=0) for x in (encoder, prompts, targets)
    )
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(prompts.shape[0]))
    generation = sample_traced(build(config), params, prompts, keys, options, encoder_input_tokens=encoder)
    mask = response_mask(generation.tokens, options.eos_id)
    responses = jax.lax.stop_gradient(generation.tokens * mask.astype(jnp.int32))
    training, offsets = training_rows(config.start_id, encoder, prompts, responses, mask)
    return Rollout(training, responses, mask, targets[:, :length], offsets)


def training_rows(start_id: int, encoder, prompts, responses, mask) -> tuple[dict, jax.Array]:
    """(the rows a model scores, where each response starts in its decoder row): an encoder-decoder's
    inputs and responses, or (`encoder` None) a decoder's prompt then response in one row."""
    rows = responses.shape[0]
    if encoder is not None:
        offsets, decoder, weights = jnp.zeros(rows, jnp.int32), responses, mask
        training = {"encoder_input_tokens": encoder}
    else:
        offsets = jnp.count_nonzero(prompts, axis=1).astype(jnp.int32)
        index = jnp.arange(prompts.shape[1] + responses.shape[1]) - offsets[:, None]  # [N, L]: response slot
        in_response = (index >= 0) & (index < responses.shape[1])
        slot = jnp.clip(index, 0, responses.shape[1] - 1)
        prompt_part = jnp.pad(prompts, ((0, 0), (0, responses.shape[1])))  # 0 from each row's offset on
        decoder = jnp.where(in_response, jnp.take_along_axis(responses, slot, axis=1), prompt_part)
        weights = jnp.where(in_response, jnp.take_along_axis(mask, slot, axis=1), 0.0)
        training = {}
    start = jnp.full((rows, 1), start_id, jnp.int32)
    training |= {
        "decoder_target_tokens": decoder,
        "decoder_input_tokens": jnp.concatenate([start, decoder[:, :-1]], axis=1),
        "decoder_loss_weights": weights.astype(jnp.int32),
    }
    return training, offsets
