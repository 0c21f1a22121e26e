"""int8 matmul against integer and float64 references, its lowering, and the quantised dense layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_testing import RNG, SCALINGS, A, B, G, M, N, check_int8_matmul
from lowering import TPU_KERNEL, TRITON_KERNEL, compile_for_tpu, lower_for_cuda

from pallas_kernels.int8_matmul import (
    dequantize,
    int8_dense,
    int8_matmul,
    quantize,
    quantize_weight,
    weight_only_dense,
)

BACKENDS = ["interpret", "gpu_interpret", "xla"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_products_are_exact(backend):
    """Unit scales: the result is the int32 matmul itself (|values| < 2**24, exact in float32)."""
    out = int8_matmul(A, B, 1.0, 1.0, jnp.float32, backend=backend)
    np.testing.assert_array_equal(np.asarray(out), A.astype(np.int64) @ B.astype(np.int64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(SCALINGS))
def test_matches_dequantised_float_matmul(name, backend):
    check_int8_matmul(name, backend)


def test_bfloat16_output_and_odd_shapes():
    a, b = A[:37, :200], B[:200, :51]
    out = int8_matmul(a, b, 0.01, 0.02, backend="interpret")
    assert out.dtype == jnp.bfloat16 and out.shape == (37, 51)
    ref = (a.astype(np.int64) @ b.astype(np.int64)) * 0.01 * 0.02
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=1e-2, atol=1e-2 * np.abs(ref).max())


@pytest.mark.parametrize(
    "args,message",
    [
        (dict(a=A.astype(np.int32)), "must be int8"),
        (dict(b=B[:100]), "a \\[M, K\\] and b \\[K, N\\]"),
        (dict(a_scale=np.ones((M, 3))), "do not divide K"),
        (dict(a_scale=np.ones((M, 4)), b_scale=np.ones((2, N))), "same groups"),
        (dict(a_zero_point=np.ones(5, np.int32)), "a_zero_point"),
        (dict(backend="cpu"), "unknown backend"),
    ],
)
def test_bad_arguments_raise_value_error(args, message):
    call = dict(a=A, b=B, a_scale=1.0, b_scale=1.0, backend="interpret") | args
    with pytest.raises(ValueError, match=message):
        int8_matmul(call.pop("a"), call.pop("b"), call.pop("a_scale"), call.pop("b_scale"), **call)


@pytest.mark.parametrize("name", ["tensor", "channel_zero_points", "group"])
def test_kernels_compile_for_tpu_and_lower_to_triton(name):
    a_scale, b_scale, a_zero, b_zero = SCALINGS[name]
    shapes = [jax.ShapeDtypeStruct((512, 1024), jnp.int8), jax.ShapeDtypeStruct((1024, 384), jnp.int8)]
    scales = [
        np.resize(s, (512, G) if s.ndim == 2 and s.shape[0] == M else s.shape) if s.ndim else s
        for s in (a_scale, b_scale)
    ]
    b_scale = (
        np.ones((G, 384), np.float32) if name == "group" else np.resize(b_scale, (1, 384)) if b_scale.ndim else b_scale
    )

    def make(backend):
        def fn(a, b):
            return int8_matmul(
                a,
                b,
                scales[0],
                b_scale,
                a_zero_point=a_zero,
                b_zero_point=None if b_zero is None else np.resize(b_zero, 384),
                backend=backend,
            )

        return fn

    assert compile_for_tpu(make("tpu"), *shapes).count(TPU_KERNEL) == 1
    assert lower_for_cuda(make("gpu"), *shapes).count(TRITON_KERNEL) == 1


def test_quantize_round_trip_within_half_a_step():
    x = RNG.randn(16, 64).astype(np.float32)
    for axis, group in [(None, None), (1, None), (1, 16), (0, 8)]:
        q, scale = quantize(x, axis=axis, group_size=group)
        assert q.dtype == jnp.int8
        step = np.asarray(dequantize(np.ones_like(q), scale, axis=axis))
        assert np.all(np.abs(np.asarray(dequantize(q, scale, axis=axis)) - x) <= step / 2 + 1e-7)


def test_int8_dense_forward_and_straight_through_gradients():
    x = jnp.asarray(RNG.randn(2, 8, 64), jnp.float32)
    w = jnp.asarray(RNG.randn(64, 48) * 0.1, jnp.float32)
    ct = jnp.asarray(RNG.randn(2, 8, 48), jnp.float32)
    y, vjp = jax.vjp(lambda x, w: int8_dense(x, w, backward_dtype=jnp.float32, backend="interpret"), x, w)
    y_ref, vjp_ref = jax.vjp(lambda x, w: jnp.dot(x, w, precision="highest"), x, w)
    assert y.shape == (2, 8, 48)
    assert np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref) < 2e-2  # int8 rounding of both operands
    for g, g_ref in zip(vjp(ct), vjp_ref(ct)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-5, atol=1e-5)
    for group_size in (16, None):  # per K group (dequantises the weight), per column (scales the output)
        wq, ws = quantize_weight(w, group_size=group_size)
        y_wo = weight_only_dense(x, wq, ws)
        exact = np.asarray(x, np.float64) @ np.asarray(dequantize(wq, ws, axis=0), np.float64)
        np.testing.assert_allclose(np.asarray(y_wo), exact, rtol=1e-5, atol=1e-5)
        assert np.linalg.norm(y_wo - y_ref) / np.linalg.norm(y_ref) < 1e-2


def test_int8_trained_mlp_reaches_float_loss():
    """A 2-layer MLP trained with int8 forwards ends within 2% of the starting loss of its float32
    twin's final loss (int8 rounding sets a noise floor far below where training starts)."""
    r = np.random.RandomState(1)
    x = jnp.asarray(r.randn(64, 16), jnp.float32)
    y = jnp.sin(x @ jnp.asarray(r.randn(16, 1), jnp.float32))
    init = [jnp.asarray(r.randn(16, 32) * 0.3, jnp.float32), jnp.asarray(r.randn(32, 1) * 0.3, jnp.float32)]

    def train(dense):
        def loss(params):
            return jnp.mean((dense(jnp.tanh(dense(x, params[0])), params[1]) - y) ** 2)

        @jax.jit
        def step(params):
            value, grads = jax.value_and_grad(loss)(params)
            return [p - 0.2 * g for p, g in zip(params, grads)], value

        params = init
        for _ in range(150):
            params, value = step(params)
        return float(loss(params)), float(loss(init))

    float_loss, start = train(lambda a, w: jnp.dot(a, w, precision="highest"))
    int8_loss, _ = train(lambda a, w: int8_dense(a, w, backward_dtype=jnp.float32, backend="interpret"))
    assert float_loss < 0.05 * start
    assert int8_loss < float_loss + 0.02 * start
