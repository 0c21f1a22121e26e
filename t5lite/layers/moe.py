"""Switch-style mixture-of-experts MLP: a float32 router, capacity-limited dispatch, auxiliary losses.

Tokens are routed in groups (each sequence split into equal groups of at most `group_size`
tokens). An expert processes at most `capacity` tokens of a group; a token no expert keeps gets
a zero output, so the residual carries it through unchanged. Outputs are weighted by the router
probability of each kept (token, expert) pair.

Dispatch and combine are one-hot einsums. Under a mesh the dispatched tokens [experts, groups,
capacity, embed] are constrained to split experts over the `expert` mesh axis while groups
stay split over the batch axes: XLA moves them with an all-to-all, runs every expert on its own
devices, and moves the outputs back the same way (GShard / Switch expert parallelism).
The dropless mode sorts token copies by expert and runs grouped matmuls (`lax.ragged_dot`).

Per layer, the module sows into the "moe" collection (when the caller makes it mutable): the
load-balancing and router z-losses and usage diagnostics; `moe_summary` reduces them over layers.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5lite.layers.dense import DenseGeneral
from t5lite.layers.mlp import ACTIVATIONS

# Router weights start small (Switch: 0.1 of the usual scale) so early routing is near uniform.
ROUTER_INIT_SCALE = 0.1


class Routing(NamedTuple):
    dispatch: jax.Array  # [groups, tokens, experts, capacity] 1.0 where that slot holds that token
    combine: jax.Array  # same shape, float32: the router probability of each kept pair
    picks: jax.Array  # [groups, tokens, experts]: each token's share of picks per expert, before capacity


def expert_capacity(group_size: int, num_experts: int, k: int, factor: float, minimum: int) -> int:
    """Slots per expert and group: ceil(factor·group·k/experts), at least `minimum`, at most the group
    (factor 0: exactly `minimum`, a fixed capacity as Hugging Face's Switch has)."""
    return min(group_size, max(minimum, math.ceil(factor * group_size * k / num_experts)))


def tokens_choose(probs: jax.Array, k: int, capacity: int, causal: bool = False) -> Routing:
    """Each token picks its k most probable experts. An expert keeps the first `capacity` picks of a
    group in priority order: every token's first choice by position, then every second choice, ...
    `causal` orders picks by position first (token 0's choices, then token 1's, ...), so that whether
    a token is kept never depends on later tokens, as a causal decoder needs."""
    groups, tokens, num_experts = probs.shape
    top_probs, top_experts = jax.lax.top_k(probs, k)  # [g, s, k]
    picks = jax.nn.one_hot(top_experts, num_experts, dtype=jnp.int32)  # [g, s, k, e]
    if causal:
        queue = jnp.cumsum(picks.reshape(groups, tokens * k, num_experts), axis=1).reshape(picks.shape) - 1
    else:
        by_priority = picks.transpose(0, 2, 1, 3).reshape(groups, k * tokens, num_experts)
        queue = (jnp.cumsum(by_priority, axis=1) - 1).reshape(groups, k, tokens, num_experts).transpose(0, 2, 1, 3)
    slot = jnp.sum(queue * picks, axis=-1)  # [g, s, k]: place in its expert's queue
    slots = jax.nn.one_hot(jnp.where(slot < capacity, slot, capacity), capacity, dtype=jnp.float32)  # dropped: 0
    picks = picks.astype(jnp.float32)
    dispatch = jnp.einsum("gske,gskc->gsec", picks, slots)
    combine = jnp.einsum("gske,gskc,gsk->gsec", picks, slots, top_probs)
    return Routing(dispatch, combine, jnp.sum(picks, axis=2) / k)


def experts_choose(probs: jax.Array, capacity: int) -> Routing:
    """Each expert takes the `capacity` tokens of a group that give it the highest probability; a
    token may be taken by several experts or by none."""
    weights, chosen = jax.lax.top_k(probs.transpose(0, 2, 1), capacity)  # [g, e, c]
    dispatch = jax.nn.one_hot(chosen, probs.shape[1], dtype=jnp.float32).transpose(0, 3, 1, 2)  # [g, s, e, c]
    return Routing(dispatch, dispatch * weights[:, None], jnp.sum(dispatch, axis=-1))


def load_balance_loss(probs: jax.Array, picks: jax.Array) -> jax.Array:
    """Switch's E·Σ_i f_i·P_i per group (f: share of picks, P: mean probability), averaged over
    groups; 1.0 for perfectly uniform routing, up to E when one expert takes everything."""
    num_experts = probs.shape[-1]
    return num_experts * jnp.mean(jnp.sum(jnp.mean(picks, axis=1) * jnp.mean(probs, axis=1), axis=-1))


def router_z_loss(logits: jax.Array) -> jax.Array:
    """ST-MoE's mean(logsumexp(logits)²): keeps router logits small."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))


def group_length(length: int, group_size: int) -> int:
    """The longest group of at most `group_size` tokens that splits a sequence into equal groups."""
    return max(d for d in range(1, min(length, group_size) + 1) if length % d == 0)


class MoeMlp(nn.Module):
    """An MLP per expert (parameters stacked on a leading `expert` axis) behind a top-k router."""

    num_experts: int
    d_ff: int
    activation: str = "relu"
    experts_per_token: int = 1
    router: str = "tokens_choose"
    causal: bool = False  # in a causal stack: no token's routing may depend on later tokens
    capacity_factor: float = 1.25
    min_capacity: int = 4
    dropless: bool = False
    group_size: int = 4096
    jitter: float = 0.0
    dropout_rate: float = 0.0
    deterministic: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        batch, length, d_model = x.shape
        tokens = group_length(length, self.group_size)
        groups = x.reshape(batch * length // tokens, tokens, d_model)
        groups = nn.with_logical_constraint(groups, ("batch", "length", "embed"))
        logits = self._router_logits(groups)
        probs = jax.nn.softmax(logits, axis=-1)
        if self.dropless:
            top_probs, top_experts = jax.lax.top_k(probs, self.experts_per_token)
            y = self._dropless(groups, top_experts, top_probs)
            picks = jnp.mean(jax.nn.one_hot(top_experts, self.num_experts), axis=2)
            dropped = jnp.zeros(())
        else:
            k = self.experts_per_token
            capacity = expert_capacity(tokens, self.num_experts, k, self.capacity_factor, self.min_capacity)
            routing = (
                tokens_choose(probs, k, capacity, self.causal)
                if self.router == "tokens_choose"
                else experts_choose(probs, capacity)
            )
            y = self._dispatched(groups, routing)
            picks = routing.picks
            dropped = jnp.mean((jnp.sum(routing.dispatch, axis=(2, 3)) == 0).astype(jnp.float32))
        balance = load_balance_loss(probs, picks) if self.router == "tokens_choose" else jnp.zeros(())
        self.sow("moe", "load_balance_loss", balance)
        self.sow("moe", "router_z_loss", router_z_loss(logits))
        self.sow("moe", "expert_fraction", jnp.sum(picks, axis=(0, 1)) / jnp.maximum(jnp.sum(picks), 1.0))
        self.sow("moe", "dropped_fraction", dropped)  # tokens no expert processed
        return y.reshape(batch, length, d_model)

    def _router_logits(self, groups):
        """Float32 logits [groups, tokens, experts]; inputs jittered while training if asked."""
        inputs = groups.astype(jnp.float32)
        if self.jitter and not self.deterministic:
            noise = jax.random.uniform(
                self.make_rng("dropout"), inputs.shape, jnp.float32, 1.0 - self.jitter, 1.0 + self.jitter
            )
            inputs = inputs * noise
        return DenseGeneral(
            (self.num_experts,),
            ("embed", None),
            kernel_scale=ROUTER_INIT_SCALE,
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
            name="router",
        )(inputs)

    def _expert_weights(self, d_model: int):
        """{"wi" or "wi_0"/"wi_1": [experts, embed, mlp], "wo": [experts, mlp, embed]} in `dtype`."""

        def param(name, axes, shape):
            init = nn.initializers.variance_scaling(
                1.0, "fan_in", "truncated_normal", in_axis=1, out_axis=2, batch_axis=(0,)
            )
            return self.param(name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype).astype(
                self.dtype
            )

        _, gated = ACTIVATIONS[self.activation]
        shape_in = (self.num_experts, d_model, self.d_ff)
        names = ("wi_0", "wi_1") if gated else ("wi",)
        weights = {name: param(name, ("expert", "embed", "expert_mlp"), shape_in) for name in names}
        weights["wo"] = param("wo", ("expert", "expert_mlp", "embed"), (self.num_experts, self.d_ff, d_model))
        return weights

    def _hidden(self, x, weights, matmul):
        """Activation of the experts' first layer (gated or not), with expert dropout."""
        fn, gated = ACTIVATIONS[self.activation]
        if gated:
            h = fn(matmul(x, weights["wi_0"])) * matmul(x, weights["wi_1"])
        else:
            h = fn(matmul(x, weights["wi"]))
        return nn.Dropout(self.dropout_rate)(h, deterministic=self.deterministic)

    def _dispatched(self, groups, routing: Routing):
        weights = self._expert_weights(groups.shape[-1])
        expert_axes = ("expert", "expert_batch", None)
        inputs = jnp.einsum("gsec,gsd->egcd", routing.dispatch.astype(self.dtype), groups.astype(self.dtype))
        inputs = nn.with_logical_constraint(inputs, expert_axes + ("embed",))
        h = self._hidden(inputs, weights, lambda a, w: jnp.einsum("egcd,edf->egcf", a, w))
        h = nn.with_logical_constraint(h, expert_axes + ("expert_mlp",))
        outputs = jnp.einsum("egcf,efd->egcd", h, weights["wo"])
        outputs = nn.with_logical_constraint(outputs, expert_axes + ("embed",))
        y = jnp.einsum("egcd,gsec->gsd", outputs, routing.combine.astype(self.dtype))
        return nn.with_logical_constraint(y, ("batch", "length", "embed"))

    def _dropless(self, groups, top_experts, top_probs):
        """Every pick processed: token copies sorted by expert, grouped matmuls, weighted scatter-add."""
        weights = self._expert_weights(groups.shape[-1])
        tokens = groups.reshape(-1, groups.shape[-1]).astype(self.dtype)
        experts = top_experts.reshape(-1)
        order = jnp.argsort(experts, stable=True)
        source = order // self.experts_per_token  # the token of each sorted copy
        sizes = jnp.bincount(experts, length=self.num_experts).astype(jnp.int32)

        def matmul(a, w):
            return jax.lax.ragged_dot(a, w, sizes)

        h = self._hidden(tokens[source], weights, matmul)
        outputs = matmul(h, weights["wo"]) * top_probs.reshape(-1)[order, None].astype(self.dtype)
        y = jnp.zeros_like(tokens).at[source].add(outputs)
        return y.reshape(groups.shape)


def moe_summary(collection) -> dict[str, jax.Array]:
    """Means over all MoE layers of what they sowed ({} for a dense model): scalars for the two
    losses and the dropped fraction, [experts] for the expert fractions."""
    by_name = {}
    for path, value in jax.tree_util.tree_flatten_with_path(collection)[0]:
        name = next(key.key for key in reversed(path) if isinstance(key, jax.tree_util.DictKey))
        tail = value.shape[-1:] if name == "expert_fraction" else ()
        by_name.setdefault(name, []).append(value.reshape(-1, *tail))
    return {name: jnp.mean(jnp.concatenate(values), axis=0) for name, values in by_name.items()}
