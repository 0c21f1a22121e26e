"""`generate`: checks the inputs, then runs one compiled program per prompt-length group: greedy,
sampling, beam search, contrastive search, contrastive decoding or speculative decoding."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5lite.decoding.contrastive import contrastive_logits, contrastive_search, contrastive_step, unit
from t5lite.decoding.options import DecodingOptions, Generation
from t5lite.decoding.search import beam_search, sample
from t5lite.decoding.speculative import speculative_sample
from t5lite.decoding.steps import batch_axes, decoding_model, model_step, one_token, reorder_rows, unstacked


class _Decoder(NamedTuple):
    """A model ready to decode a batch: its (unstacked, on the CPU) parameters and encoded inputs."""

    model: nn.Module
    params: Any
    encoder_args: tuple  # (encoded [B, S, D], encoder_input_tokens [B, S]) or ()

    def step(self, hidden: bool = False, repeats: int = 1):
        """The model over its cache for `repeats` rows per row of the batch."""
        encoder_args = tuple(jnp.repeat(x, repeats, axis=0) for x in self.encoder_args)
        return model_step(self.model, self.params, encoder_args, hidden)

    def allocate(self, *args):
        """(encoder args..., tokens [B, L]) -> an empty cache for L positions (batch axis first in all)."""
        return model_step(self.model, self.params, args[:-1])(None, args[-1])[1]

    def prefill(self, prompt, prefilled: int, prefix_lm: bool, cache_length: int, hidden: bool = False):
        """(outputs at the first `prefilled` positions of each row, the cache holding them)."""
        batch = prompt.shape[0]
        cache = self.allocate(*self.encoder_args, jnp.zeros((batch, cache_length), jnp.int32))
        features = {"decoder_causal_attention": jnp.ones((batch, prefilled), jnp.int32)} if prefix_lm else {}
        return self.step(hidden)(cache, prompt[:, :prefilled], **features)

    def reorder(self, cache_length: int):
        """`reorder_cache(cache, index)`: gathers rows of this decoder's caches of any batch."""
        inputs = (*self.encoder_args, jnp.zeros((1, cache_length), jnp.int32))
        inputs = tuple(x[:1] for x in inputs)
        return functools.partial(reorder_rows, axes=batch_axes(self.allocate, *inputs))


def _decoder(model, params, encoder_input_tokens, unstack: bool) -> _Decoder:
    if unstack:
        params = unstacked(params, model.config)
    if encoder_input_tokens is None:
        return _Decoder(model, params, ())
    encoded = model.apply({"params": params}, encoder_input_tokens, enable_dropout=False, method=model.encode)
    return _Decoder(model, params, (encoded, encoder_input_tokens))


def lookahead(options: DecodingOptions, assistant: str | None) -> int:
    """Positions a method feeds beyond the last chosen token: a speculative round's proposals, and
    contrastive search's feed of the token it picks."""
    if assistant == "draft":
        return options.draft_tokens + 1
    return int(options.degeneration_penalty > 0)


def _speculative_row(
    model,
    params,
    draft,
    draft_params,
    encoder_input_tokens,
    prompt,
    lengths,
    keys,
    *,
    options,
    prefilled,
    prefix_lm,
    unstack,
    cache_length,
) -> Generation:
    """Speculative decoding of a batch of one. `_generate` maps it over the rows (vmap), so that each
    row keeps its own cache position: in a batch, a round keeps only the fewest proposals any row
    accepted (the cache has one write position), and with many rows that is nearly always none."""
    prefill = functools.partial(
        _Decoder.prefill, prompt=prompt, prefilled=prefilled, prefix_lm=prefix_lm, cache_length=cache_length
    )
    target = _decoder(model, params, encoder_input_tokens, unstack[0])
    second = _decoder(draft, draft_params, encoder_input_tokens, unstack[1])
    (logits, cache), (_, draft_cache) = prefill(target), prefill(second)
    target_step, draft_step = target.step(), one_token(second.step())
    return speculative_sample(
        target_step, draft_step, cache, draft_cache, logits[:, -1], prompt, lengths, prefilled, options, keys
    )


