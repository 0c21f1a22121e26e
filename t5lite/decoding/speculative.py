"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small draft model proposes
`draft_tokens` tokens one at a time, the target scores all of them in one forward pass, and a
rejection step keeps exactly the target's distribution (greedy: exactly its greedy output).

The KV caches keep one write position for the whole batch, so every row of a round keeps the
same number n of draft tokens: the fewest any row accepted. A row that accepted more keeps its
draft token at n + 1 as the round's last token (it was accepted, so it is a sample of the
target's distribution there); a row that stopped at n takes the rejection step's token; if every
row accepted them all, the last token is sampled from the target's next distribution. Stopping a
row early this way never changes what it samples: each token is still drawn from the target's
distribution given the tokens before it. Both caches are then rewound to the kept tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from t5lite.decoding.options import DecodingOptions, Generation
from t5lite.decoding.search import Step, filter_logits, is_eos, rows_at, write_at
from t5lite.decoding.steps import rewound

# Random streams of a row's key at a position: the draft's proposal, the acceptance test, the target's pick.
_PROPOSE, _ACCEPT, _PICK = 0, 1, 2


class _State(NamedTuple):
    position: jax.Array  # of `token`; both caches hold the tokens before it
    token: jax.Array  # [B]: chosen, not yet fed
    target_cache: Any
    draft_cache: Any
    tokens: jax.Array  # [B, N]
    scores: jax.Array  # [B]
    done: jax.Array  # [B]
    rounds: jax.Array  # [B]


def _distribution(logits, options: DecodingOptions):
    """The probabilities [..., V] sampling draws from: temperature, then top-k and top-p."""
    return jax.nn.softmax(filter_logits(logits / options.temperature, options.top_k, options.top_p))


def _keys(keys, position, stream: int):
    return jax.vmap(lambda key: jax.random.fold_in(jax.random.fold_in(key, position), stream))(keys)


def _draw(keys, probs):
    """One token per row from unnormalised probabilities [B, V]."""
    return jax.vmap(jax.random.categorical)(keys, jnp.log(probs)).astype(jnp.int32)


def speculative_sample(
    target: Callable,
    draft: Step,
    target_cache,
    draft_cache,
    logits,
    prompt,
    lengths,
    position: int,
    options: DecodingOptions,
    keys=None,
) -> Generation:
    """Greedy (temperature 0) or sampled decoding of the target, sped up by the draft.

    `target(cache, tokens [B, T]) -> (logits [B, T, V], cache)`; `draft` is a one-token step. Both
    caches hold positions < `position`, where `logits` [B, V] are the target's prediction; the rest
    as for `search.sample` (no repetition penalties: they would change the distribution per token).
    Generation.rounds counts each row's target passes after the prefill.
    """
    batch, vocab = logits.shape
    gamma, n = options.draft_tokens, options.max_new_tokens
    greedy = options.temperature == 0
    rows_index = jnp.arange(batch)

    def pick(logits, position, stream):  # the target's (or draft's) own choice at `position`
        if greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return _draw(_keys(keys, position, stream), _distribution(logits, options))

    def forced(position, token):
        rows = rows_at(position, prompt, lengths)
        return jnp.where(rows.forced, rows.prompt_token, token)

    def emit(state, position, token, log_probs, valid=True):
        """Writes `token` at `position` for rows still generating there."""
        rows = rows_at(position, prompt, lengths)
        out = valid & ~rows.forced & ~state.done
        return state._replace(
            tokens=jnp.where(out[:, None], write_at(state.tokens, rows.slot, token), state.tokens),
            scores=state.scores + jnp.where(out, log_probs[rows_index, token], 0.0),
            done=state.done | out & (is_eos(token, options.eos_id) | (rows.slot == n - 1)),
        )

    def propose(carry, offset):
        cache, token, p = carry
        logits, cache = draft(cache, token)
        proposal = forced(p + offset + 1, pick(logits, p + offset + 1, _PROPOSE))
        return (cache, proposal, p), (proposal, logits)

    def round_(state):
        p = state.position
        # The draft proposes gamma tokens; its last step only writes the last proposal into its cache.
        (draft_cache, _, _), (proposals, draft_logits) = lax.scan(
            propose, (state.draft_cache, state.token, p), jnp.arange(gamma + 1)
        )
        proposals, draft_logits = proposals[:gamma].T, draft_logits[:gamma].swapaxes(0, 1)  # [B, g], [B, g, V]
        target_logits, target_cache = target(state.target_cache, jnp.concatenate([state.token[:, None], proposals], 1))
        positions = p + 1 + jnp.arange(gamma)  # of the proposals
        prompted = positions[None, :] < jnp.asarray(lengths)[:, None]  # [B, g]
        if greedy:
            agree = proposals == jnp.argmax(target_logits[:, :gamma], axis=-1)
        else:
            p_probs, q_probs = _distribution(target_logits[:, :gamma], options), _distribution(draft_logits, options)
            p_of, q_of = (jnp.take_along_axis(x, proposals[..., None], axis=-1)[..., 0] for x in (p_probs, q_probs))
            u = jnp.stack([jax.vmap(jax.random.uniform)(_keys(keys, p + 1 + i, _ACCEPT)) for i in range(gamma)], 1)
            agree = u * q_of <= p_of  # accept with probability min(1, p / q)
        accepted = jnp.cumprod(agree | prompted | state.done[:, None], axis=1).sum(axis=1)  # [B]
        kept = jnp.min(accepted)
        # The token after the kept ones: an accepted proposal, else the target's own choice there (from
        # max(p - q, 0) after a rejection, from p after the last proposal).
        last = jnp.minimum(kept, gamma - 1)
        own_logits = target_logits[:, kept]
        if greedy:
            own = jnp.argmax(own_logits, axis=-1).astype(jnp.int32)
        else:
            p_next = _distribution(own_logits, options)
            q_next = jnp.where(kept < gamma, _distribution(draft_logits[:, last], options), 0.0)
            residual = jnp.maximum(p_next - q_next, 0.0)
            residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p_next)
            own = _draw(_keys(keys, p + kept + 1, _PICK), residual)
        token = forced(p + kept + 1, jnp.where(accepted > kept, proposals[:, last], own))

        log_probs = jax.nn.log_softmax(target_logits)  # [B, g + 1, V]
        new = state._replace(rounds=state.rounds + ~state.done)
        for i in range(gamma):  # the kept proposals, then the round's last token
            new = emit(new, p + 1 + i, proposals[:, i], log_probs[:, i], valid=i < kept)
        new = emit(new, p + kept + 1, token, log_probs[:, kept])
        return new._replace(
            position=p + kept + 1,
            token=token,
            target_cache=rewound(target_cache, p + kept + 1),
            draft_cache=rewound(draft_cache, p + kept + 1),
        )

    state = _State(
        position=jnp.asarray(position, jnp.int32),
        token=forced(position, pick(logits, position, _PICK)),
        target_cache=target_cache,
        draft_cache=draft_cache,
        tokens=jnp.zeros((batch, n), jnp.int32),
        scores=jnp.zeros(batch, jnp.float32),
        done=jnp.zeros(batch, bool),
        rounds=jnp.zeros(batch, jnp.int32),
    )
    state = emit(state, position, state.token, jax.nn.log_softmax(logits))
    state = lax.while_loop(lambda s: ~jnp.all(s.done), round_, state)
    return Generation(state.tokens, state.scores, state.rounds)
