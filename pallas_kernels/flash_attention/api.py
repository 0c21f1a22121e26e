"""`flash_attention`: argument checks, padding and layout, and the custom VJP around the kernels.

The kernels see `[B, heads, len, D]` arrays padded to whole blocks (a head's rows contiguous, as
TPU blocks need); this module pads, transposes, turns the T5 table and ALiBi slopes into the
kernels' per-head weights (so autodiff maps weight gradients back), and slices the result.
"""

import functools
import typing

import jax
import jax.numpy as jnp

from pallas_kernels import backend as backends
from pallas_kernels.flash_attention import blocks, gpu, tpu
from pallas_kernels.flash_attention.operands import Operands
from pallas_kernels.flash_attention.relpos import relpos_steps
from pallas_kernels.flash_attention.tile import Config

# Default (block_q, block_k) per kernel family.
DEFAULT_BLOCKS = {"tpu": (512, 512), "gpu": (64, 64)}


def flash_attention(
    q,
    k,
    v,
    *,
    causal=False,
    segment_ids=None,
    prefix_length=None,
    relpos_bias=None,
    alibi_slopes=None,
    bias=None,
    window=None,
    sinks=0,
    q_positions=None,
    kv_positions=None,
    sm_scale=None,
    block_q=None,
    block_k=None,
    backend="auto",
):
    """Memory-efficient attention; q [B, T, H, D], k and v [B, S, KVH, D] -> [B, T, H, D].

    Query head h reads kv head h // (H // KVH) (MHA, GQA, MQA). Masks (all computed in-kernel):
      causal: key position <= query position.
      prefix_length [B]: prefix-LM; causal, except keys at position < prefix_length are seen by all.
      segment_ids: [B, T] (self-attention) or a (q_ids [B, T], kv_ids [B, S]) pair; a query sees keys
        of its own segment; id 0 is padding.
      window: |query position - key position| < window; sinks: keys at position < sinks are always
        in the window (attention sinks).
    Biases (added to the scaled logits):
      relpos_bias: (table [H, num_buckets], bidirectional, max_distance), T5's bucketed
        relative position of key minus query, exactly as Hugging Face computes it (T5 itself
        uses sm_scale=1.0; the default is 1/sqrt(D)).
      alibi_slopes [H]: -slope * |query position - key position|.
      bias: any array broadcastable as [B or 1, H or 1, T, S].
    q_positions [T] or [B, T] / kv_positions [S] or [B, S] replace 0..T-1 / 0..S-1 for all of the
    above (e.g. a decoding offset, or positions restarting in packed examples).
    Queries with no allowed key return zeros. Gradients flow to q, k, v, the relpos table, the
    ALiBi slopes and the bias.
    block_q / block_k override the per-backend defaults (DEFAULT_BLOCKS); backend is one of
    "auto", "tpu", "gpu", "interpret" (TPU kernel interpreted), "gpu_interpret".
    """
    kernel_args = prepare(
        q,
        k,
        v,
        causal=causal,
        segment_ids=segment_ids,
        prefix_length=prefix_length,
        relpos_bias=relpos_bias,
        alibi_slopes=alibi_slopes,
        bias=bias,
        window=window,
        sinks=sinks,
        q_positions=q_positions,
        kv_positions=kv_positions,
        sm_scale=sm_scale,
        block_q=block_q,
        block_k=block_k,
        backend=backend,
    )
    out = _attention(*kernel_args)
    return jnp.swapaxes(out, 1, 2)[:, : q.shape[1], :, : q.shape[3]]


class KernelArgs(typing.NamedTuple):
    """What the kernels get: static config and backend, padded [B, heads, len, D] arrays."""

    cfg: Config
    backend: str
    q: jax.Array
    k: jax.Array
    v: jax.Array
    weights: jax.Array | None
    bias: jax.Array | None
    ops: Operands
    tables: blocks.BlockTables


