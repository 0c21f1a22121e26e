"""Every flash-attention kernel (forward, dq, dk/dv) compiles for TPU v5e and lowers to Triton."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P
from lowering import TPU_KERNEL, TRITON_KERNEL, compile_for_tpu, lower_for_cuda

from pallas_kernels.flash_attention import flash_attention

B, H = 4, 4

# name -> (T, S, KVH, dtype, options given the extra array inputs)
CONFIGS = {
    "gqa_causal_relpos_f32": (300, 300, 2, jnp.float32, lambda x: dict(causal=True, relpos_bias=(x, True, 128))),
    "mqa_packed_prefix_alibi_bf16": (
        256,
        256,
        1,
        jnp.bfloat16,
        lambda x: dict(
            prefix_length=jnp.full((B,), 40, jnp.int32),
            segment_ids=jnp.ones((B, 256), jnp.int32),
            q_positions=jnp.arange(256),
            alibi_slopes=x[:, 0],
        ),
    ),
    "cross_window_sinks_bias_bf16": (
        200,
        384,
        4,
        jnp.bfloat16,
        lambda x: dict(
            window=64,
            sinks=4,
            bias=jnp.zeros((1, H, 200, 384)) + x[None, :, :1, None],
            kv_positions=jnp.arange(384) + 3,
        ),
    ),
    # A cached decoding step: one new query over a 40-slot cache, later slots hidden by causality.
    "decode_step_gqa_relpos_bf16": (
        1,
        40,
        2,
        jnp.bfloat16,
        lambda x: dict(
            causal=True, q_positions=jnp.full((B, 1), 17), kv_positions=jnp.arange(40), relpos_bias=(x, False, 128)
        ),
    ),
}


def _fns(name, backend, **blocks):
    """(forward, forward+backward) taking (q, k, v, table)."""
    T, S, KVH, dtype, options = CONFIGS[name]

    def fwd(q, k, v, x):
        return flash_attention(q, k, v, **options(x), backend=backend, **blocks)

    def fwd_bwd(q, k, v, x):
        loss = lambda *a: jnp.sum(fwd(*a).astype(jnp.float32) ** 2)  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, x)

    shapes = [jax.ShapeDtypeStruct(s, dtype) for s in ((B, T, H, 64), (B, S, KVH, 64), (B, S, KVH, 64))]
    return fwd, fwd_bwd, shapes + [jax.ShapeDtypeStruct((H, 32), jnp.float32)]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tpu_kernels_compile_for_v5e(name):
    fwd, fwd_bwd, shapes = _fns(name, "tpu", block_q=128, block_k=128)
    assert compile_for_tpu(fwd, *shapes).count(TPU_KERNEL) == 1
    assert compile_for_tpu(fwd_bwd, *shapes).count(TPU_KERNEL) == 3  # forward, dq, dk/dv


def test_tpu_kernels_compile_with_default_blocks_sharded_over_batch():
    fwd, fwd_bwd, shapes = _fns("gqa_causal_relpos_f32", "tpu")
    specs = [P("data")] * 3 + [P()]
    assert compile_for_tpu(fwd, *shapes, specs=specs, out_specs=P("data")).count(TPU_KERNEL) == 1

    def fwd_bwd_per_shard(*args):  # the table's gradient stays per shard, stacked: enough to compile
        dq, dk, dv, dtable = fwd_bwd(*args)
        return dq, dk, dv, dtable[None]

    compiled = compile_for_tpu(fwd_bwd_per_shard, *shapes, specs=specs, out_specs=(P("data"),) * 4)
    assert compiled.count(TPU_KERNEL) == 3


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_gpu_kernels_lower_to_triton(name):
    fwd, fwd_bwd, shapes = _fns(name, "gpu")
    assert lower_for_cuda(fwd, *shapes).count(TRITON_KERNEL) == 1
    assert lower_for_cuda(fwd_bwd, *shapes).count(TRITON_KERNEL) == 3
