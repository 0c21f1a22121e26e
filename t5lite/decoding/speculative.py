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
`generate` maps this over the rows of a batch (a batch of one each), so that no row waits for another.
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


class _Speculation(NamedTuple):
    """What every round uses: the two models, the prompts and the options."""

    target: Callable
    draft: Step
    prompt: jax.Array
    lengths: jax.Array
    options: DecodingOptions
    keys: jax.Array | None

    def pick(self, logits, position, stream):
        """A model's own choice at `position` from its logits [B, V]."""
        if self.options.temperature == 0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return _draw(_keys(self.keys, position, stream), _distribution(logits, self.options))

    def forced(self, position, token):
        rows = rows_at(position, self.prompt, self.lengths)
        return jnp.where(rows.forced, rows.prompt_token, token)

    def emit(self, state, position, token, log_probs, valid=True):
        """Writes `token` at `position` for rows still generating there; `log_probs` [B, V] score it."""
        rows = rows_at(position, self.prompt, self.lengths)
        out = valid & ~rows.forced & ~state.done
        chosen = jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]
        ended = is_eos(token, self.options.eos_id) | (rows.slot == self.options.max_new_tokens - 1)
        return state._replace(
            tokens=jnp.where(out[:, None], write_at(state.tokens, rows.slot, token), state.tokens),
            scores=state.scores + jnp.where(out, chosen, 0.0),
            done=state.done | out & ended,
        )

    def propose(self, state):
        """(the draft's cache, its proposals [B, g], its logits for them [B, g, V]). Its last step only
        writes the last proposal into its cache."""

        def step(carry, offset):
            cache, token = carry
            logits, cache = self.draft(cache, token)
            position = state.position + offset + 1
            proposal = self.forced(position, self.pick(logits, position, _PROPOSE))
            return (cache, proposal), (proposal, logits)

        gamma = self.options.draft_tokens
        (cache, _), (proposals, logits) = lax.scan(step, (state.draft_cache, state.token), jnp.arange(gamma + 1))
        return cache, proposals[:gamma].T, logits[:gamma].swapaxes(0, 1)

    def accepted(self, state, proposals, draft_logits, target_logits):
        """How many leading proposals each row accepts [B]: greedy, those equal to the target's argmax;
        sampling, each with probability min(1, p / q). Prompt tokens are always accepted."""
        gamma, p = self.options.draft_tokens, state.position
        if self.options.temperature == 0:
            agree = proposals == jnp.argmax(target_logits[:, :gamma], axis=-1)
        else:
            p_probs = _distribution(target_logits[:, :gamma], self.options)
            q_probs = _distribution(draft_logits, self.options)
            p_of, q_of = (jnp.take_along_axis(x, proposals[..., None], axis=-1)[..., 0] for x in (p_probs, q_probs))
            u = jnp.stack([jax.vmap(jax.random.uniform)(_keys(self.keys, p + 1 + i, _ACCEPT)) for i in range(gamma)], 1)
            agree = u * q_of <= p_of
        prompted = (p + 1 + jnp.arange(gamma))[None, :] < jnp.asarray(self.lengths)[:, None]  # [B, g]
        return jnp.cumprod(agree | prompted | state.done[:, None], axis=1).sum(axis=1)

    def last_token(self, position, kept, accepted, proposals, draft_logits, target_logits):
        """The token after the `kept` ones: an accepted proposal, else the target's own choice there,
        from max(p - q, 0) after a rejection and from p after the last proposal."""
        gamma, last = self.options.draft_tokens, jnp.minimum(kept, self.options.draft_tokens - 1)
        own_logits = target_logits[:, kept]
        if self.options.temperature == 0:
            own = jnp.argmax(own_logits, axis=-1).astype(jnp.int32)
        else:
            p_next = _distribution(own_logits, self.options)
            q_next = jnp.where(kept < gamma, _distribution(draft_logits[:, last], self.options), 0.0)
            residual = jnp.maximum(p_next - q_next, 0.0)
            residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p_next)
            own = _draw(_keys(self.keys, position, _PICK), residual)
        return self.forced(position, jnp.where(accepted > kept, proposals[:, last], own))

    def round(self, state):
        draft_cache, proposals, draft_logits = self.propose(state)
        fed = jnp.concatenate([state.token[:, None], proposals], axis=1)  # [B, g + 1]
        target_logits, target_cache = self.target(state.target_cache, fed)
        accepted = self.accepted(state, proposals, draft_logits, target_logits)
        kept = jnp.min(accepted)
        end = state.position + kept + 1
        token = self.last_token(end, kept, accepted, proposals, draft_logits, target_logits)
        log_probs = jax.nn.log_softmax(target_logits)  # [B, g + 1, V]
        new = state._replace(rounds=state.rounds + ~state.done)
        for i in range(self.options.draft_tokens):
            new = self.emit(new, state.position + 1 + i, proposals[:, i], log_probs[:, i], valid=i < kept)
        new = self.emit(new, end, token, log_probs[:, kept])
        return new._replace(
            position=end,
            token=token,
            target_cache=rewound(target_cache, end),
            draft_cache=rewound(draft_cache, end),
        )


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
    batch = logits.shape[0]
    speculation = _Speculation(target, draft, prompt, lengths, options, keys)
    state = _State(
        position=jnp.asarray(position, jnp.int32),
        token=speculation.forced(position, speculation.pick(logits, position, _PICK)),
        target_cache=target_cache,
        draft_cache=draft_cache,
        tokens=jnp.zeros((batch, options.max_new_tokens), jnp.int32),
        scores=jnp.zeros(batch, jnp.float32),
        done=jnp.zeros(batch, bool),
        rounds=jnp.zeros(batch, jnp.int32),
    )
    state = speculation.emit(state, position, state.token, jax.nn.log_softmax(logits))
    state = lax.while_loop(lambda s: ~jnp.all(s.done), speculation.round, state)
    return Generation(state.tokens, state.scores, state.rounds)
