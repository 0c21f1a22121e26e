"""Mosaic TPU int8 matmul: grid (M blocks, N blocks, K blocks), accumulator in VMEM scratch."""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.int8_matmul import block


def matmul(cfg, a, b, a_scale, b_scale, a_zero, b_zero, out_dtype, interpret=False):
    M, K = a.shape
    N = b.shape[1]
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    G = a_scale.shape[1]
    nk = K // bk

    def kernel(a_ref, b_ref, as_ref, bs_ref, *rest):
        za_ref, zb_ref, out_ref, acc_ref = rest if cfg.zero_points else (None, None, *rest)
        kk = pl.program_id(2)

        @pl.when(kk == 0)
        def _init():
            acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)

        zeros = (za_ref[...], zb_ref[...]) if cfg.zero_points else (None, None)
        acc_ref[...] += block.step(cfg, kk, a_ref[...], b_ref[...], as_ref[...], bs_ref[...], *zeros)

        @pl.when(kk == nk - 1)
        def _finish():
            out_ref[...] = block.finish(cfg, acc_ref[...], as_ref[...], bs_ref[...]).astype(out_ref.dtype)

    in_specs = [
        pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
        pl.BlockSpec((bk, bn), lambda i, j, kk: (kk, j)),
        pl.BlockSpec((bm, G), lambda i, j, kk: (i, 0)),
        pl.BlockSpec((G, bn), lambda i, j, kk: (0, j)),
    ]
    args = [a, b, a_scale, b_scale]
    if cfg.zero_points:
        in_specs += [pl.BlockSpec((bm, 1), lambda i, j, kk: (i, 0)), pl.BlockSpec((1, bn), lambda i, j, kk: (0, j))]
        args += [a_zero, b_zero]
    return pl.pallas_call(
        kernel,
        grid=(M // bm, N // bn, nk),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        out_shape=jax.ShapeDtypeStruct((M, N), out_dtype),
        scratch_shapes=[pltpu.VMEM((bm, bn), cfg.acc_dtype)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(*args)
