"""`int8_matmul`: scale/zero-point normalisation, block fitting and padding around the kernels."""

import jax.numpy as jnp

from pallas_kernels import backend as backends
from pallas_kernels.int8_matmul import block, gpu, tpu, xla

BACKENDS = backends.BACKENDS + ("xla",)

# Default (block_m, block_n, block_k) per kernel family.
DEFAULT_BLOCKS = {"tpu": (256, 256, 512), "gpu": (64, 64, 64)}


def int8_matmul(
    a,
    b,
    a_scale,
    b_scale,
    out_dtype=jnp.bfloat16,
    *,
    a_zero_point=None,
    b_zero_point=None,
    block_m=None,
    block_n=None,
    block_k=None,
    backend="auto",
):
    """(a - a_zero) * a_scale @ (b - b_zero) * b_scale, for int8 a [M, K] and b [K, N].

    Products accumulate in int32 (exactly); scales apply once at the end, or once per K group.
      a_scale: scalar (per tensor), [M] or [M, 1] (per row), or [M, G] (per row and K group);
      b_scale: scalar, [N] or [1, N] (per column), or [G, N]; G groups of K // G consecutive K.
      a_zero_point: scalar, [M] or [M, 1]; b_zero_point: scalar, [N] or [1, N] (integers).
    backend: "auto", "tpu", "gpu", "interpret" (TPU kernel interpreted), "gpu_interpret", or "xla" (the
    same product in plain XLA ops: what "auto" picks on a CPU, where Pallas only interprets).
    """
    name = backends.resolve(backend, BACKENDS, cpu="xla")
    family = "gpu" if backends.is_gpu(name) else "tpu"
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"int8_matmul needs a [M, K] and b [K, N]; got {a.shape} and {b.shape}")
    if a.dtype != jnp.int8 or b.dtype != jnp.int8:
        raise ValueError(f"a and b must be int8, got {a.dtype} and {b.dtype}")
    (M, K), N = a.shape, b.shape[1]
    a_scale, b_scale = _scales(a_scale, b_scale, M, N, K)
    groups = a_scale.shape[1]
    zero_points = a_zero_point is not None or b_zero_point is not None
    a_zero = _zero(a_zero_point, (M, 1), "a_zero_point") if zero_points else None
    b_zero = _zero(b_zero_point, (1, N), "b_zero_point") if zero_points else None

    if name == "xla":
        return xla.matmul(a, b, a_scale, b_scale, a_zero, b_zero, out_dtype)
    bm, bn, bk = _blocks(family, name, M, N, K, groups, block_m, block_n, block_k)
    cfg = block.Config(block_m=bm, block_n=bn, block_k=bk, k=K, groups=groups, zero_points=zero_points)
    Mp, Np, Kp = _round_up(M, bm), _round_up(N, bn), _round_up(K, bk)
    g_pad = max(1, 1 << (groups - 1).bit_length()) if family == "gpu" else groups  # Triton: powers of two
    a, b = _pad(a, (Mp, Kp)), _pad(b, (Kp, Np))
    a_scale, b_scale = _pad(a_scale, (Mp, g_pad)), _pad(b_scale, (g_pad, Np))
    if zero_points:
        a_zero, b_zero = _pad(a_zero, (Mp, 1)), _pad(b_zero, (1, Np))
    module = gpu if family == "gpu" else tpu
    out = module.matmul(cfg, a, b, a_scale, b_scale, a_zero, b_zero, out_dtype, interpret=backends.is_interpret(name))
    return out[:M, :N]


def _scales(a_scale, b_scale, M, N, K):
    """Both scales as float32 [M, G] and [G, N] with a common group count G."""
    a_scale, b_scale = _as_2d(a_scale, 1), _as_2d(b_scale, 0)
    ga, gb = a_scale.shape[1], b_scale.shape[0]
    groups = max(ga, gb)
    if a_scale.ndim != 2 or a_scale.shape[0] not in (1, M) or ga not in (1, groups):
        raise ValueError(f"a_scale must be a scalar, [{M}], [{M}, 1] or [{M}, groups]; got {a_scale.shape}")
    if b_scale.ndim != 2 or b_scale.shape[1] not in (1, N) or gb not in (1, groups):
        raise ValueError(
            f"b_scale must be a scalar, [{N}], [1, {N}] or [groups, {N}] (same groups as a_scale); got {b_scale.shape}"
        )
    if K % groups:
        raise ValueError(f"{groups} scale groups do not divide K = {K}")
    return jnp.broadcast_to(a_scale, (M, groups)), jnp.broadcast_to(b_scale, (groups, N))


def _as_2d(scale, vector_axis):
    scale = jnp.asarray(scale, jnp.float32)
    if scale.ndim == 0:
        return scale.reshape(1, 1)
    return jnp.expand_dims(scale, vector_axis) if scale.ndim == 1 else scale


def _zero(z, shape, what):
    if z is None:
        return jnp.zeros(shape, jnp.int32)
    z = jnp.asarray(z)
    if not jnp.issubdtype(z.dtype, jnp.integer) or z.size not in (1, max(shape)):
        raise ValueError(f"{what} must be an integer scalar or have {max(shape)} entries, got {z.shape} {z.dtype}")
    return jnp.broadcast_to(z.astype(jnp.int32).reshape(shape if z.size > 1 else (1, 1)), shape)


def _blocks(family, name, M, N, K, groups, block_m, block_n, block_k):
    dm, dn, dk = DEFAULT_BLOCKS[family]
    bm, bn, bk = block_m or dm, block_n or dn, block_k or dk
    group = K // groups if groups > 1 else None
    if family == "gpu":
        if any(x < 16 or x & (x - 1) for x in (bm, bn, bk)) or (group and (group < 16 or group & (group - 1))):
            raise ValueError(
                f"on GPU blocks and the K group size must be powers of two >= 16; got blocks "
                f"{(bm, bn, bk)}, group {group}"
            )
        fit = lambda n, b: min(b, max(16, 1 << (n - 1).bit_length()))  # noqa: E731
        bm, bn, bk = fit(M, bm), fit(N, bn), fit(K, bk)
    else:
        lane = 128 if name == "tpu" else 1
        if bm % 32 or (bn % lane) or (bk % lane):
            raise ValueError(f"on TPU block_m must be a multiple of 32 and block_n, block_k of 128; got {(bm, bn, bk)}")
        bm = bm if M > bm else _round_up(M, 32)
        bn = bn if N > bn else _round_up(N, 128)
        bk = bk if K > bk else _round_up(K, 128 if group is None else group)
    if group:
        bk = max(group, bk // group * group)  # whole groups per K block
    return bm, bn, bk


def _round_up(n, m):
    return -(-n // m) * m


def _pad(x, shape):
    if x.shape == shape:
        return x
    return jnp.pad(x, [(0, s - d) for s, d in zip(shape, x.shape)])