@functools.partial(
    jax.jit, static_argnames=("model", "helper", "assistant", "options", "prefilled", "prefix_lm", "unstack")
)
def _generate(
    model,
    params,
    helper,
    helper_params,
    encoder_input_tokens,
    prompt,
    lengths,
    keys,
    *,
    assistant,
    options,
    prefilled,
    prefix_lm,
    unstack,
):
    """`helper` is the draft or the amateur (`assistant` says which) or None; `unstack` a pair of flags."""
    batch, width = prompt.shape
    # The last token chosen is never fed, so the highest position fed is width + N - 2 (+ lookahead).
    cache_length = width + options.max_new_tokens - 1 + lookahead(options, assistant)
    if assistant == "draft":
        by_row = functools.partial(
            _speculative_row,
            model,
            params,
            helper,
            helper_params,
            options=options,
            prefilled=prefilled,
            prefix_lm=prefix_lm,
            unstack=unstack,
            cache_length=cache_length,
        )
        one_row = lambda x: None if x is None else x[:, None]
        generation = jax.vmap(by_row)(*map(one_row, (encoder_input_tokens, prompt, lengths, keys)))
        return jax.tree.map(lambda x: x[:, 0], generation)
    target = _decoder(model, params, encoder_input_tokens, unstack[0])
    prefill = functools.partial(
        _Decoder.prefill, prompt=prompt, prefilled=prefilled, prefix_lm=prefix_lm, cache_length=cache_length
    )
    if options.degeneration_penalty > 0:
        (logits, hidden), cache = prefill(target, hidden=True)
        context = jnp.zeros((batch, cache_length, hidden.shape[-1]), jnp.float32).at[:, :prefilled].set(unit(hidden))
        step = target.step(hidden=True, repeats=options.top_k)
        reorder = target.reorder(cache_length)
        return contrastive_search(step, cache, logits[:, -1], context, prompt, lengths, prefilled, options, reorder)
    logits, cache = prefill(target)
    logits = logits[:, -1]
    if assistant == "amateur":
        second = _decoder(helper, helper_params, encoder_input_tokens, unstack[1])
        second_logits, second_cache = prefill(second)
        logits = contrastive_logits(
            logits, second_logits[:, -1], options.plausibility_alpha, options.amateur_temperature
        )
        step = contrastive_step(one_token(target.step()), one_token(second.step()), options)
        return sample(step, (cache, second_cache), logits, prompt, lengths, prefilled, options, keys)
    if options.num_beams is None:
        return sample(one_token(target.step()), cache, logits, prompt, lengths, prefilled, options, keys)
    beam_step = one_token(target.step(repeats=options.num_beams))
    return beam_search(beam_step, cache, logits, prompt, lengths, prefilled, options, target.reorder(cache_length))


