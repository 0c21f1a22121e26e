"""Generation with the KV cache: greedy, sampling (temperature, top-k, top-p) and beam search.

Generation is one compiled program: encode, allocate the cache, prefill, then a
`lax.while_loop` that feeds one token per step and stops as soon as every row is finished.
It is compiled once per input shape and `DecodingOptions` value (the options are static).

What a row is fed: the model's start token (`ModelConfig.start_id`: T5's 0, Llama's BOS), then
its prompt. This is how seqio's feature converters shift decoder inputs, so a decoder-only model
sees the prompt as it saw text in training, and an empty prompt still leaves a token to condition
on (for the encoder-decoder a prompt is an optional forced start of the output). Prompts come
right-padded with 0.

Prompts of different lengths in one batch: the cache keeps one write position for the whole
batch and masks no keys, so rows cannot be padded to a common length. The batch is prefilled
over its shortest prompt in one chunk, and the rest of each longer prompt is force-fed a token
per step inside the loop before that row starts generating. A prefix-LM prompt has to be in
one chunk (its tokens attend to each other), so `generate` splits a prefix-LM batch into groups
of equal prompt length, one compiled call per group; per-row random keys make the result
independent of that split.

Scores are summed log-probabilities of the generated tokens (EOS included) after the
repetition penalties, before temperature and top-k/top-p; beam search divides them by its
length penalty, which is also what it ranks sequences by.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax import lax

from t5lite.models import build
from t5lite.models.params import unstack_layers

# Finite, so that a score plus a log-probability stays a number on dead beams.
NEG_INF = -1e9

Step = Callable[[Any, jax.Array], tuple[jax.Array, Any]]  # (cache, tokens [B]) -> (logits [B, V], cache)


@dataclasses.dataclass(frozen=True)
class DecodingOptions:
    """How to pick tokens: greedy (temperature 0), sampling, or beam search (num_beams set)."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter
    # Beam search with this many beams; None samples (greedy at temperature 0). With length_penalty=0,
    # one beam finds the greedy sequence.
    num_beams: int | None = None
    # GNMT's alpha: beam search ranks log p(y) / ((5 + |y|) / 6) ** alpha; 0 ranks by log p(y).
    length_penalty: float = 0.6
    # OpenAI's: logit -= frequency_penalty * count + presence_penalty * (count > 0), counting
    # the tokens generated so far in the row (prompt tokens are not counted).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    eos_id: int | str | None = "model"  # "model": ModelConfig.eos_id; None: always generate max_new_tokens

    def __post_init__(self):
        _require(
            "max_new_tokens",
            self.max_new_tokens,
            _is_int(self.max_new_tokens) and self.max_new_tokens > 0,
            "a positive integer",
        )
        _require(
            "temperature",
            self.temperature,
            _is_real(self.temperature) and self.temperature >= 0,
            "a finite number >= 0 (0 is greedy)",
        )
        _require("top_k", self.top_k, _is_int(self.top_k) and self.top_k >= 0, "an integer >= 0 (0 turns it off)")
        _require("top_p", self.top_p, _is_real(self.top_p) and 0 < self.top_p <= 1, "in (0, 1] (1 turns it off)")
        _require(
            "num_beams",
            self.num_beams,
            self.num_beams is None or _is_int(self.num_beams) and self.num_beams >= 1,
            "None (no beam search) or an integer >= 1",
        )
        _require(
            "length_penalty",
            self.length_penalty,
            _is_real(self.length_penalty) and self.length_penalty >= 0,
            "a finite number >= 0 (0 ranks beams by log-probability alone)",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            _require(name, getattr(self, name), _is_real(getattr(self, name)), "a finite number")
        _require(
            "eos_id",
            self.eos_id,
            self.eos_id in (None, "model") or _is_int(self.eos_id) and self.eos_id > 0,
            '"model" (the model\'s eos_id), None or a positive token id (0 is padding)',
        )
        if self.num_beams is not None and (self.temperature > 0 or self.top_k or self.top_p < 1):
            raise ValueError(
                f"num_beams={self.num_beams} asks for beam search, which does not sample: leave "
                "temperature=0, top_k=0 and top_p=1, or num_beams=None to sample."
            )


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _require(name: str, value, ok: bool, requirement: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} must be {requirement}.")


class Generation(NamedTuple):
    tokens: jax.Array  # [batch, max_new_tokens]: generated tokens, EOS included, 0 after it
    scores: jax.Array  # [batch]: see the module docstring


def apply_penalties(logits, counts, presence_penalty: float, frequency_penalty: float):
    """OpenAI's repetition penalties; `counts` [..., vocab] says how often each token was generated."""
    return logits - frequency_penalty * counts - presence_penalty * (counts > 0)


def filter_logits(logits, top_k: int = 0, top_p: float = 1.0):
    """Sets to NEG_INF every logit outside the k largest, then outside the nucleus: the fewest
    most likely tokens whose probabilities add up to at least `top_p`."""
    if top_k:
        kth_largest = lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth_largest, NEG_INF, logits)
    if top_p < 1:
        descending = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(descending, axis=-1)
        kept = jnp.sum(jnp.cumsum(probs, axis=-1) - probs < top_p, axis=-1, keepdims=True)
        logits = jnp.where(logits < jnp.take_along_axis(descending, kept - 1, axis=-1), NEG_INF, logits)
    return logits


