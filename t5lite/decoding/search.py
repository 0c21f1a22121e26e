"""Token choice over any step function: greedy, sampling and beam search, each one `lax.while_loop`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from t5lite.decoding.options import DecodingOptions, Generation

# Finite, so that a score plus a log-probability stays a number on dead beams.
NEG_INF = -1e9

Step = Callable[[Any, jax.Array], tuple[jax.Array, Any]]  # (cache, tokens [B]) -> (logits [B, V], cache)


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


class Rows(NamedTuple):
    """Per-row facts the loops share: at `position`, is the row still being fed its prompt, which
    prompt token, and which output slot (position - prompt length; 0 while forced) a token fills."""

    forced: jax.Array
    prompt_token: jax.Array
    slot: jax.Array


def rows_at(position, prompt, lengths) -> Rows:
    prompt, lengths = jnp.asarray(prompt), jnp.asarray(lengths)
    prompt_token = prompt[:, jnp.minimum(position, prompt.shape[1] - 1)]
    return Rows(position < lengths, prompt_token, jnp.maximum(position - lengths, 0))


def is_eos(token, eos_id):
    assert eos_id != "model", "generate() resolves the model's eos_id before sampling or beam search"
    return jnp.zeros(token.shape, bool) if eos_id is None else token == eos_id


def write_at(sequences, slot, token):
    """`sequences` [..., N] with `token` [...] written at index `slot` [...]."""
    return jnp.where(jnp.arange(sequences.shape[-1]) == slot[..., None], token[..., None], sequences)


def loop(step: Step, choose, state):
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
        rows = rows_at(state.position, prompt, lengths)
        penalized = apply_penalties(state.logits, state.counts, options.presence_penalty, options.frequency_penalty)
        if options.suppress_tokens:
            penalized = penalized.at[:, jnp.array(options.suppress_tokens)].set(NEG_INF)
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
            tokens=jnp.where(emit[:, None], write_at(state.tokens, rows.slot, token), state.tokens),
            counts=state.counts + emit[:, None] * jax.nn.one_hot(token, vocab, dtype=jnp.int32),
            scores=state.scores + jnp.where(emit, log_prob, 0.0),
            done=state.done | emit & (is_eos(token, options.eos_id) | (rows.slot == n - 1)),
        )

    state = loop(
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
        rows = rows_at(state.position, prompt, lengths)
        active = ~rows.forced & ~state.done
        penalized = apply_penalties(
            state.logits.reshape(batch, k, vocab), state.counts, options.presence_penalty, options.frequency_penalty
        )
        extended = state.alive_log_probs[..., None] + jax.nn.log_softmax(penalized)
        top_log_probs, top = lax.top_k(extended.reshape(batch, k * vocab), 2 * k)
        beam, token = top // vocab, top % vocab
        sequences = write_at(_take(state.alive, beam), rows.slot[:, None], token)
        ended = is_eos(token, options.eos_id) | (rows.slot == n - 1)[:, None]

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
    state = loop(
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
