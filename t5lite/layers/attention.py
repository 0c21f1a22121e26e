"""Multi-head attention with grouped key/value heads (MHA, GQA, MQA) and a KV cache.

Layout is [batch, length, heads, head_dim]. Masks and position biases come from the
caller's `AttentionSpec` (built once per stack, shared by all layers), which also says
which implementation attends; rotary embeddings are applied here because they rotate
the projected queries and keys.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from pallas_kernels.flash_attention import flash_attention
from t5lite.layers.attention_spec import AttentionSpec
from t5lite.layers.dense import DenseGeneral, Lora, WeightQuant
from t5lite.layers.positions import apply_rope

NEG_INF = -1e10


def dot_product_attention(
    query, key, value, mask=None, bias=None, dropout_rng=None, dropout_rate=0.0, scale=1.0, dtype=jnp.float32
):
    """softmax(q·k * scale + bias, masked) · v with the softmax in float32.

    query [B, Q, H, D]; key, value [B, K, KVH, D] with KVH dividing H (query head h uses
    key/value head h // (H/KVH)); mask [B, 1, Q, K] bool; bias [B or 1, H, Q, K].
    """
    batch, q_len, num_heads, head_dim = query.shape
    kv_heads = key.shape[2]
    query = query.reshape(batch, q_len, kv_heads, num_heads // kv_heads, head_dim)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", query, key).astype(jnp.float32) * scale
    if bias is not None:
        scores = scores + bias.reshape(bias.shape[0], kv_heads, num_heads // kv_heads, *bias.shape[2:])
    if mask is not None:
        scores = jnp.where(mask[:, :, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout_rng is not None and dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(dtype), value.astype(dtype))
    return out.reshape(batch, q_len, num_heads, head_dim)


def attend(query, key, value, spec: AttentionSpec, scale, dropout_rng=None, dropout_rate=0.0, dtype=jnp.float32):
    """Attention by `spec.impl`: XLA (`dot_product_attention`), cuDNN (`jax.nn.dot_product_attention`),
    or the Pallas flash kernel ("auto" backend: TPU, GPU, else the interpreter)."""
    if spec.impl == "xla":
        return dot_product_attention(query, key, value, spec.mask, spec.bias, dropout_rng, dropout_rate, scale, dtype)
    if spec.impl == "cudnn":
        bias = None if spec.bias is None else spec.bias.astype(query.dtype)
        return jax.nn.dot_product_attention(query, key, value, bias, spec.mask, scale=scale, implementation="cudnn")
    return sharded_flash_attention(query, key, value, spec, scale)


def sharded_flash_attention(query, key, value, spec: AttentionSpec, scale):
    """The flash kernel once per shard of the mesh in context (XLA cannot partition a Pallas
    kernel): queries split by the logical rules over batch and heads, keys and values alike.
    Key/value heads the rules keep whole are repeated to one per query head first."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return flash_attention(query, key, value, sm_scale=scale, **spec.kernel_kwargs())
    q_spec = _dividing_spec(nn.logical_to_mesh_axes(("batch", "length", "heads", "kv")), query.shape, mesh)
    kv_spec = _dividing_spec(nn.logical_to_mesh_axes(("batch", "length", "kv_heads", "kv")), key.shape, mesh)
    if kv_spec[2] != q_spec[2]:
        groups = query.shape[2] // key.shape[2]
        key, value, kv_spec = jnp.repeat(key, groups, axis=2), jnp.repeat(value, groups, axis=2), q_spec
    rows, heads = P(q_spec[0]), P(q_spec[2])
    spec_specs = spec.replace(
        q_positions=rows,
        kv_positions=rows,
        q_segments=rows,
        kv_segments=rows,
        prefix_length=rows,
        relpos_table=heads,
        alibi_slopes=heads,
    )
    per_shard = lambda q, k, v, s: flash_attention(q, k, v, sm_scale=scale, **s.kernel_kwargs())
    return jax.shard_map(
        per_shard,
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, spec_specs),
        out_specs=q_spec,
        axis_names=frozenset(mesh.axis_names) - set(mesh.manual_axes),  # within pipeline stages: the others
        check_vma=False,
    )(query, key, value, spec)


def _dividing_spec(spec, shape, mesh):
    """`spec` without the mesh axes that do not divide their array axis (e.g. the batch of one
    that initialisation traces), which then stays whole on every shard."""

    def fits(axes, size):
        axes = (axes,) if isinstance(axes, str) else axes or ()
        return size % math.prod(mesh.shape[axis] for axis in axes) == 0

    return P(*(axes if fits(axes, size) else None for axes, size in zip(tuple(spec) + (None,) * len(shape), shape)))


