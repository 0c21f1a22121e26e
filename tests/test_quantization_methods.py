"""Post-training quantisation methods against round-to-nearest and naive int8 baselines, measured
as layer output error in numpy float64; the int8 paths against float64 products of the same
quantised operands."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.int8_matmul import quantize as quantize_absmax
from t5lite.layers.int8_matmul import llm_int8_matmul, smoothquant_matmul, vectorwise_matmul
from t5lite.layers.quant import Scheme, dequantize, fit, quantize
from t5lite.quantization.awq import awq
from t5lite.quantization.gptq import gptq, hessian
from t5lite.quantization.smoothquant import smoothing_factors, smoothquant_weights

K, N = 128, 128  # one shape for every int8_matmul call: the Pallas interpreter compiles per shape
rng = np.random.default_rng(0)
W = (rng.normal(size=(K, N)) / np.sqrt(K)).astype(np.float32)


def gaussian(m):
    return np.random.default_rng(1).normal(size=(m, K)).astype(np.float32)


def correlated(m):
    """Mixed Gaussian features: a Hessian far from diagonal, as real activations give."""
    r = np.random.default_rng(2)
    return (r.normal(size=(m, K)) @ r.normal(size=(K, K)) / np.sqrt(K)).astype(np.float32)


def with_outliers(x, channels, factor):
    x = x.copy()
    x[..., channels] *= factor
    return x


def rtn(w, scheme):
    """Round-to-nearest dequantised weight, float64."""
    scale, zero = fit(w, scheme)
    return f64(dequantize(quantize(w, scale, zero, scheme), scale, zero))


def f64(a):
    return np.asarray(a, np.float64)


def output_error(x, w, x_used, w_used):
    """||x @ w - x_used @ w_used||_F in float64."""
    return np.linalg.norm(f64(x) @ f64(w) - f64(x_used) @ f64(w_used))


# GPTQ


@pytest.mark.parametrize("activations", [gaussian, correlated])
@pytest.mark.parametrize(
    "scheme", [Scheme(bits=4), Scheme(bits=4, group_size=32), Scheme(bits=8), Scheme(bits=8, group_size=32)], ids=str
)
def test_gptq_reconstructs_layer_better_than_rtn(activations, scheme):
    x = activations(512)
    q, scale, zero = gptq(W, hessian(x), scheme)
    err_gptq = output_error(x, W, x, dequantize(q, scale, zero))
    err_rtn = output_error(x, W, x, rtn(W, scheme))
    bound = 0.8 if activations is correlated else 1.0  # correlated inputs leave much more to correct
    assert err_gptq < bound * err_rtn, f"GPTQ {err_gptq:.4g} vs RTN {err_rtn:.4g}"


@pytest.mark.parametrize(
    "scheme",
    [Scheme(bits=4, symmetric=False, group_size=32), Scheme(bits=4, per_tensor=True), Scheme(bits=8, symmetric=False)],
    ids=str,
)
def test_gptq_values_in_range_with_scheme_shapes(scheme):
    q, scale, zero = gptq(W, hessian(correlated(256)), scheme)
    assert q.dtype == jnp.int8 and q.shape == (K, N)
    assert scheme.qmin <= int(q.min()) and int(q.max()) <= scheme.qmax
    groups = (1, 1) if scheme.per_tensor else (scheme.groups(K), N)
    assert scale.shape == zero.shape == groups


@pytest.mark.parametrize("scheme", [Scheme(bits=4), Scheme(bits=8), Scheme(bits=4, symmetric=False)], ids=str)
def test_gptq_with_identity_hessian_is_rtn(scheme):
    """H = I: inputs are independent, so no error is worth spreading."""
    q, scale, zero = gptq(W, 3.0 * np.eye(K), scheme)
    scale_rtn, zero_rtn = fit(W, scheme)
    np.testing.assert_array_equal(q, quantize(W, scale_rtn, zero_rtn, scheme))
    np.testing.assert_array_equal(scale, scale_rtn)


def test_gptq_block_size_does_not_change_the_result():
    """Lazy batching only reorders the same updates, including blocks that do not align with groups."""
    h, scheme = hessian(correlated(256)), Scheme(bits=4, group_size=32)
    q, *_ = gptq(W, h, scheme, block_size=128)
    for block_size in (1, 7, 48):
        np.testing.assert_array_equal(gptq(W, h, scheme, block_size=block_size)[0], q)


def test_gptq_zeroes_dead_inputs():
    x = correlated(256)
    x[:, [5, 77]] = 0.0
    q, *_ = gptq(W, hessian(x), Scheme(bits=4, group_size=32))
    assert not np.any(np.asarray(q)[[5, 77]])


# AWQ


@pytest.mark.parametrize("scheme", [Scheme(bits=4, group_size=32), Scheme(bits=4)], ids=str)
def test_awq_beats_rtn_on_outlier_activations(scheme):
    x = with_outliers(gaussian(256), [3, 40, 77, 120], 50.0)
    q, scale, zero, s = awq(W, x, scheme)
    err_awq = output_error(x, W, x / f64(s), dequantize(q, scale, zero))
    err_rtn = output_error(x, W, x, rtn(W, scheme))
    assert err_awq < 0.9 * err_rtn, f"AWQ {err_awq:.4g} vs RTN {err_rtn:.4g}"
    assert s.shape == (K,) and not np.allclose(s, 1.0)


@pytest.mark.parametrize("activations", [gaussian, correlated])
def test_awq_never_worse_than_rtn(activations):
    x, scheme = activations(256), Scheme(bits=4, group_size=32)
    q, scale, zero, s = awq(W, x, scheme)
    err_awq = output_error(x, W, x / f64(s), dequantize(q, scale, zero))
    err_rtn = output_error(x, W, x, rtn(W, scheme))
    assert err_awq <= err_rtn * (1 + 1e-5), f"AWQ {err_awq:.6g} vs RTN {err_rtn:.6g}"


def test_awq_first_candidate_is_rtn():
    scheme = Scheme(bits=4, group_size=32)
    q, scale, zero, s = awq(W, with_outliers(gaussian(256), [3], 50.0), scheme, grid=1)
    scale_rtn, zero_rtn = fit(W, scheme)
    np.testing.assert_array_equal(s, np.ones(K))
    np.testing.assert_array_equal(q, quantize(W, scale_rtn, zero_rtn, scheme))


# SmoothQuant


def test_smoothing_factors_formula():
    x_absmax = np.array([4.0, 0.0, 9.0, 1.0])
    w = np.array([[1.0, -0.5], [2.0, 1.0], [0.0, -4.0], [0.0, 0.0]])
    np.testing.assert_allclose(smoothing_factors(x_absmax, w), [2.0, 1.0, 1.5, 1.0], rtol=1e-6)
    np.testing.assert_allclose(
        smoothing_factors(x_absmax, w, alpha=0.75), [4**0.75, 1.0, 9**0.75 / 4**0.25, 1.0], rtol=1e-6
    )


def test_smoothquant_beats_naive_w8a8_on_outlier_activations():
    x = with_outliers(gaussian(64), [3, 50, 90], 60.0)
    s = smoothing_factors(np.abs(x).max(axis=0), W)
    err_smooth = output_error(x, W, smoothquant_matmul(x, *smoothquant_weights(W, s), s), np.eye(N))
    ones = jnp.ones(K)
    err_naive = output_error(x, W, smoothquant_matmul(x, *smoothquant_weights(W, ones), ones), np.eye(N))
    assert err_smooth < 0.5 * err_naive, f"SmoothQuant {err_smooth:.4g} vs naive W8A8 {err_naive:.4g}"


def test_smoothquant_matmul_is_exact_int8_product_with_batch_dims():
    x = with_outliers(gaussian(64), [3, 50, 90], 60.0).reshape(2, 32, K)
    s = smoothing_factors(np.abs(x).max(axis=(0, 1)), W)
    q, w_scale = smoothquant_weights(W, s)
    assert q.dtype == jnp.int8 and w_scale.shape == (1, N)
    y = smoothquant_matmul(x, q, w_scale, s)
    assert y.shape == (2, 32, N) and y.dtype == jnp.float32
    xq, x_scale = quantize_absmax(jnp.asarray(x.reshape(64, K)) / s, axis=1)
    expected = (f64(xq) * f64(x_scale)) @ (f64(q) * f64(w_scale))
    np.testing.assert_allclose(f64(y).reshape(64, N), expected, rtol=1e-5, atol=1e-5)


# LLM.int8()


def outlier_tokens():
    """[2, 32, K]: N(0, 1) features, two of them around 20-60."""
    x = gaussian(64).reshape(2, 32, K)
    x[..., [7, 100]] = np.random.default_rng(3).uniform(20, 60, size=(2, 32, 2)) * np.sign(x[..., [7, 100]])
    return x


@pytest.mark.parametrize("threshold", [0.0, 3.0])
def test_llm_int8_all_outliers_is_float_matmul(threshold):
    """Every feature reaches |x| = 3 exactly: a feature at the threshold is an outlier too."""
    x = gaussian(64)
    x *= 2.9 / np.abs(x).max()
    x[np.arange(K) % 64, np.arange(K)] = 3.0
    q, w_scale = quantize_absmax(W, axis=0)
    expected = f64(x) @ (f64(q) * f64(w_scale))
    np.testing.assert_allclose(llm_int8_matmul(x, q, w_scale, threshold=threshold), expected, rtol=1e-5, atol=1e-5)


def test_llm_int8_keeps_outlier_features_accurate():
    x = outlier_tokens()
    q, w_scale = quantize_absmax(W, axis=0)
    err_llm = output_error(x, W, llm_int8_matmul(x, q, w_scale), np.eye(N))
    err_vectorwise = output_error(x, W, vectorwise_matmul(x, q, w_scale), np.eye(N))
    xq, x_scale = quantize_absmax(x.reshape(64, K), axis=None)
    wq, w_scale_tensor = quantize_absmax(W, axis=None)
    err_tensor = output_error(x.reshape(64, K), W, f64(xq) * float(x_scale), f64(wq) * float(w_scale_tensor))
    scale = np.linalg.norm(f64(x) @ f64(W))
    message = (
        f"LLM.int8() {err_llm:.4g}, vector-wise int8 {err_vectorwise:.4g}, per-tensor int8 {err_tensor:.4g} "
        f"(|x @ w| = {scale:.4g})"
    )
    assert err_llm < 0.02 * scale, message
    assert err_llm < 0.4 * err_vectorwise and err_llm < 0.4 * err_tensor, message


def test_llm_int8_is_int8_product_plus_float_outliers():
    x = outlier_tokens().reshape(64, K)
    q, w_scale = quantize_absmax(W, axis=0)
    outlier = np.abs(x).max(axis=0) >= 6.0
    assert outlier.sum() == 2
    xq, x_scale = quantize_absmax(np.where(outlier, 0.0, x), axis=1)
    w_deq = f64(q) * f64(w_scale)
    expected = (f64(xq) * f64(x_scale)) @ w_deq + np.where(outlier, f64(x), 0.0) @ w_deq
    np.testing.assert_allclose(llm_int8_matmul(x, q, w_scale, threshold=6.0), expected, rtol=1e-5, atol=1e-4)


def test_llm_int8_under_jit_and_in_bfloat16():
    x = outlier_tokens()
    q, w_scale = quantize_absmax(W, axis=0)
    eager = llm_int8_matmul(x, q, w_scale[0])
    jitted = jax.jit(llm_int8_matmul)(x, q, w_scale)
    assert jitted.shape == (2, 32, N)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-6)
    low = jax.jit(llm_int8_matmul)(jnp.asarray(x, jnp.bfloat16), q, w_scale)
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(f64(low), f64(eager), rtol=0.05, atol=0.1)


# User mistakes


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: gptq(W, np.eye(K - 1), Scheme()), "hessian"),
        (lambda: gptq(W, np.ones((K, K)), Scheme(), damp=0.0), "positive definite"),
        (lambda: awq(W, gaussian(8), Scheme(group_size=48)), "does not divide"),
        (lambda: smoothing_factors(np.ones(K), W, alpha=1.5), "alpha"),
        (lambda: llm_int8_matmul(gaussian(8), jnp.zeros((K, N), jnp.int8), jnp.ones((1, N - 1))), "w_scale"),
        (
            lambda: smoothquant_matmul(gaussian(8), jnp.zeros((K, N), jnp.int8), jnp.ones((1, N)), jnp.ones(K - 1)),
            "s must",
        ),
    ],
)
def test_mistakes_raise_value_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
