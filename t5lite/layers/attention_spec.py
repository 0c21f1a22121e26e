"""What a stack's attention layers need besides q, k and v: who sees whom, and the position bias.

A stack builds one `AttentionSpec` per kind of attention (self, cross) and hands it to all its
layers. For "xla" and "cudnn" it holds the mask [B, 1, Q, K] and bias [B or 1, H, Q, K],
materialised once per stack. For "pallas" it holds only per-token facts (positions, example ids,
the prefix length) and the bias parameters (the T5 table, ALiBi slopes): the flash kernel computes
mask and bias per tile, so nothing of size Q x K is ever built.

Rows with no visible key (padding queries) differ: XLA averages all values, the kernel returns
zeros. No real token ever attends to a padding token, so logits and gradients of real tokens agree.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from pallas_kernels import backend as kernel_backend
from t5lite.layers import positions as pos
from t5lite.layers.masks import attention_mask, cross_attention_mask


def resolve_impl(choice: str, attention_dropout: bool) -> str:
    """The implementation ("xla", "pallas" or "cudnn") a stack uses for `ModelConfig.attention_impl`.

    "auto" picks the Pallas kernel on TPU and GPU (also when compiling ahead of time for one, see
    `pallas_kernels.backend.compiling_for`), and XLA on the CPU (where Pallas only interprets) or
    while attention dropout is on (no fused kernel has it).
    """
    platform = kernel_backend.platform()
    if choice == "auto":
        return "pallas" if platform in ("tpu", "gpu") and not attention_dropout else "xla"
    if choice != "xla" and attention_dropout:
        raise ValueError(
            f"attention_impl={choice!r} has no dropout on attention probabilities; train with "
            f"dropout_rate=0.0, or use attention_impl='xla' (or 'auto', which picks it while "
            f"dropout is on)."
        )
    if choice == "cudnn" and platform != "gpu":
        raise ValueError(
            f"attention_impl='cudnn' needs a CUDA GPU, but JAX runs on {platform!r}; use "
            f"attention_impl='auto', 'pallas' or 'xla'."
        )
    return choice


# The spec's arrays that are not per batch row: one entry per head.
SHARED_FIELDS = ("relpos_table", "alibi_slopes")


@struct.dataclass
class AttentionSpec:
    """Built by `self_attention_spec` / `cross_attention_spec`; read by `Attention`."""

    impl: str = struct.field(pytree_node=False)
    # "xla", "cudnn": materialised.
    mask: jax.Array | None = None  # [B, 1, Q, K] bool, True = may attend
    bias: jax.Array | None = None  # [B or 1, H, Q, K] float32
    # "pallas": the arguments of `flash_attention` with the same meaning.
    q_positions: jax.Array | None = None  # [B, Q]
    kv_positions: jax.Array | None = None  # [B, K]
    q_segments: jax.Array | None = None  # [B, Q] example ids, 0 = padding
    kv_segments: jax.Array | None = None  # [B, K]
    prefix_length: jax.Array | None = None  # [B]
    relpos_table: jax.Array | None = None  # [H, num_buckets]
    alibi_slopes: jax.Array | None = None  # [H]
    causal: bool = struct.field(pytree_node=False, default=False)
    window: int | None = struct.field(pytree_node=False, default=None)
    sinks: int = struct.field(pytree_node=False, default=0)
    relpos_bidirectional: bool = struct.field(pytree_node=False, default=True)
    relpos_max_distance: int = struct.field(pytree_node=False, default=128)

    def kernel_kwargs(self) -> dict:
        """Keyword arguments of `flash_attention` (all but q, k, v and the scale)."""
        return dict(
            causal=self.causal,
            segment_ids=None if self.q_segments is None else (self.q_segments, self.kv_segments),
            prefix_length=self.prefix_length,
            relpos_bias=None
            if self.relpos_table is None
            else (self.relpos_table, self.relpos_bidirectional, self.relpos_max_distance),
            alibi_slopes=self.alibi_slopes,
            window=self.window,
            sinks=self.sinks,
            q_positions=self.q_positions,
            kv_positions=self.kv_positions,
        )


def self_attention_spec(
    impl: str,
    *,
    positions,
    valid=None,
    segments=None,
    causal=False,
    region=None,
    sliding_window=None,
    attention_sinks=0,
    key_positions=None,
    key_region=None,
    relpos_table=None,
    relpos_bidirectional=True,
    relpos_max_distance=128,
    alibi_slopes=None,
) -> AttentionSpec:
    """Tokens attending to each other; the mask rules are those of `attention_mask` (`region` is the
    prefix-LM bidirectional region). `key_positions` [1 or B, cache length] and `key_region` differ
    from the query side only while decoding from a cache: queries are the newest tokens, keys the
    whole cache, of which the causal rule hides the unwritten part (the kernel skips its tiles).
    There the kernel needs no `key_region`: the cache holds one region, the current chunk's, and its
    `prefix_length` (the region's end) already shows those keys to every query of the chunk."""
    if impl == "pallas":
        ids, prefix = example_ids(valid, segments), None
        if region is not None:
            positions, prefix = prefix_lm(positions, region, segments, attention_sinks)
        key_positions = (
            positions
            if key_positions is None
            else jnp.broadcast_to(key_positions, (positions.shape[0], key_positions.shape[1]))
        )
        return AttentionSpec(
            impl,
            q_positions=positions,
            kv_positions=key_positions,
            q_segments=ids,
            kv_segments=ids,
            prefix_length=prefix,
            relpos_table=relpos_table,
            alibi_slopes=alibi_slopes,
            causal=causal,
            window=sliding_window,
            sinks=attention_sinks,
            relpos_bidirectional=relpos_bidirectional,
            relpos_max_distance=relpos_max_distance,
        )
    key_positions = positions if key_positions is None else key_positions
    mask = attention_mask(
        query_positions=positions,
        key_positions=key_positions,
        query_valid=valid,
        key_valid=valid,
        query_segments=segments,
        key_segments=segments,
        causal=causal,
        query_bidirectional=region,
        key_bidirectional=region if key_region is None else key_region,
        sliding_window=sliding_window,
        attention_sinks=attention_sinks,
    )
    bias = None
    if relpos_table is not None:
        bias = pos.relative_position_bias(
            relpos_table, positions, key_positions, relpos_bidirectional, relpos_max_distance
        )
    elif alibi_slopes is not None:
        bias = pos.slope_bias(alibi_slopes, positions, key_positions)
    return AttentionSpec(impl, mask=mask, bias=bias)


def cross_attention_spec(impl: str, query_valid, key_valid, query_segments=None, key_segments=None) -> AttentionSpec:
    """Decoder queries over encoder keys: both real and, when packed, of the same example."""
    if impl != "pallas":
        return AttentionSpec(impl, mask=cross_attention_mask(query_valid, key_valid, query_segments, key_segments))
    return AttentionSpec(
        impl, q_segments=example_ids(query_valid, query_segments), kv_segments=example_ids(key_valid, key_segments)
    )


def example_ids(valid, segments):
    """The kernel's segment ids: packed segment ids, else 1 for every real token; 0 for padding."""
    if valid is None:
        return segments
    ids = jnp.ones(valid.shape, jnp.int32) if segments is None else segments.astype(jnp.int32)
    return jnp.where(valid, ids, 0)


def prefix_lm(positions, region, segments, sinks):
    """(positions, prefix_length) for the kernel's prefix-LM rule: keys at a position below the row's
    `prefix_length` are seen by every query (the rest is causal).

    seqio marks the bidirectional region per token, at the start of each example. A packed row holds
    one region per example, so each example's positions shift to put its region's end at 0; that
    keeps every distance within an example (causal, window, biases), but not the absolute test of
    attention sinks.
    """
    ends = jnp.where(region > 0, positions + 1, 0)
    if segments is None:
        return positions, jnp.max(ends, axis=1)
    if sinks:
        raise ValueError(
            "attention_impl='pallas' cannot combine attention_sinks with packed prefix-LM "
            "examples (decoder_segment_ids and decoder_causal_attention); use attention_impl='xla'."
        )
    # Segment ids of a packed row are 0 (padding) and 1, 2, ... (examples), all below length + 1.
    segment_max = functools.partial(jax.ops.segment_max, num_segments=positions.shape[1] + 1)
    per_example = jax.vmap(segment_max)(ends, segments)
    shifted = positions - jnp.take_along_axis(per_example, segments, axis=1)
    return shifted, jnp.zeros(positions.shape[:1], positions.dtype)