class Attention(nn.Module):
    """Self-attention (inputs_kv is inputs_q) or cross-attention.

    With `decode=True` the first call creates the cache (zeros for self-attention, the
    projected encoder keys/values for cross-attention) and computes as usual; later calls
    write their keys/values at `cache_position` and attend over the whole cache. For XLA attention
    the cache is stored heads first, [B, KVH, K, D], the layout its batched matmuls read: stored
    [B, K, KVH, D], XLA:CPU copied every layer's cache into that layout at every step (a quarter of
    T5's greedy decoding time); the Pallas kernel reads [B, K, KVH, D] and gets that. The barrier where
    the cross-attention cache is made keeps XLA from moving the transpose back into the loop.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale_by_head_dim: bool = False
    dropout_rate: float = 0.0
    deterministic: bool = True
    decode: bool = False
    is_cross_attention: bool = False
    int8: bool = False
    weight_quant: WeightQuant | None = None
    lora: Lora | None = None
    adapted: tuple[str, ...] = ()  # the projections ("query", "key", "value", "out") that get `lora`
    bias: bool = False  # on every projection (BitFit)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, inputs_q, inputs_kv, spec: AttentionSpec, rope=None, cache_position=None):
        def dense(*args, name, **kwargs):
            return DenseGeneral(
                *args,
                int8=self.int8,
                weight_quant=self.weight_quant,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                lora=self.lora if name in self.adapted else None,
                use_bias=self.bias,
                name=name,
                **kwargs,
            )

        # Without runtime scaling, T5 folds 1/sqrt(head_dim) into the query initialisation.
        query_scale = 1.0 if self.scale_by_head_dim else self.head_dim**-0.5
        query = dense(
            (self.num_heads, self.head_dim), ("embed", "heads", "kv"), kernel_scale=query_scale, name="query"
        )(inputs_q)
        kv_proj = lambda name: dense((self.num_kv_heads, self.head_dim), ("embed", "kv_heads", "kv"), name=name)
        heads_first = spec.impl == "xla"
        if self.is_cross_attention:
            key, value = self._cross_keys_values(kv_proj, inputs_kv, heads_first)
        else:
            key, value = kv_proj("key")(inputs_kv), kv_proj("value")(inputs_kv)
            if rope is not None:
                query, key = apply_rope(query, *rope), apply_rope(key, *rope)
            if self.decode:
                key, value = self._update_cache(key, value, cache_position, heads_first)
        query = nn.with_logical_constraint(query, ("batch", "length", "heads", "kv"))
        dropout_rng = None if self.deterministic or self.dropout_rate == 0.0 else self.make_rng("dropout")
        out = attend(
            query,
            key,
            value,
            spec,
            self.head_dim**-0.5 if self.scale_by_head_dim else 1.0,
            dropout_rng,
            self.dropout_rate,
            self.dtype,
        )
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
        return dense((inputs_q.shape[-1],), ("heads", "kv", "embed"), in_axes=2, name="out")(out)

    def _update_cache(self, key, value, cache_position, heads_first: bool):
        """Writes [B, T, KVH, D] keys and values at `cache_position`; returns the whole cache, [B, K, KVH, D]."""
        order = _swap_length_heads if heads_first else (lambda x: x)
        exists = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, order(key).shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, order(value).shape, value.dtype)
        if not exists:  # the call that sizes the cache attends over its own inputs
            return key, value
        start = (0, 0, cache_position, 0) if heads_first else (0, cache_position, 0, 0)
        for cached, new in ((cached_key, key), (cached_value, value)):
            cached.value = lax.dynamic_update_slice(cached.value, order(new).astype(cached.value.dtype), start)
        return order(cached_key.value), order(cached_value.value)

    def _cross_keys_values(self, kv_proj, encoded, heads_first: bool):
        order = _swap_length_heads if heads_first else (lambda x: x)
        if self.decode and self.has_variable("cache", "cached_key"):
            return order(self.get_variable("cache", "cached_key")), order(self.get_variable("cache", "cached_value"))
        key, value = kv_proj("key")(encoded), kv_proj("value")(encoded)
        if self.decode:
            self.put_variable("cache", "cached_key", lax.optimization_barrier(order(key)))
            self.put_variable("cache", "cached_value", lax.optimization_barrier(order(value)))
        return key, value


def _swap_length_heads(x):
    """[B, K, H, D] <-> [B, H, K, D]."""
    return jnp.swapaxes(x, 1, 2)