def prepare(
    q,
    k,
    v,
    *,
    causal,
    segment_ids,
    prefix_length,
    relpos_bias,
    alibi_slopes,
    bias,
    window,
    sinks,
    q_positions,
    kv_positions,
    sm_scale,
    block_q,
    block_k,
    backend,
):
    """Check the arguments of `flash_attention` and build the kernels' inputs."""
    name = backends.resolve(backend)
    family = "gpu" if backends.is_gpu(name) else "tpu"
    B, T, H, D = _check_qkv(q, k, v)
    S, KVH = k.shape[1], k.shape[2]
    bq, bk = _block_sizes(family, name, T, S, block_q, block_k)
    Tp, Sp = _round_up(T, bq), _round_up(S, bk)
    Dp = max(16, 1 << (D - 1).bit_length()) if family == "gpu" else D  # Triton: power-of-two tensors

    q_pos = _vector(q_positions, "q_positions", B, T)
    kv_pos = _vector(kv_positions, "kv_positions", B, S)
    q_seg, kv_seg = _segments(segment_ids, B, T, S)
    prefix = None if prefix_length is None else _per_batch(prefix_length, B)
    if sinks and window is None:
        raise ValueError("sinks only make sense with a sliding window: pass window=... as well")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int, got {window!r}")
    if not isinstance(sinks, int) or sinks < 0:
        raise ValueError(f"sinks must be a non-negative int, got {sinks!r}")

    steps, weights = _positional_weights(relpos_bias, alibi_slopes, H)
    cfg = Config(
        sm_scale=float(D**-0.5 if sm_scale is None else sm_scale),
        block_q=bq,
        block_k=bk,
        group=H // KVH,
        causal=bool(causal) or prefix is not None,
        prefix=prefix is not None,
        window=window,
        sinks=sinks,
        segments=q_seg is not None,
        q_positions=q_pos is not None,
        kv_positions=kv_pos is not None,
        kv_len=S if Sp != S and q_seg is None else None,
        relpos=steps,
        alibi=alibi_slopes is not None,
        bias=bias is not None,
        precision=jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None,
    )

    ops = Operands(
        q_pos=None if q_pos is None else _pad(q_pos, 1, Tp, "edge")[:, :, None],
        kv_pos=None if kv_pos is None else _pad(kv_pos, 1, Sp, "edge")[:, None, :],
        q_seg=None if q_seg is None else _pad(q_seg, 1, Tp)[:, :, None],
        kv_seg=None if kv_seg is None else _pad(kv_seg, 1, Sp)[:, None, :],
        prefix=prefix,
    )
    live = blocks.live_tiles(
        cfg,
        _pad(_default(q_pos, B, T), 1, Tp, "edge"),
        _pad(_default(kv_pos, B, S), 1, Sp, "edge"),
        None if q_seg is None else ops.q_seg[:, :, 0],
        None if kv_seg is None else ops.kv_seg[:, 0, :],
        prefix,
    )
    tables = blocks.block_tables(live)
    bias_p = None if bias is None else _pad(_pad(_check_bias(bias, B, H, T, S), 2, Tp), 3, Sp)

    def to_kernel(x, length):  # [B, L, heads, D] -> [B, heads, Lp, Dp]
        return jnp.swapaxes(_pad(_pad(x, 1, length), 3, Dp), 1, 2)

    return KernelArgs(cfg, name, to_kernel(q, Tp), to_kernel(k, Sp), to_kernel(v, Sp), weights, bias_p, ops, tables)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention(cfg, name, q, k, v, weights, bias, ops, tables):
    return _forward(cfg, name, q, k, v, weights, bias, ops, tables)[0]


def kernels(name):
    """(kernel module, interpret flag) for a resolved backend name."""
    return (gpu if backends.is_gpu(name) else tpu), backends.is_interpret(name)


def _forward(cfg, name, q, k, v, weights, bias, ops, tables):
    module, interpret = kernels(name)
    ops = ops._replace(weights=weights, bias=bias)
    out, lse = module.forward(cfg, q, k, v, ops, tables, interpret=interpret)
    return out, (q, k, v, weights, bias, ops, tables, out, lse)


def _backward(cfg, name, residuals, dout):
    q, k, v, weights, bias, ops, tables, out, lse = residuals
    module, interpret = kernels(name)
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    dout = dout.astype(q.dtype)
    dq, dw, dbias = module.backward_dq(cfg, q, k, v, dout, lse, delta, ops, tables, interpret=interpret)
    dk, dv = module.backward_dkv(cfg, q, k, v, dout, lse, delta, ops, tables, interpret=interpret)
    if dw is not None:
        dw = dw.sum(axis=(0, 2)).astype(weights.dtype)
    if dbias is not None:
        broadcast = tuple(i for i in range(2) if bias.shape[i] == 1)
        dbias = dbias.sum(axis=broadcast, keepdims=True).astype(bias.dtype)
    int_cotangents = jax.tree.map(lambda _: None, (ops._replace(weights=None, bias=None), tables))
    return (dq, dk, dv, dw, dbias) + int_cotangents


_attention.defvjp(_forward, _backward)


