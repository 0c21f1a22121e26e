"""Shared helpers for the kernel tests: attention cases, float64 references, error metric."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.flash_attention import attention_reference, flash_attention

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
