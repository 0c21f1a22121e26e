"""Shared helpers for the kernel tests: attention cases, float64 references, error metric."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.flash_attention import attention_reference, flash_attention
from pallas_kernels.int8_matmul import int8_matmul, int8_matmul_reference

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def rel_err(actual, expected):
    """Norm-wise relative error, computed in float64."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention problem; `options(arrays)` gives flash_attention's keyword arguments."""

    name: str
    B: int
    T: int
    S: int
    H: int
    KVH: int
    D: int = 16
    causal: bool = False
    relpos: tuple | None = None  # (num_buckets, bidirectional, max_distance)
    alibi: bool = False
    bias: bool = False
    prefix: tuple | None = None
    segments: str | None = None  # "packed" (self-attention) or "pair" (cross-attention)
    window: int | None = None
    sinks: int = 0
    kv_offset: int = 0

    def arrays(self, dtype, seed=0):
        """Differentiable inputs (rounded to dtype) as a dict."""
        r = np.random.RandomState(seed)
        out = {
            "q": r.randn(self.B, self.T, self.H, self.D),
            "k": r.randn(self.B, self.S, self.KVH, self.D),
            "v": r.randn(self.B, self.S, self.KVH, self.D),
        }
        if self.relpos:
            out["table"] = r.randn(self.H, self.relpos[0])
        if self.alibi:
            out["slopes"] = r.uniform(0.05, 0.5, self.H)
        if self.bias:
            out["bias"] = r.randn(1, self.H, self.T, self.S)
        return {n: jnp.asarray(x, dtype if n in ("q", "k", "v") else jnp.float32) for n, x in out.items()}

    def options(self, a):
        opts = dict(causal=self.causal, window=self.window, sinks=self.sinks, sm_scale=1.0 if self.relpos else None)
        if self.relpos:
            opts["relpos_bias"] = (a["table"], self.relpos[1], self.relpos[2])
        if self.alibi:
            opts["alibi_slopes"] = a["slopes"]
        if self.bias:
            opts["bias"] = a["bias"]
        if self.prefix:
            opts["prefix_length"] = np.array(self.prefix, np.int32)
        if self.segments == "packed":
            first = min(15, self.T - 5)
            seg = np.ones((self.B, self.T), np.int32)
            seg[0, first:] = 2
            seg[0, self.T - 4 :] = 0  # trailing padding
            pos = np.concatenate([np.arange(first), np.arange(self.T - first)])
            opts.update(
                segment_ids=seg,
                q_positions=np.stack([pos, np.arange(self.T)]),
                kv_positions=np.stack([pos, np.arange(self.S)]),
            )
        if self.segments == "pair":
            q_seg = np.ones((self.B, self.T), np.int32)
            kv_seg = np.ones((self.B, self.S), np.int32)
            q_seg[1, : self.T // 2], kv_seg[1, : self.S // 3] = 2, 2
            kv_seg[0, -3:] = 0
            opts["segment_ids"] = (q_seg, kv_seg)
        if self.kv_offset:
            opts["kv_positions"] = np.arange(self.S) + self.kv_offset
        return opts


# Every feature of the kernel, each case a few at once (sizes not multiples of the blocks).
CASES = {
    c.name: c
    for c in [
        Case("plain", B=1, T=33, S=33, H=2, KVH=2),
        Case("causal_relpos_bidirectional", B=2, T=37, S=37, H=4, KVH=4, causal=True, relpos=(32, True, 20)),
        Case("gqa_prefix_relpos_unidirectional", B=2, T=45, S=45, H=4, KVH=2, prefix=(7, 30), relpos=(16, False, 24)),
        Case("mqa_packed_alibi", B=2, T=40, S=40, H=4, KVH=1, causal=True, segments="packed", alibi=True),
        Case("window_sinks", B=1, T=50, S=50, H=2, KVH=2, causal=True, window=9, sinks=3),
        Case(
            "cross_pairs_bias_offset",
            B=2,
            T=21,
            S=50,
            H=4,
            KVH=2,
            segments="pair",
            bias=True,
            kv_offset=5,
            relpos=(8, True, 12),
        ),
    ]
}


def _loss_inputs(case, a):
    names = sorted(a)
    return names, [a[n] for n in names]


def _apply(fn, case, names):
    def run(*values):
        a = dict(zip(names, values))
        return fn(a["q"], a["k"], a["v"], **case.options(a))

    return run


def kernel_vjp(case, dtype, backend, block_q=16, block_k=16, seed=0):
    """(output, gradients by input name) of the kernel for a fixed random cotangent."""
    a = case.arrays(dtype, seed)
    names, values = _loss_inputs(case, a)
    fn = _apply(
        lambda *x, **kw: flash_attention(*x, block_q=block_q, block_k=block_k, backend=backend, **kw), case, names
    )
    out, vjp = jax.vjp(jax.jit(fn), *values)
    grads = vjp(cotangent(case, dtype, seed))
    return out, dict(zip(names, grads))


def reference_vjp(case, dtype, seed=0):
    """The same, from the materialising reference in float64 on the same (rounded) inputs."""
    a = case.arrays(dtype, seed)
    names, values = _loss_inputs(case, a)
    ct = np.asarray(cotangent(case, dtype, seed), np.float64)
    with jax.enable_x64(True):
        values = [jnp.asarray(np.asarray(x, np.float64)) for x in values]
        out, vjp = jax.vjp(_apply(attention_reference, case, names), *values)
        grads = vjp(jnp.asarray(ct))
        return np.asarray(out), {n: np.asarray(g) for n, g in zip(names, grads)}


def cotangent(case, dtype, seed):
    r = np.random.RandomState(seed + 1)
    return jnp.asarray(r.randn(case.B, case.T, case.H, case.D), dtype)


# int8 matmul operands and scalings.
M, K, N, G = 40, 256, 72, 4
RNG = np.random.RandomState(0)
A = RNG.randint(-128, 128, (M, K)).astype(np.int8)
B = RNG.randint(-128, 128, (K, N)).astype(np.int8)

# name -> (a_scale, b_scale, a_zero_point, b_zero_point)
SCALINGS = {
    "tensor": (np.float32(0.03), np.float32(0.5), None, None),
    "channel": (RNG.rand(M).astype(np.float32), RNG.rand(N).astype(np.float32), None, None),
    "group": (RNG.rand(M, G).astype(np.float32), RNG.rand(G, N).astype(np.float32), None, None),
    "tensor_by_group": (np.float32(0.25), RNG.rand(G, N).astype(np.float32), None, None),
    "channel_zero_points": (
        RNG.rand(M, 1).astype(np.float32),
        RNG.rand(1, N).astype(np.float32),
        3,
        RNG.randint(-9, 9, N),
    ),
    "group_zero_points": (
        RNG.rand(M, G).astype(np.float32),
        RNG.rand(G, N).astype(np.float32),
        RNG.randint(-9, 9, M),
        -4,
    ),
}


def check_int8_matmul(name, backend):
    """The int8 matmul with scaling `name` against float64 (and bit for bit where one scale covers K)."""
    a_scale, b_scale, a_zero, b_zero = SCALINGS[name]
    out = np.asarray(
        int8_matmul(A, B, a_scale, b_scale, jnp.float32, a_zero_point=a_zero, b_zero_point=b_zero, backend=backend)
    )
    with jax.enable_x64(True):
        ref = np.asarray(
            int8_matmul_reference(
                A,
                B,
                a_scale,
                b_scale,
                a_zero_point=0 if a_zero is None else a_zero,
                b_zero_point=0 if b_zero is None else b_zero,
                dtype=jnp.float64,
            )
        )
    if name in ("tensor", "channel", "channel_zero_points"):
        # One scale over all of K: int32 accumulation, then the same float32 scaling, bit for bit.
        za = np.reshape(0 if a_zero is None else a_zero, (-1, 1)).astype(np.int64)
        zb = np.reshape(0 if b_zero is None else b_zero, (1, -1)).astype(np.int64)
        exact = ((A - za) @ (B - zb)).astype(np.float32)
        exact = exact * np.reshape(a_scale, (-1, 1)).astype(np.float32) * np.reshape(b_scale, (1, -1))
        np.testing.assert_array_equal(out, exact)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


def device_backend() -> str | None:
    """The kernels' backend for the on-device checks: T5LITE_KERNEL_BACKEND when set (e.g.
    "interpret" to run them on the CPU), else "auto" on a GPU or TPU, else None (no device)."""
    return os.environ.get("T5LITE_KERNEL_BACKEND") or ("auto" if jax.default_backend() in ("gpu", "tpu") else None)
