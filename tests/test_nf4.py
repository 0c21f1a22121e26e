"""QLoRA's NF4 weights and double quantisation: the levels against bitsandbytes' published table,
rounding against a float64 numpy reference, NF4 against int4 on normal weights, the stored layout
and its size, a tiny model rounded from float (forward pass checked against a numpy dequantisation
of the stored bytes), LoRA on an NF4 base, and the configs that are refused."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from t5lite.config import AdapterConfig, ModelConfig, WeightQuantConfig
from t5lite.layers.dense import DenseGeneral, Lora, WeightQuant
from t5lite.layers.quant import (
    NF4_LEVELS,
    Scheme,
    dequantize,
    dequantize_scales,
    fit,
    pack_int4,
    quantize,
    quantize_scales,
    unpack_int4,
)
from t5lite.models import abstract_params, build
from t5lite.quantization.weights import quantize_weights
from t5lite.train import checkpoint
from t5lite.train.pretrained import pretrained_params

# bitsandbytes' NF4 table, `get_4bit_type("nf4")` in bitsandbytes/functional.py (as published).
BNB_NF4 = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
)
BASE = ModelConfig(
    architecture="encoder_decoder",
    vocab_size=64,
    d_model=32,
    num_heads=2,
    head_dim=16,
    d_ff=64,
    num_encoder_layers=1,
    num_decoder_layers=2,
    mlp_activation="geglu",
    dtype="float32",
    tie_embeddings=False,
)
RECIPE = dict(bits=4, group_size=16, format="nf4", double_quant=True)
NF4 = BASE.replace(weight_quant=WeightQuantConfig(families=("attention", "mlp"), **RECIPE))
ALL = ("query", "key", "value", "out", "mlp_in", "mlp_out")


def normal(k, n, seed=0):
    return np.random.RandomState(seed).randn(k, n).astype(np.float32)


def reference_nf4(w, group):
    """(level indices [K, N], abs-max scales [G, N]) in float64: each value of w / absmax goes to
    the nearest of bitsandbytes' levels (a group of zeros: scale 1)."""
    k, n = w.shape
    grouped = np.asarray(w, np.float64).reshape(k // group, group, n)
    absmax = np.abs(grouped).max(axis=1)
    absmax = np.where(absmax > 0, absmax, 1.0)
    normalised = (grouped / absmax[:, None]).reshape(k, n)
    return np.abs(normalised[..., None] - BNB_NF4).argmin(-1), absmax


def ambiguous(w, absmax, group, tol=1e-5):
    """Where w / absmax lies within `tol` of a midpoint between two levels (either rounding is right)."""
    normalised = np.asarray(w, np.float64) / np.repeat(absmax, group, axis=0)
    midpoints = (BNB_NF4[1:] + BNB_NF4[:-1]) / 2
    return (np.abs(normalised[..., None] - midpoints) < tol).any(-1)


@functools.partial(jax.jit, static_argnums=1)
def round_trip(w, scheme):
    """(q, scale, zero, dequantised w) of w [K, N] (jitted: one compile, not one per small op)."""
    scale, zero = fit(w, scheme)
    q = quantize(w, scale, zero, scheme)
    return q, scale, zero, dequantize(q, scale, zero, scheme)


def mse(scheme, w):
    return float(np.mean((np.asarray(round_trip(w, scheme)[3]) - w) ** 2))


def test_levels_are_bitsandbytes_nf4():
    assert NF4_LEVELS.shape == (16,) and np.all(np.diff(NF4_LEVELS) > 0)
    assert NF4_LEVELS[7] == 0.0 and NF4_LEVELS[0] == -1.0 and NF4_LEVELS[-1] == 1.0
    np.testing.assert_allclose(NF4_LEVELS, BNB_NF4, rtol=0, atol=1e-6)


def test_nf4_rounds_to_the_nearest_level():
    group, w = 32, normal(256, 24)
    w[:32, 0] = 0.0  # an all-zero group stays zero
    q, scale, _, dequantised = map(np.asarray, round_trip(w, Scheme(4, group_size=group, format="nf4")))
    index, absmax = reference_nf4(w, group)
    np.testing.assert_allclose(scale, absmax, rtol=1e-7)
    assert q.dtype == np.int8 and q.min() >= -8 and q.max() <= 7
    sure = ~ambiguous(w, absmax, group)
    assert sure.mean() > 0.999
    np.testing.assert_array_equal((q + 8)[sure], index[sure])
    np.testing.assert_array_equal(np.asarray(unpack_int4(pack_int4(q))), q)
    reference = np.repeat(absmax, group, axis=0) * BNB_NF4[index]
    np.testing.assert_allclose(dequantised[sure], reference[sure], rtol=0, atol=1e-6)
    assert np.all(dequantised[:32, 0] == 0.0)


@pytest.mark.parametrize("group", [32, 64])
def test_nf4_beats_uniform_int4_on_normal_weights(group):
    """The reason NF4 exists: at the same 4 bits and group, levels at normal quantiles lose less than
    symmetric int4's evenly spaced ones (measured: 0.81x the MSE at 32, 0.73x at 64)."""
    w = normal(1024, 64)
    nf4, int4 = mse(Scheme(4, group_size=group, format="nf4"), w), mse(Scheme(4, group_size=group), w)
    assert nf4 < 0.85 * int4, (nf4, int4)


@pytest.mark.parametrize("format, symmetric", [("nf4", True), ("int", True), ("int", False)])
def test_double_quant_stores_int8_scales_close_to_single(format, symmetric):
    group, w = 64, normal(512, 48)
    w[:64, 3] *= 1e-4  # a tiny group next to ordinary ones keeps a nonzero scale
    single = Scheme(4, symmetric, group, format=format)
    double = dataclasses.replace(single, double_quant=True)
    q, scale, _, w1 = map(np.asarray, round_trip(w, single))
    dq, dq_scale, _, w2 = map(np.asarray, round_trip(w, double))
    codes, step = quantize_scales(dq_scale)
    assert codes.dtype == jnp.int8 and codes.shape == (8, 48) and step.dtype == jnp.float32 and step.shape == (1, 48)
    # The fitted scales are what the stored codes give back (the step to an ulp), within half a step
    # of the single-level scales (or, below half a step, raised to one step: never zero).
    np.testing.assert_allclose(dequantize_scales(codes, step), dq_scale, rtol=1e-6)
    np.testing.assert_array_equal(quantize_scales(scale)[0], codes)
    assert np.all(np.abs(dq_scale - scale) <= np.maximum(step / 2, step - scale) * (1 + 1e-6))
    assert np.all(dq_scale > 0)
    if format == "nf4":  # a changed scale moves few values across a midpoint, the others by |level| <= 1 times it
        same = q == dq
        assert same.mean() > 0.99
        assert np.all(np.abs(w1 - w2)[same] <= np.broadcast_to(step, w.shape)[same] * (1 + 1e-6))
    assert np.mean((w2 - w) ** 2) < 1.01 * np.mean((w1 - w) ** 2)


def nf4_indices(packed, n):
    """Level indices [K, N] of packed nibbles (row 2i low, 2i + 1 high), each stored as index - 8."""
    byte = np.asarray(packed).reshape(-1, n).astype(np.uint8)
    return (np.stack([byte & 0xF, byte >> 4], axis=1).reshape(-1, n) + 8) % 16


def stored_bits(scheme, k=256, features=(4, 8)):
    """Bits per weight of a quantised dense layer, counted from its parameter tree (shapes only)."""
    layer = DenseGeneral(features, ("embed", "heads", "kv"), weight_quant=WeightQuant(scheme))
    params = nn.unbox(jax.eval_shape(layer.init, jax.random.PRNGKey(0), jnp.ones((1, k)))["params"])
    return sum(v.size * v.dtype.itemsize * 8 for v in params.values()) / (k * np.prod(features))


def test_stored_layout_bits_per_weight_and_lora_on_top():
    int4, nf4 = stored_bits(Scheme(4, group_size=64)), stored_bits(Scheme(4, group_size=64, format="nf4"))
    double = stored_bits(Scheme(4, group_size=64, format="nf4", double_quant=True))
    assert int4 == nf4 == 4 + 32 / 64  # 4.5: a float32 scale per 64 weights
    assert double == 4 + 8 / 64 + 32 / 256 < int4  # 4.25: an int8 code per 64, a float32 per feature (K = 256)
    # A layer with a LoRA adapter on the stored init: it computes x times what the bytes hold, its
    # adapter (B zero) adds nothing yet, and gradients reach the adapter and the inputs.
    layer = DenseGeneral(
        (4, 8),
        ("embed", "heads", "kv"),
        lora=Lora(rank=2, scale=1.0),
        weight_quant=WeightQuant(Scheme(4, group_size=64, format="nf4", double_quant=True)),
    )
    x = jnp.asarray(normal(3, 256))
    params = nn.unbox(layer.init(jax.random.PRNGKey(0), x)["params"])
    assert {p: (v.shape, v.dtype) for p, v in params.items() if "lora" not in p} == {
        "kernel": ((128, 4, 8), jnp.int8),
        "kernel_scale": ((4, 4, 8), jnp.int8),
        "kernel_scale_scale": ((1, 4, 8), jnp.float32),
    }
    scale = (np.asarray(params["kernel_scale"], np.float64).reshape(4, 32) + 128) * np.asarray(
        params["kernel_scale_scale"], np.float64
    ).reshape(1, 32)
    kernel = np.repeat(scale, 64, axis=0) * BNB_NF4[nf4_indices(params["kernel"], 32)]
    stored = {p: v for p, v in params.items() if "lora" not in p}  # frozen; the adapter is differentiated
    loss = lambda adapter, x: jnp.sum(layer.apply({"params": {**stored, **adapter}}, x) ** 2)  # noqa: E731
    y, (adapter_grad, x_grad) = jax.value_and_grad(loss, argnums=(0, 1))(
        {p: v for p, v in params.items() if "lora" in p}, x
    )
    out = np.asarray(x, np.float64) @ kernel
    np.testing.assert_allclose(y, np.sum(out**2), rtol=1e-5)
    np.testing.assert_allclose(x_grad, 2 * out @ kernel.T, rtol=1e-4, atol=1e-3)
    assert np.abs(adapter_grad["lora_b"]).min() > 0 and not np.any(adapter_grad["lora_a"])  # B = 0: A waits


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_layer_with_double_quant_reads_its_codes_back(symmetric):
    """Double quantisation is a layout of any grouped scheme: int4 runs the weight-only kernel (or,
    with zero points, XLA) on the scales its int8 codes give back."""
    layer = DenseGeneral((32,), ("embed", "mlp"), weight_quant=WeightQuant(Scheme(4, symmetric, 64, double_quant=True)))
    x = jnp.asarray(normal(3, 128))
    params = nn.unbox(layer.init(jax.random.PRNGKey(0), x)["params"])
    assert params["kernel_scale"].dtype == jnp.int8 and params["kernel_scale_scale"].shape == (1, 32)
    scale = dequantize_scales(params["kernel_scale"], params["kernel_scale_scale"])
    w = dequantize(unpack_int4(params["kernel"]), scale, None if symmetric else params["kernel_zero"])
    np.testing.assert_allclose(layer.apply({"params": params}, x), x @ w, rtol=0, atol=1e-4)


def dequantised(config, params):
    """The float model holding what the stored NF4 bytes and int8 scale codes say, in numpy."""
    float_config = config.replace(weight_quant=WeightQuantConfig())
    shapes = traverse_util.flatten_dict(abstract_params(float_config), sep="/")
    flat, out = traverse_util.flatten_dict(params, sep="/"), {}
    for path, value in flat.items():
        module, name = path.rsplit("/", 1)
        if name in ("kernel_scale", "kernel_scale_scale"):
            continue
        out[path] = value
        if name == "kernel" and value.dtype == np.int8:  # stacked layers first (scan_layers)
            codes, step = np.asarray(flat[f"{module}/kernel_scale"]), np.asarray(flat[f"{module}/kernel_scale_scale"])
            layers, n = codes.shape[0], codes[0, 0].size
            scales = (codes.reshape(layers, -1, n) + 128.0) * step.reshape(layers, 1, n)
            kernels = [
                np.repeat(scale, config.weight_quant.group_size, axis=0) * BNB_NF4[nf4_indices(packed, n)]
                for scale, packed in zip(scales, np.asarray(value))
            ]
            out[path] = np.stack(kernels).reshape(shapes[path].shape).astype(np.float32)
    return float_config, traverse_util.unflatten_dict(out, sep="/")


@functools.partial(jax.jit, static_argnums=0)
def logits(config, params, batch):
    return build(config).apply({"params": params}, **batch, enable_dropout=False)


def batch(seed=0):
    rs = np.random.RandomState(seed)
    targets = rs.randint(1, 64, (4, 6))
    return {
        "encoder_input_tokens": jnp.asarray(rs.randint(1, 64, (4, 7))),
        "decoder_input_tokens": jnp.asarray(np.concatenate([np.zeros((4, 1), int), targets[:, :-1]], 1)),
        "decoder_target_tokens": jnp.asarray(targets),
    }


def features(data):
    return {k: v for k, v in data.items() if k != "decoder_target_tokens"}


@functools.cache
def float_base():
    """BASE's parameters, the kernels and embeddings drawn from N(0, 1 / d_model) as trained weights
    roughly are (NF4's premise), norm scales 1; drawn in numpy to spare the compile of an init."""
    rs = np.random.RandomState(0)
    flat = traverse_util.flatten_dict(abstract_params(BASE), sep="/")
    return traverse_util.unflatten_dict(
        {
            path: np.ones(leaf.shape, np.float32)
            if path.endswith("/scale")
            else (rs.randn(*leaf.shape) / np.sqrt(BASE.d_model)).astype(np.float32)
            for path, leaf in flat.items()
        },
        sep="/",
    )


@functools.cache
def nf4_model():
    """(config, params, logits) of the float base rounded to NF4 with double quantisation."""
    config, params = quantize_weights(BASE, float_base(), **RECIPE)
    return config, params, np.asarray(logits(config, params, features(batch())))


def test_tiny_model_rounded_to_nf4_with_double_quant():
    config, params, out = nf4_model()
    assert config == NF4
    flat = traverse_util.flatten_dict(params, sep="/")
    query = "encoder/layers/attention/query"  # [layers, d_model / 2, heads, head_dim]: two inputs a byte
    assert flat[f"{query}/kernel"].dtype == jnp.int8 and flat[f"{query}/kernel"].shape == (1, 16, 2, 16)
    assert flat[f"{query}/kernel_scale"].dtype == jnp.int8 and flat[f"{query}/kernel_scale"].shape == (1, 2, 2, 16)
    assert flat[f"{query}/kernel_scale_scale"].shape == (1, 1, 2, 16)
    assert flat["decoder/logits_dense/kernel"].dtype == jnp.float32  # the output layer stays in float
    # The model computes what its bytes say, and stays near the float model it was rounded from
    # (relative RMS error of the logits, measured: 0.39; uniform int4 in the same groups 0.51, int8 0.034).
    np.testing.assert_allclose(out, logits(*dequantised(config, params), features(batch())), rtol=0, atol=1e-4)
    reference = np.asarray(logits(BASE, float_base(), features(batch())))
    assert np.sqrt(np.mean((out - reference) ** 2) / np.mean(reference**2)) < 0.45


def test_lora_on_an_nf4_base(tmp_path):
    """QLoRA: a float base rounded to NF4 on load (`train.init_from`); adapters start at zero, so the
    adapted model starts as its base, and change it once trained (B nonzero)."""
    checkpoint.save_params(tmp_path / "base", BASE, float_base())
    config, (_, expected, base_logits) = NF4.replace(adapters=AdapterConfig(lora_rank=4, lora_targets=ALL)), nf4_model()
    base = pretrained_params(config, str(tmp_path / "base"))
    for path, value in traverse_util.flatten_dict(expected, sep="/").items():
        np.testing.assert_array_equal(base[path], value, err_msg=path)
    rs = np.random.RandomState(0)
    shapes = traverse_util.flatten_dict(abstract_params(config), sep="/")
    adapters = {
        p: (rs.randn(*x.shape) * 0.1 if "lora_a" in p else np.zeros(x.shape)).astype(np.float32)
        for p, x in shapes.items()
        if "lora_" in p
    }
    assert set(shapes) == set(base) | set(adapters)
    params = traverse_util.unflatten_dict({**base, **adapters}, sep="/")
    np.testing.assert_array_equal(logits(config, params, features(batch())), base_logits)
    trained = traverse_util.unflatten_dict({**base, **{p: x + 0.1 for p, x in adapters.items()}}, sep="/")
    assert np.abs(logits(config, trained, features(batch())) - base_logits).max() > 1e-2


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(format="fp4"), "format"),
        (dict(format="nf4", group_size=16), "got bits=8"),
        (dict(format="nf4", bits=4), "group_size=None"),
        (dict(format="nf4", bits=4, group_size=16, zero_points=True), "zero_points=True"),
        (dict(double_quant=True), "double_quant"),
        (dict(double_quant=1, group_size=16), "double_quant"),
        (dict(bits=4, group_size=48), "group_size=48 must divide the inputs of every quantised kernel"),
    ],
)
def test_bad_configs_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        BASE.replace(weight_quant=WeightQuantConfig(families=("attention", "mlp"), **changes))


def test_refused_recipes():
    for method in ("gptq", "awq", "llm_int8", "smoothquant"):
        with pytest.raises(ValueError, match=f"method='{method}'.*use method='int8'"):
            quantize_weights(BASE, float_base(), method=method, **RECIPE)
    with pytest.raises(ValueError, match="method='gptq'"):
        quantize_weights(BASE, float_base(), method="gptq", bits=4, group_size=16, double_quant=True)
    with pytest.raises(ValueError, match="format='nf4'"):
        Scheme(8, group_size=16, format="nf4")
    with pytest.raises(ValueError, match="double_quant"):
        Scheme(4, double_quant=True)
    with pytest.raises(ValueError, match="weight-only"):
        WeightQuant(Scheme(4, group_size=16, format="nf4"), activations="int8")
