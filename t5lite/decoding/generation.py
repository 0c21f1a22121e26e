"""`generate`: checks the inputs, then runs one compiled program per prompt-length group."""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5lite.decoding.options import DecodingOptions, Generation
from t5lite.decoding.search import beam_search, sample
from t5lite.decoding.steps import batch_axes, decoding_model, model_step, one_token, reorder_rows, unstacked


@functools.partial(jax.jit, static_argnames=("model", "options", "prefilled", "prefix_lm", "unstack"))
def _generate(model, params, encoder_input_tokens, prompt, lengths, keys, *, options, prefilled, prefix_lm, unstack):
    batch, width = prompt.shape
    if unstack:
        params = unstacked(params, model.config)
    encoder_args = ()
    if encoder_input_tokens is not None:
        encoded = model.apply({"params": params}, encoder_input_tokens, enable_dropout=False, method=model.encode)
        encoder_args = (encoded, encoder_input_tokens)

    def allocate(*args):  # (encoder args..., tokens): every argument has the batch axis first
        return model_step(model, params, args[:-1])(None, args[-1])[1]

    # The last token chosen is never fed, so the highest position fed is width + N - 2.
    allocation = jnp.zeros((batch, width + options.max_new_tokens - 1), jnp.int32)
    cache = allocate(*encoder_args, allocation)
    apply = model_step(model, params, encoder_args)
    features = {"decoder_causal_attention": jnp.ones((batch, prefilled), jnp.int32)} if prefix_lm else {}
    logits, cache = apply(cache, prompt[:, :prefilled], **features)
    logits = logits[:, -1]
    if options.num_beams is None:
        return sample(one_token(apply), cache, logits, prompt, lengths, prefilled, options, keys)
    repeat = functools.partial(jnp.repeat, repeats=options.num_beams, axis=0)
    beam_step = one_token(model_step(model, params, tuple(map(repeat, encoder_args))))
    reorder = functools.partial(reorder_rows, axes=batch_axes(allocate, *encoder_args, allocation))
    return beam_search(beam_step, cache, logits, prompt, lengths, prefilled, options, reorder)


def generate(
    model: nn.Module,
    params,
    *,
    encoder_input_tokens=None,
    prompt_tokens=None,
    prefix_lm: bool = False,
    options: DecodingOptions = DecodingOptions(),
    rng: jax.Array | None = None,
) -> Generation:
    """Generates up to `options.max_new_tokens` tokens per row, compiled with the KV cache.

    encoder_input_tokens [B, S]: the encoder-decoder's inputs (0 is padding).
    prompt_tokens [B, P]: the decoder-only model's prompts, right-padded with 0 and without the
      start token; for the encoder-decoder, an optional forced start of each output.
    prefix_lm: the decoder was trained as a prefix LM; the prompt attends bidirectionally.
    rng: a PRNG key, needed when sampling (temperature > 0). Call with concrete arrays (not under
      jit): prompt lengths decide shapes, and each new (batch, longest, shortest prompt) compiles.
    """
    config = model.config
    if options.eos_id == "model":
        options = dataclasses.replace(options, eos_id=config.eos_id)
    inputs = _checked_inputs(config, encoder_input_tokens, prompt_tokens, prefix_lm, options, rng)
    batch = len(inputs.prompt)
    # Row b is fed [start, prompt...]: the start token, then its prompt.
    prompt = np.concatenate([np.full((batch, 1), config.start_id, np.int32), inputs.prompt], axis=1)
    lengths = 1 + np.count_nonzero(inputs.prompt, axis=1)
    if config.position_encoding == "learned" and lengths.max() + options.max_new_tokens - 1 > config.max_length:
        raise ValueError(
            f"The longest prompt ({lengths.max() - 1} tokens, plus the start token) and max_new_tokens="
            f"{options.max_new_tokens} need {lengths.max() + options.max_new_tokens - 1} learned positions, "
            f"but the model has max_length={config.max_length}; shorten the prompt or max_new_tokens."
        )
    row_keys = None if rng is None else jax.vmap(jax.random.fold_in, (None, 0))(rng, jnp.arange(batch))
    groups = [np.flatnonzero(lengths == n) for n in np.unique(lengths)] if prefix_lm else [np.arange(batch)]
    model, unstack = decoding_model(model)
    outputs = [
        _generate(
            model,
            params,
            None if inputs.encoder is None else inputs.encoder[rows],
            prompt[rows, : lengths[rows].max()],
            lengths[rows],
            None if row_keys is None else row_keys[rows],
            options=options,
            prefilled=int(lengths[rows].min()),
            prefix_lm=prefix_lm,
            unstack=unstack,
        )
        for rows in groups
    ]
    if len(outputs) == 1:
        return outputs[0]
    order = np.argsort(np.concatenate(groups))
    return jax.tree.map(lambda *parts: jnp.concatenate(parts)[order], *outputs)


class _Inputs(NamedTuple):
    encoder: np.ndarray | None
    prompt: np.ndarray


def _checked_inputs(config, encoder_input_tokens, prompt_tokens, prefix_lm, options, rng) -> _Inputs:
    """The inputs as int32 arrays, or a ValueError saying what is wrong with them."""
    if config.is_encoder_decoder and encoder_input_tokens is None:
        raise ValueError("An encoder-decoder model needs encoder_input_tokens [batch, length] to generate from.")
    if not config.is_encoder_decoder and encoder_input_tokens is not None:
        raise ValueError("A decoder-only model takes prompt_tokens, not encoder_input_tokens.")
    if prefix_lm and config.is_encoder_decoder:
        raise ValueError(
            "prefix_lm=True is for decoder-only models; an encoder-decoder attends to its inputs through the encoder."
        )
    if not config.is_encoder_decoder and prompt_tokens is None:
        raise ValueError("A decoder-only model needs prompt_tokens [batch, length] (length may be 0).")
    if options.temperature > 0 and rng is None:
        raise ValueError(f"Sampling (temperature={options.temperature}) needs rng, a jax.random key.")
    encoder = (
        None
        if encoder_input_tokens is None
        else _token_array("encoder_input_tokens", encoder_input_tokens, config.vocab_size)
    )
    if prompt_tokens is None:
        prompt = np.zeros((len(encoder), 0), np.int32)
    else:
        prompt = _token_array("prompt_tokens", prompt_tokens, config.vocab_size)
        padding = prompt == 0
        if np.any(padding[:, :-1] & ~padding[:, 1:]):
            raise ValueError("prompt_tokens must be right-padded: a 0 (padding) is followed by a token.")
    if encoder is not None and len(encoder) != len(prompt):
        raise ValueError(f"encoder_input_tokens has {len(encoder)} rows but prompt_tokens has {len(prompt)}.")
    if options.top_k > config.vocab_size:
        raise ValueError(f"top_k={options.top_k} must be at most the model's vocab_size={config.vocab_size}.")
    if options.eos_id is not None and options.eos_id >= config.vocab_size:
        raise ValueError(f"eos_id={options.eos_id} must be below the model's vocab_size={config.vocab_size}.")
    return _Inputs(encoder, prompt)


def _token_array(name: str, tokens, vocab_size: int) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{name} must be integer token ids shaped [batch, length]; got {tokens.dtype} {tokens.shape}.")
    if not len(tokens):
        raise ValueError(f"{name} has no rows; pass at least one example.")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(
            f"{name} holds ids outside [0, vocab_size={vocab_size}): min {tokens.min()}, max {tokens.max()}."
        )
    return tokens.astype(np.int32)