def _positional_weights(relpos_bias, alibi_slopes, num_heads):
    """Static relpos steps and the [H, K] float32 weights (K a power of two), or (None, None)."""
    columns, steps = [], None
    if relpos_bias is not None:
        if not (isinstance(relpos_bias, (tuple, list)) and len(relpos_bias) == 3):
            raise ValueError("relpos_bias must be (table [H, num_buckets], bidirectional, max_distance)")
        table, bidirectional, max_distance = relpos_bias
        if table.ndim != 2 or table.shape[0] != num_heads:
            raise ValueError(f"relpos_bias table must be [heads={num_heads}, num_buckets], got {table.shape}")
        steps = _steps(table.shape[1], bool(bidirectional), int(max_distance))
        columns.append(steps.weights(table.astype(jnp.float32)))
    if alibi_slopes is not None:
        if alibi_slopes.shape != (num_heads,):
            raise ValueError(f"alibi_slopes must be [heads={num_heads}], got {alibi_slopes.shape}")
        columns.append(alibi_slopes.astype(jnp.float32)[:, None])
    if not columns:
        return None, None
    weights = jnp.concatenate(columns, axis=1)
    width = 1 << (weights.shape[1] - 1).bit_length()
    return steps, _pad(weights, 1, width)


@functools.cache
def _steps(num_buckets, bidirectional, max_distance):
    return relpos_steps(num_buckets, bidirectional, max_distance)


def _check_qkv(q, k, v):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [batch, length, heads, head_dim]; got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
    B, T, H, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k/v {k.shape} must match q {q.shape} in batch and head_dim")
    if H % k.shape[2]:
        raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({k.shape[2]})")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"q, k, v must share one of float32/bfloat16/float16; got {q.dtype}, {k.dtype}, {v.dtype}")
    return B, T, H, D


def _block_sizes(family, name, T, S, block_q, block_k):
    default_q, default_k = DEFAULT_BLOCKS[family]
    bq, bk = block_q or default_q, block_k or default_k
    if family == "gpu":
        for what, b in (("block_q", bq), ("block_k", bk)):
            if b < 16 or b & (b - 1):
                raise ValueError(f"{what} must be a power of two >= 16 on GPU, got {b}")
        fit = lambda n, b: min(b, max(16, 1 << (n - 1).bit_length()))  # noqa: E731
        return fit(T, bq), fit(S, bk)
    if bq % 8 or bk % 8:
        raise ValueError(f"block_q and block_k must be multiples of 8, got {bq}, {bk}")
    if name == "tpu" and S > bk and bk % 128:
        raise ValueError(f"on TPU block_k must be a multiple of 128 when it tiles the keys, got {bk}")
    fit = lambda n, b: b if n > b else _round_up(n, 16)  # noqa: E731  (one block spans the axis)
    return fit(T, bq), fit(S, bk)


def _vector(x, what, batch, length):
    if x is None:
        return None
    x = jnp.asarray(x)
    if x.shape not in ((length,), (batch, length)):
        raise ValueError(f"{what} must be [{length}] or [{batch}, {length}], got {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{what} must be integers, got {x.dtype}")
    return jnp.broadcast_to(x.astype(jnp.int32), (batch, length))


def _segments(segment_ids, batch, T, S):
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2:
            raise ValueError("segment_ids must be one [B, T] array or a (q_ids, kv_ids) pair")
        return _vector(segment_ids[0], "q segment_ids", batch, T), _vector(segment_ids[1], "kv segment_ids", batch, S)
    if T != S:
        raise ValueError(f"a single segment_ids array needs T == S (got {T}, {S}); pass (q_ids, kv_ids)")
    ids = _vector(segment_ids, "segment_ids", batch, T)
    return ids, ids


def _per_batch(x, batch):
    x = jnp.asarray(x)
    if x.shape not in ((), (batch,)) or not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"prefix_length must be an int or int array [{batch}], got {x.shape} {x.dtype}")
    return jnp.broadcast_to(x.astype(jnp.int32), (batch,))


def _check_bias(bias, B, H, T, S):
    bias = jnp.asarray(bias)
    if bias.ndim != 4 or bias.shape[0] not in (1, B) or bias.shape[1] not in (1, H) or bias.shape[2:] != (T, S):
        raise ValueError(f"bias must be [{B} or 1, {H} or 1, {T}, {S}], got {bias.shape}")
    return bias


def _default(pos, batch, length):
    return pos if pos is not None else jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))


def _round_up(n, m):
    return -(-n // m) * m


def _pad(x, axis, size, mode="constant"):
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, mode=mode)
