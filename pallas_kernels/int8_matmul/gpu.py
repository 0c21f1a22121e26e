"""Triton int8 matmul: one program per output block, looping over K blocks (no scratch on Triton)."""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels.int8_matmul import block

NUM_WARPS = 4
NUM_STAGES = 3


def matmul(cfg, a, b, a_scale, b_scale, a_zero, b_zero, out_dtype, interpret=False):
    M, K = a.shape
    N = b.shape[1]
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    G = a_scale.shape[1]

    def kernel(a_ref, b_ref, as_ref, bs_ref, *rest):
        za_ref, zb_ref, out_ref = rest if cfg.zero_points else (None, None, *rest)
        a_scale_blk, b_scale_blk = as_ref[...], bs_ref[...]
        zeros = (za_ref[...], zb_ref[...]) if cfg.zero_points else (None, None)

        def body(kk, acc):
            k0 = pl.multiple_of(kk * bk, bk)
            a_blk, b_blk = a_ref[:, pl.ds(k0, bk)], b_ref[pl.ds(k0, bk), :]
            return acc + block.step(cfg, kk, a_blk, b_blk, a_scale_blk, b_scale_blk, *zeros)

        acc = jax.lax.fori_loop(0, K // bk, body, jnp.zeros((bm, bn), cfg.acc_dtype))
        out_ref[...] = block.finish(cfg, acc, a_scale_blk, b_scale_blk).astype(out_ref.dtype)

    in_specs = [
        pl.BlockSpec((bm, K), lambda i, j: (i, 0)),
        pl.BlockSpec((K, bn), lambda i, j: (0, j)),
        pl.BlockSpec((bm, G), lambda i, j: (i, 0)),
        pl.BlockSpec((G, bn), lambda i, j: (0, j)),
    ]
    args = [a, b, a_scale, b_scale]
    if cfg.zero_points:
        in_specs += [pl.BlockSpec((bm, 1), lambda i, j: (i, 0)), pl.BlockSpec((1, bn), lambda i, j: (0, j))]
        args += [a_zero, b_zero]
    return pl.pallas_call(
        kernel,
        grid=(M // bm, N // bn),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((M, N), out_dtype),
        compiler_params=pltr.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
        interpret=interpret,
    )(*args)