def length_penalty(length, alpha: float):
    return ((5.0 + length) / 6.0) ** alpha


class _Rows(NamedTuple):
    """Per-row facts the loops share: at `position`, is the row still being fed its prompt, which
    prompt token, and which output slot (position - prompt length; 0 while forced) a token fills."""

    forced: jax.Array
    prompt_token: jax.Array
    slot: jax.Array


def _rows(position, prompt, lengths) -> _Rows:
    prompt, lengths = jnp.asarray(prompt), jnp.asarray(lengths)
    prompt_token = prompt[:, jnp.minimum(position, prompt.shape[1] - 1)]
    return _Rows(position < lengths, prompt_token, jnp.maximum(position - lengths, 0))


def _is_eos(token, eos_id):
    assert eos_id != "model", "generate() resolves the model's eos_id before sampling or beam search"
    return jnp.zeros(token.shape, bool) if eos_id is None else token == eos_id


def _write(sequences, slot, token):
    """`sequences` [..., N] with `token` [...] written at index `slot` [...]."""
    return jnp.where(jnp.arange(sequences.shape[-1]) == slot[..., None], token[..., None], sequences)


def _loop(step: Step, choose, state):
    """Chooses a token, then feeds it and chooses the next until every row is done; the loop
    state carries `position`, `logits`, `cache`, `token` (chosen last) and `done`."""

    def feed_and_choose(state):
        logits, cache = step(state.cache, state.token)
        return choose(state._replace(position=state.position + 1, logits=logits, cache=cache))

    return lax.while_loop(lambda s: ~jnp.all(s.done), feed_and_choose, choose(state))


class _SampleState(NamedTuple):
    position: jax.Array  # of the token chosen next
    logits: jax.Array  # [B, V], predicting it
    cache: Any
    token: jax.Array  # [B]
    tokens: jax.Array  # [B, N]
    counts: jax.Array  # [B, V]
    scores: jax.Array  # [B]
    done: jax.Array  # [B]


def sample(
    step: Step, cache, logits, prompt, lengths, position: int, options: DecodingOptions, keys=None
) -> Generation:
    """Greedy (temperature 0) or sampled decoding from any step function.

    `logits` [B, V] predict the token at `position` (the number of tokens already in the cache);
    row b is first force-fed prompt[b, position:lengths[b]]. `keys` [B] are per-row random keys,
    needed when temperature > 0; a step's key folds in the position.
    """
    batch, vocab = logits.shape
    n = options.max_new_tokens

    def choose(state):
        rows = _rows(state.position, prompt, lengths)
        penalized = apply_penalties(state.logits, state.counts, options.presence_penalty, options.frequency_penalty)
        if options.temperature == 0:
            picked = jnp.argmax(penalized, axis=-1)
        else:
            step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, state.position)
            filtered = filter_logits(penalized / options.temperature, options.top_k, options.top_p)
            picked = jax.vmap(jax.random.categorical)(step_keys, filtered)
        emit = ~rows.forced & ~state.done
        token = jnp.where(rows.forced, rows.prompt_token, jnp.where(emit, picked, 0)).astype(jnp.int32)
        log_prob = jnp.take_along_axis(jax.nn.log_softmax(penalized), token[:, None], axis=-1)[:, 0]
        return state._replace(
            token=token,
            tokens=jnp.where(emit[:, None], _write(state.tokens, rows.slot, token), state.tokens),
            counts=state.counts + emit[:, None] * jax.nn.one_hot(token, vocab, dtype=jnp.int32),
            scores=state.scores + jnp.where(emit, log_prob, 0.0),
            done=state.done | emit & (_is_eos(token, options.eos_id) | (rows.slot == n - 1)),
        )

    state = _loop(
        step,
        choose,
        _SampleState(
            position=jnp.asarray(position, jnp.int32),
            logits=logits,
            cache=cache,
            token=jnp.zeros(batch, jnp.int32),
            tokens=jnp.zeros((batch, n), jnp.int32),
            counts=jnp.zeros((batch, vocab), jnp.int32),
            scores=jnp.zeros(batch, jnp.float32),
            done=jnp.zeros(batch, bool),
        ),
    )
    return Generation(state.tokens, state.scores)