def generate(
    model: nn.Module,
    params,
    *,
    encoder_input_tokens=None,
    prompt_tokens=None,
    prefix_lm: bool = False,
    options: DecodingOptions = DecodingOptions(),
    rng: jax.Array | None = None,
    draft: tuple[nn.Module, Any] | None = None,
    amateur: tuple[nn.Module, Any] | None = None,
) -> Generation:
    """Generates up to `options.max_new_tokens` tokens per row, compiled with the KV cache.

    encoder_input_tokens [B, S]: the encoder-decoder's inputs (0 is padding).
    prompt_tokens [B, P]: the decoder-only model's prompts, right-padded with 0 and without the
      start token; for the encoder-decoder, an optional forced start of each output.
    prefix_lm: the decoder was trained as a prefix LM; the prompt attends bidirectionally.
    rng: a PRNG key, needed when sampling (temperature > 0). Call with concrete arrays (not under
      jit): prompt lengths decide shapes, and each new (batch, longest, shortest prompt) compiles.
    draft: (model, params) of a smaller model of the same kind and vocabulary: speculative decoding.
    amateur: (model, params) of a weaker model of the same kind and vocabulary: contrastive decoding.
    """
    config = model.config
    if options.eos_id == "model":
        options = dataclasses.replace(options, eos_id=config.eos_id)
    assistant = _checked_assistant(config, options, draft, amateur)
    helper, helper_params = draft or amateur or (None, None)
    inputs = _checked_inputs(config, encoder_input_tokens, prompt_tokens, prefix_lm, options, rng)
    batch = len(inputs.prompt)
    # Row b is fed [start, prompt...]: the start token, then its prompt.
    prompt = np.concatenate([np.full((batch, 1), config.start_id, np.int32), inputs.prompt], axis=1)
    lengths = 1 + np.count_nonzero(inputs.prompt, axis=1)
    positions = lengths.max() + options.max_new_tokens - 1 + lookahead(options, assistant)
    for checked in (config, None if helper is None else helper.config):
        if checked is not None and checked.position_encoding == "learned" and positions > checked.max_length:
            raise ValueError(
                f"The longest prompt ({lengths.max() - 1} tokens, plus the start token) and max_new_tokens="
                f"{options.max_new_tokens} need {positions} learned positions (decoding method included), "
                f"but a model has max_length={checked.max_length}; shorten the prompt or max_new_tokens."
            )
    row_keys = None if rng is None else jax.vmap(jax.random.fold_in, (None, 0))(rng, jnp.arange(batch))
    groups = [np.flatnonzero(lengths == n) for n in np.unique(lengths)] if prefix_lm else [np.arange(batch)]
    model, unstack = decoding_model(model)
    if helper is not None:
        helper, unstack_helper = decoding_model(helper)
        unstack = (unstack, unstack_helper)
    else:
        unstack = (unstack, False)
    outputs = [
        _generate(
            model,
            params,
            helper,
            helper_params,
            None if inputs.encoder is None else inputs.encoder[rows],
            prompt[rows, : lengths[rows].max()],
            lengths[rows],
            None if row_keys is None else row_keys[rows],
            assistant=assistant,
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


def sample_traced(model: nn.Module, params, prompt_tokens, keys, options: DecodingOptions, encoder_input_tokens=None):
    """`generate`'s sampling for a caller that is itself being traced (an RL step): shapes come from
    the arrays, not their values. Rows are fed the start token, then forced their prompt
    (`prompt_tokens` [B, P], right-padded with 0; [B, 0] for an encoder-decoder) a token at a time,
    so one program serves prompts of every length. `keys` [B] are per-row keys; `options.eos_id`
    must be resolved (not "model")."""
    batch = prompt_tokens.shape[0]
    prompt = jnp.concatenate([jnp.full((batch, 1), model.config.start_id, jnp.int32), prompt_tokens], axis=1)
    lengths = 1 + jnp.count_nonzero(prompt_tokens, axis=1)
    model, unstack = decoding_model(model)
    return _generate(
        model,
        params,
        None,
        None,
        encoder_input_tokens,
        prompt,
        lengths,
        keys,
        assistant=None,
        options=options,
        prefilled=1,
        prefix_lm=False,
        unstack=(unstack, False),
    )


def _checked_assistant(config, options: DecodingOptions, draft, amateur) -> str | None:
    """ "draft", "amateur" or None, or a ValueError saying why the pair cannot decode together."""
    if draft is not None and amateur is not None:
        raise ValueError("Give a draft (speculative decoding) or an amateur (contrastive decoding), not both.")
    if draft is None and amateur is None:
        return None
    role = "draft" if draft is not None else "amateur"
    helper = (draft or amateur)[0].config
    if helper.vocab_size != config.vocab_size or helper.is_encoder_decoder != config.is_encoder_decoder:
        raise ValueError(
            f"The {role} must be the same kind of model on the same vocabulary: it is "
            f"{helper.architecture} with vocab_size={helper.vocab_size}, the model {config.architecture} with "
            f"vocab_size={config.vocab_size}."
        )
    if options.num_beams is not None or options.degeneration_penalty > 0:
        raise ValueError(f"A {role} decodes greedily or by sampling: leave num_beams=None and degeneration_penalty=0.")
    if role == "draft" and options.suppress_tokens:
        raise ValueError("Speculative decoding keeps the target's distribution: leave suppress_tokens empty.")
    if role == "draft" and (options.presence_penalty or options.frequency_penalty):
        raise ValueError(
            "Speculative decoding keeps the target's distribution, which repetition penalties change token by "
            "token: leave presence_penalty and frequency_penalty at 0."
        )
    return role


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
    if any(i >= config.vocab_size for i in options.suppress_tokens):
        raise ValueError(
            f"suppress_tokens={options.suppress_tokens} must be below the model's vocab_size={config.vocab_size}."
        )
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
