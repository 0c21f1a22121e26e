"""Decoding against degeneration: contrastive decoding (Li et al. 2023, "Contrastive Decoding: Open-ended
Text Generation as Optimization") and contrastive search (Su et al. 2022, "A Contrastive Framework for
Neural Text Generation").

Contrastive decoding needs a second, weaker model (the amateur: a smaller or less trained run on
the same vocabulary) and changes only the logits, so it runs inside `search.sample`: greedy, or
sampled at a temperature. Contrastive search needs the model's final hidden states: each step
feeds all top-k candidates at once (B * k rows) and keeps the cache row of the one it picks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from t5lite.decoding.options import DecodingOptions, Generation
from t5lite.decoding.search import NEG_INF, Step, is_eos, rows_at, write_at


def contrastive_logits(expert_logits, amateur_logits, alpha: float, amateur_temperature: float = 1.0):
    """log p_expert - log p_amateur [..., V] over the plausible tokens, those with p_expert >= alpha *
    max p_expert; NEG_INF elsewhere. The constraint keeps the amateur from promoting tokens the expert
    finds implausible (where both models are unsure, the difference is large and meaningless)."""
    expert = jax.nn.log_softmax(expert_logits)
    amateur = jax.nn.log_softmax(amateur_logits / amateur_temperature)
    plausible = expert >= jnp.log(alpha) + jnp.max(expert, axis=-1, keepdims=True)
    return jnp.where(plausible, expert - amateur, NEG_INF)


def contrastive_step(expert: Step, amateur: Step, options: DecodingOptions) -> Step:
    """Steps both models on the same tokens; the cache is the pair of their caches."""

    def step(caches, token):
        expert_logits, expert_cache = expert(caches[0], token)
        amateur_logits, amateur_cache = amateur(caches[1], token)
        logits = contrastive_logits(
            expert_logits, amateur_logits, options.plausibility_alpha, options.amateur_temperature
        )
        return logits, (expert_cache, amateur_cache)

    return step


class _SearchState(NamedTuple):
    position: jax.Array  # of the token chosen next
    logits: jax.Array  # [B, V], predicting it
    cache: Any
    context: jax.Array  # [B, L, D]: unit-length final hidden states of the tokens fed so far
    tokens: jax.Array  # [B, N]
    scores: jax.Array  # [B]
    done: jax.Array  # [B]


def unit(hidden):
    """Hidden states scaled to length 1 (in float32), so that dot products are cosine similarities."""
    hidden = hidden.astype(jnp.float32)
    return hidden / jnp.maximum(jnp.linalg.norm(hidden, axis=-1, keepdims=True), 1e-12)


def contrastive_search(
    step: Callable,
    cache,
    logits,
    context,
    prompt,
    lengths,
    position: int,
    options: DecodingOptions,
    reorder_cache: Callable[[Any, jax.Array], Any],
) -> Generation:
    """Contrastive search: of the top_k likeliest next tokens v, the one maximising
    (1 - alpha) p(v) - alpha max_j cos(h_v, h_j), h the final hidden states, j every earlier position.

    `logits` [B, V] predict the token at `position`; `context` [B, L, D] holds the unit hidden states of
    positions < `position` (L: the cache's length). `step(cache, tokens [B * k, 1]) -> ((logits, hidden),
    cache)` runs k rows per row (row b's are b*k .. b*k+k-1), `reorder_cache` gathers cache rows.
    Prompts, scores and EOS as in `search.sample`.
    """
    batch, _ = logits.shape
    k, n, alpha = options.top_k, options.max_new_tokens, options.degeneration_penalty
    rows_index = jnp.arange(batch)

    def choose_and_feed(state):
        rows = rows_at(state.position, prompt, lengths)
        probs = jax.nn.softmax(state.logits)
        top_probs, candidates = lax.top_k(probs, k)  # [B, k]
        candidates = jnp.where(rows.forced[:, None], rows.prompt_token[:, None], candidates).astype(jnp.int32)
        expanded = reorder_cache(state.cache, jnp.repeat(rows_index, k))
        (next_logits, hidden), cache = step(expanded, candidates.reshape(-1, 1))
        hidden = unit(hidden[:, 0]).reshape(batch, k, -1)  # [B, k, D]
        similarity = jnp.einsum("bkd,bld->bkl", hidden, state.context)
        earlier = jnp.arange(state.context.shape[1]) < state.position
        degeneration = jnp.max(jnp.where(earlier, similarity, -jnp.inf), axis=-1)  # [B, k]
        best = jnp.where(rows.forced, 0, jnp.argmax((1 - alpha) * top_probs - alpha * degeneration, axis=-1))
        token = candidates[rows_index, best]
        chosen = rows_index * k + best
        emit = ~rows.forced & ~state.done
        log_prob = jnp.log(probs[rows_index, token])
        return state._replace(
            position=state.position + 1,
            logits=next_logits[chosen, 0],
            cache=reorder_cache(cache, chosen),
            context=state.context.at[rows_index, state.position].set(hidden[rows_index, best]),
            tokens=jnp.where(emit[:, None], write_at(state.tokens, rows.slot, token), state.tokens),
            scores=state.scores + jnp.where(emit, log_prob, 0.0),
            done=state.done | emit & (is_eos(token, options.eos_id) | (rows.slot == n - 1)),
        )

    state = lax.while_loop(
        lambda s: ~jnp.all(s.done),
        choose_and_feed,
        _SearchState(
            position=jnp.asarray(position, jnp.int32),
            logits=logits,
            cache=cache,
            context=context,
            tokens=jnp.zeros((batch, n), jnp.int32),
            scores=jnp.zeros(batch, jnp.float32),
            done=jnp.zeros(batch, bool),
        ),
    )
    return Generation(state.tokens, state.scores)