class _BeamState(NamedTuple):
    position: jax.Array
    logits: jax.Array  # [B * K, V]
    cache: Any  # batch B * K
    token: jax.Array  # [B * K]
    alive: jax.Array  # [B, K, N]: unfinished sequences, best first
    alive_log_probs: jax.Array  # [B, K]
    counts: jax.Array  # [B, K, V]
    finished: jax.Array  # [B, K, N]: best finished sequences, best first
    finished_scores: jax.Array  # [B, K], length-penalised; NEG_INF in empty places
    done: jax.Array  # [B]


def _take(x, index):
    """x[b, index[b, i], ...] for x [B, K, ...] and index [B, M]."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def beam_search(
    step: Step,
    cache,
    logits,
    prompt,
    lengths,
    position: int,
    options: DecodingOptions,
    reorder_cache: Callable[[Any, jax.Array], Any],
) -> Generation:
    """Beam search with a length penalty from any step function; returns each row's best sequence.

    Arguments as for `sample`, except that `cache` and `logits` have batch B while `step` runs on
    B * K rows, K = num_beams (row b's beams are rows b*K .. b*K+K-1); `reorder_cache(cache,
    index)` gathers cache rows. Each step takes the 2K best extensions, so that at least K of them
    do not end in EOS: those stay alive; the ones among the best K that end (in EOS, or at
    max_new_tokens) compete for the K finished places. Only the best K may finish, as in Hugging
    Face's beam search, so that one beam is greedy search. A row is done when no alive beam can
    still beat its K-th finished one.
    """
    batch, vocab = logits.shape
    k, n, alpha = options.num_beams, options.max_new_tokens, options.length_penalty

    def choose(state):
        rows = _rows(state.position, prompt, lengths)
        active = ~rows.forced & ~state.done
        penalized = apply_penalties(
            state.logits.reshape(batch, k, vocab), state.counts, options.presence_penalty, options.frequency_penalty
        )
        extended = state.alive_log_probs[..., None] + jax.nn.log_softmax(penalized)
        top_log_probs, top = lax.top_k(extended.reshape(batch, k * vocab), 2 * k)
        beam, token = top // vocab, top % vocab
        sequences = _write(_take(state.alive, beam), rows.slot[:, None], token)
        ended = _is_eos(token, options.eos_id) | (rows.slot == n - 1)[:, None]

        penalized_scores = top_log_probs / length_penalty(rows.slot + 1, alpha)[:, None]
        finishing = jnp.where(ended & (jnp.arange(2 * k) < k), penalized_scores, NEG_INF)
        finished_scores, best = lax.top_k(jnp.concatenate([state.finished_scores, finishing], axis=1), k)
        finished = _take(jnp.concatenate([state.finished, sequences], axis=1), best)

        alive_log_probs, best = lax.top_k(jnp.where(ended, NEG_INF, top_log_probs), k)
        beam, token = _take(beam, best), _take(token, best)
        hopeless = finished_scores[:, -1] >= alive_log_probs[:, 0] / length_penalty(n, alpha)

        def update(new, old):  # rows still fed their prompt, or done, keep their beams
            return jnp.where(active.reshape((batch,) + (1,) * (old.ndim - 1)), new, old)

        beam = update(beam, jnp.broadcast_to(jnp.arange(k), (batch, k)))
        idle_token = jnp.where(rows.forced, rows.prompt_token, 0)[:, None]
        return state._replace(
            cache=reorder_cache(state.cache, (beam + k * jnp.arange(batch)[:, None]).reshape(-1)),
            token=update(token, jnp.broadcast_to(idle_token, (batch, k))).reshape(-1).astype(jnp.int32),
            alive=update(_take(sequences, best), state.alive),
            alive_log_probs=update(alive_log_probs, state.alive_log_probs),
            counts=update(_take(state.counts, beam) + jax.nn.one_hot(token, vocab, dtype=jnp.int32), state.counts),
            finished=update(finished, state.finished),
            finished_scores=update(finished_scores, state.finished_scores),
            done=state.done | active & ((rows.slot == n - 1) | hopeless),
        )

    first_beam_only = jnp.where(jnp.arange(k) == 0, 0.0, NEG_INF)  # a row's K copies are one beam so far
    state = _loop(
        step,
        choose,
        _BeamState(
            position=jnp.asarray(position, jnp.int32),
            logits=jnp.repeat(logits, k, axis=0),
            cache=reorder_cache(cache, jnp.repeat(jnp.arange(batch), k)),
            token=jnp.zeros(batch * k, jnp.int32),
            alive=jnp.zeros((batch, k, n), jnp.int32),
            alive_log_probs=jnp.broadcast_to(first_beam_only, (batch, k)),
            counts=jnp.zeros((batch, k, vocab), jnp.int32),
            finished=jnp.zeros((batch, k, n), jnp.int32),
            finished_scores=jnp.full((batch, k), NEG_INF),
            done=jnp.zeros(batch, bool),
        ),
    )
    return Generation(state.finished[:, 0], state.finished_scores[:, 0])


def _model_step(model: nn.Module, params, encoder_args: tuple):
    """(cache or None, tokens [B, T], **features) -> (logits [B, T, V], cache); None allocates."""
    method = model.decode if encoder_args else None

    def apply(cache, tokens, **features):
        variables = {"params": params} if cache is None else {"params": params, "cache": cache}
        logits, mutated = model.apply(
            variables,
            *encoder_args,
            tokens,
            enable_dropout=False,
            decode=True,
            mutable=["cache"],
            method=method,
            **features,
        )
        return logits, mutated["cache"]

    return apply


def _one_token(apply) -> Step:
    def step(cache, token):
        logits, cache = apply(cache, token[:, None])
        return logits[:, 0], cache

    return step


def _batch_axes(allocate, *inputs) -> list[int | None]:
    """The batch axis of each cache leaf (None for leaves shared by all rows, like the write
    position): the axis that grows when the batch does. Found from shapes, so that it holds for
    scanned and unrolled layers alike."""
    grown = [jax.ShapeDtypeStruct((x.shape[0] + 1, *x.shape[1:]), x.dtype) for x in inputs]
    small, large = (jax.tree.leaves(jax.eval_shape(allocate, *args)) for args in (inputs, grown))
    return [next((i for i, (a, b) in enumerate(zip(s.shape, l.shape)) if a != b), None) for s, l in zip(small, large)]


def _reorder(cache, index, axes):
    leaves, treedef = jax.tree.flatten(cache)
    return jax.tree.unflatten(
        treedef, [x if axis is None else jnp.take(x, index, axis=axis) for x, axis in zip(leaves, axes)]
    )


def _decoding_model(model: nn.Module) -> tuple[nn.Module, bool]:
    """(the model decoding runs, whether its parameters must be unstacked first). On the CPU a scanned
    model decodes with its layers unrolled: XLA:CPU copies each layer's weights and cache out of the
    stacked arrays at every token (a fifth of T5-small's greedy decoding time). On TPU and GPU, which
    read them in place, the stacked parameters stay (unstacking would hold a second copy of them)."""
    if not model.config.scan_layers or jax.default_backend() != "cpu":
        return model, False
    return build(model.config.replace(scan_layers=False)), True


def _unstacked(params, config):
    flat = traverse_util.flatten_dict(params, sep="/")
    return traverse_util.unflatten_dict(unstack_layers(flat, config), sep="/")


@functools.partial(jax.jit, static_argnames=("model", "options", "prefilled", "prefix_lm", "unstack"))
def _generate(model, params, encoder_input_tokens, prompt, lengths, keys, *, options, prefilled, prefix_lm, unstack):
    batch, width = prompt.shape
    if unstack:
        params = _unstacked(params, model.config)
    encoder_args = ()
    if encoder_input_tokens is not None:
        encoded = model.apply({"params": params}, encoder_input_tokens, enable_dropout=False, method=model.encode)
        encoder_args = (encoded, encoder_input_tokens)

    def allocate(*args):  # (encoder args..., tokens): every argument has the batch axis first
        return _model_step(model, params, args[:-1])(None, args[-1])[1]

    # The last token chosen is never fed, so the highest position fed is width + N - 2.
    allocation = jnp.zeros((batch, width + options.max_new_tokens - 1), jnp.int32)
    cache = allocate(*encoder_args, allocation)
    apply = _model_step(model, params, encoder_args)
    features = {"decoder_causal_attention": jnp.ones((batch, prefilled), jnp.int32)} if prefix_lm else {}
    logits, cache = apply(cache, prompt[:, :prefilled], **features)
    logits = logits[:, -1]
    if options.num_beams is None:
        return sample(_one_token(apply), cache, logits, prompt, lengths, prefilled, options, keys)
    repeat = functools.partial(jnp.repeat, repeats=options.num_beams, axis=0)
    beam_step = _one_token(_model_step(model, params, tuple(map(repeat, encoder_args))))
    reorder = functools.partial(_reorder, axes=_batch_axes(allocate, *encoder_args, allocation))
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
    model, unstack = _decoding_model(model)
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
