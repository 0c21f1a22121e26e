"""The uniform quantiser (round trips within half a step, int4 packing), and quantised models
(RTN int8/int4, GPTQ, AWQ, SmoothQuant, LLM.int8()): the stored weights, the forward pass and
decoding against the float model that holds the dequantised weights (computed here from the
stored bytes), and against the original float model."""

import functools

import jax
import numpy as np
import pytest
from flax import traverse_util

from t5lite.config import WeightQuantConfig
from t5lite.decoding import DecodingOptions, generate
from t5lite.layers.quant import Scheme, dequantize, fit, pack_int4, quantize, unpack_int4
from t5lite.models import abstract_params, build, get_config, init_params
from t5lite.quantization.calibration import calibrate
from t5lite.quantization.weights import quantize_weights

TINY = dict(dtype="float32", vocab_size=64, d_model=32, d_ff=48, num_heads=4, head_dim=8)
CONFIGS = {
    "t5_1_1": get_config("t5_1_1/tiny").replace(**TINY),
    "llama_gqa_unrolled": get_config("llama/tiny").replace(num_kv_heads=2, scan_layers=False, **TINY),
    "switch": get_config("switch/tiny").replace(**TINY),
}
TOKENS = np.random.RandomState(1).randint(1, 64, (3, 10)).astype(np.int32)


@functools.cache
def float_model(name):
    config = CONFIGS[name]
    return config, init_params(config, jax.random.PRNGKey(0))


def dequantised(config, params):
    """The float model computing what the stored bytes hold: S * (q + Z), int4 nibbles unpacked
    (row 2i low, 2i + 1 high), the input scale folded into the kernel's rows."""
    float_config = config.replace(weight_quant=WeightQuantConfig())
    shapes = traverse_util.flatten_dict(abstract_params(float_config), sep="/")
    flat = traverse_util.flatten_dict(params, sep="/")
    out = {}
    for path, value in flat.items():
        module, name = path.rsplit("/", 1)
        if name in ("kernel_scale", "kernel_zero", "input_scale"):
            continue
        if value.dtype == np.int8:
            shape = shapes[path].shape
            layers = shape[0] if float_config.scan_layers else None  # stacked by nn.scan
            stored = {k: v for k, v in flat.items() if k.startswith(module + "/")}
            per_layer = [stored] if layers is None else [{k: v[i] for k, v in stored.items()} for i in range(layers)]
            out[path] = np.stack([_dequantised_kernel(config, s, module) for s in per_layer]).reshape(shape)
        else:
            out[path] = value
    return float_config, traverse_util.unflatten_dict(out, sep="/")


def _dequantised_kernel(config, stored, module):
    scale = np.asarray(stored[f"{module}/kernel_scale"], np.float64)
    n = scale[0].size
    scale = scale.reshape(-1, n)
    q = np.asarray(stored[f"{module}/kernel"]).reshape(-1, n).astype(np.int64)
    if config.weight_quant.bits == 4:
        nibble = lambda v: np.where(v > 7, v - 16, v)  # noqa: E731
        q = np.stack([nibble(q & 0xF), nibble((q >> 4) & 0xF)], axis=1).reshape(-1, n)
    repeat = q.shape[0] // scale.shape[0]
    zero = np.asarray(stored.get(f"{module}/kernel_zero", np.zeros_like(scale))).reshape(-1, n)
    w = np.repeat(scale, repeat, 0) * (q + np.repeat(zero, repeat, 0))
    if f"{module}/input_scale" in stored:
        w = w / np.asarray(stored[f"{module}/input_scale"], np.float64).reshape(-1, 1)
    return w.astype(np.float32)


def logits(config, params):
    features = {"decoder_input_tokens": TOKENS}
    if config.is_encoder_decoder:
        features["encoder_input_tokens"] = TOKENS
    return np.asarray(build(config).apply({"params": params}, **features, enable_dropout=False))


@pytest.mark.parametrize(
    "scheme",
    [
        Scheme(bits, symmetric, group, per_tensor)
        for bits in (8, 4)
        for symmetric in (True, False)
        for group, per_tensor in ((None, False), (16, False), (None, True))
    ],
)
def test_round_trip_error_is_within_half_a_step(scheme):
    w = np.random.RandomState(0).standard_t(3, (64, 24)).astype(np.float32) + 0.3  # heavy tails, off-centre
    scale, zero = fit(w, scheme)
    groups = 1 if scheme.per_tensor else 64 // (scheme.group_size or 64)
    assert scale.shape == zero.shape == ((1, 1) if scheme.per_tensor else (groups, 24))
    q = np.asarray(quantize(w, scale, zero, scheme))
    assert q.min() >= scheme.qmin and q.max() <= scheme.qmax
    if scheme.symmetric:
        np.testing.assert_array_equal(zero, 0)
    step = np.repeat(np.asarray(scale), 64 // scale.shape[0], axis=0)
    assert np.all(np.abs(np.asarray(dequantize(q, scale, zero)) - w) <= step / 2 * (1 + 1e-5))
    # Each group's range is used: its extreme values land on the ends of the integer range.
    blocks = q.reshape(1, -1, 1) if scheme.per_tensor else q.reshape(groups, -1, 24)  # [G, inputs, columns]
    assert np.all((blocks.min(1) == scheme.qmin) | (blocks.max(1) == scheme.qmax))


def test_int4_packs_two_values_per_byte_and_unpacks_exactly():
    q = np.random.RandomState(0).randint(-8, 8, (10, 6)).astype(np.int8)
    packed = pack_int4(q)
    assert packed.shape == (5, 6) and packed.dtype == np.int8
    np.testing.assert_array_equal(unpack_int4(packed), q)
    with pytest.raises(ValueError, match="odd"):
        pack_int4(q[:3])


def test_scheme_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="only 8 and 4"):
        Scheme(bits=3)
    with pytest.raises(ValueError, match="does not divide"):
        fit(np.ones((10, 4)), Scheme(group_size=4))
    with pytest.raises(ValueError, match="per_tensor"):
        Scheme(group_size=4, per_tensor=True)


@pytest.mark.parametrize("name", CONFIGS)
def test_int8_model_is_the_dequantised_float_model_and_close_to_the_original(name):
    config, params = float_model(name)
    int8_config, int8_params = quantize_weights(config, params)
    flat = traverse_util.flatten_dict(int8_params)
    int8_kernels = [path for path, value in flat.items() if value.dtype == np.int8]
    families = {"attention", "self_attention", "cross_attention", "mlp"}
    assert int8_kernels and all(families & set(path) and path[-1] == "kernel" for path in int8_kernels)
    # Experts (MoE), embeddings, logits and norms stay in float.
    assert all(value.dtype == np.float32 for path, value in flat.items() if "moe" in path or "token_embedder" in path)
    # The forward pass is the dequantised matmul (scaling after the sum reorders float32 rounding)...
    actual = logits(int8_config, int8_params)
    np.testing.assert_allclose(actual, logits(*dequantised(int8_config, int8_params)), rtol=1e-4, atol=1e-4)
    # ...and within a few percent of the float model.
    original = logits(config, params)
    assert np.abs(actual - original).max() / np.abs(original).max() < 0.03
    # int8 holds a quarter of float32's weight bytes.
    int8_bytes = sum(flat[path].nbytes for path in int8_kernels)
    float_bytes = sum(traverse_util.flatten_dict(params)[path].nbytes for path in int8_kernels)
    assert int8_bytes * 4 == float_bytes


@pytest.mark.parametrize("name", ["llama_gqa_unrolled"])
def test_cached_decoding_with_int8_weights_matches_the_dequantised_model(name):
    int8_config, int8_params = quantize_weights(*float_model(name))
    inputs = {"encoder_input_tokens": TOKENS} if int8_config.is_encoder_decoder else {"prompt_tokens": TOKENS[:, :4]}
    options = DecodingOptions(max_new_tokens=6, eos_id=None)
    reference_config, reference_params = dequantised(int8_config, int8_params)
    int8 = generate(build(int8_config), int8_params, options=options, **inputs)
    reference = generate(build(reference_config), reference_params, options=options, **inputs)
    np.testing.assert_array_equal(int8.tokens, reference.tokens)
    np.testing.assert_allclose(int8.scores, reference.scores, rtol=1e-5)


def test_mistakes_are_refused_clearly():
    config, params = float_model("t5_1_1")
    with pytest.raises(
        ValueError, match="WeightQuantConfig.families='embedding' is not supported. Allowed values: attention, mlp"
    ):
        quantize_weights(config, params, ["embedding"])
    int8_config, int8_params = quantize_weights(config, params, ["mlp"])
    with pytest.raises(ValueError, match="already quantised"):
        quantize_weights(int8_config, int8_params)
    with pytest.raises(ValueError, match="in both int8_dense .* and WeightQuantConfig.families"):
        config.replace(int8_dense=("mlp",), weight_quant=WeightQuantConfig(families=("mlp",)))
    with pytest.raises(ValueError, match="no .*kernel; are they of this config's model"):
        quantize_weights(CONFIGS["llama_gqa_unrolled"], params)


def relative_rms(actual, desired):
    return np.sqrt(np.mean((actual - desired) ** 2) / np.mean(desired**2))


def calibration_stats(name):
    config, params = float_model(name)
    batches = [{"decoder_input_tokens": TOKENS, "encoder_input_tokens": TOKENS}] * 2
    return calibrate(config, params, batches)


@pytest.mark.parametrize(
    "method, bits, group_size, zero_points, tolerance",
    [
        ("int8", 4, 16, True, 0.15),
        ("gptq", 4, 16, False, 0.15),
        ("awq", 4, 16, False, 0.15),
        ("gptq", 8, None, False, 0.01),
    ],
)
def test_weight_only_methods_compute_their_stored_weights(method, bits, group_size, zero_points, tolerance):
    config, params = float_model("llama_gqa_unrolled")
    stats = calibration_stats("llama_gqa_unrolled") if method != "int8" else None
    q_config, q_params = quantize_weights(
        config, params, method=method, bits=bits, group_size=group_size, zero_points=zero_points, stats=stats
    )
    assert q_config.weight_quant.bits == bits and q_config.weight_quant.input_scaling == (method == "awq")
    actual = logits(q_config, q_params)
    np.testing.assert_allclose(actual, logits(*dequantised(q_config, q_params)), rtol=1e-4, atol=1e-4)
    assert relative_rms(actual, logits(config, params)) < tolerance  # measured: 0.094, 0.065, 0.103, 0.004
    if bits == 4:  # two values per byte: an eighth of float32's bytes
        flat = traverse_util.flatten_dict(q_params)
        kernels = [path for path, value in flat.items() if value.dtype == np.int8]
        assert sum(flat[p].nbytes for p in kernels) * 8 == sum(
            traverse_util.flatten_dict(params)[p].nbytes for p in kernels
        )


def test_calibration_records_each_layer_inputs():
    stats = calibration_stats("llama_gqa_unrolled")
    config = CONFIGS["llama_gqa_unrolled"]
    expected = {
        f"decoder/layers_{i}/{m}"
        for i in range(config.num_decoder_layers)
        for m in (
            "self_attention/query",
            "self_attention/key",
            "self_attention/value",
            "self_attention/out",
            "mlp/wi_0",
            "mlp/wi_1",
            "mlp/wo",
        )
    }
    assert set(stats) == expected
    for path, layer in stats.items():
        k = config.d_ff if path.endswith("wo") else config.d_model
        x = layer.samples.astype(np.float64)
        assert x.shape == (2 * TOKENS.size, k)  # both batches: every token, under max_samples
        np.testing.assert_allclose(layer.gram, x.T @ x, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(layer.absmax, np.abs(x).max(0), rtol=1e-6)
        np.testing.assert_array_equal(layer.input_range(), layer.absmax)
        # The median of |x_k| over 60 tokens lies between the 30th and 31st smallest magnitudes.
        ordered = np.sort(np.abs(x), axis=0)
        median = layer.input_range(50)
        assert np.all((ordered[29] - 1e-6 <= median) & (median <= ordered[30] + 1e-6))
    with pytest.raises(ValueError, match="percentile=0 must be in"):
        layer.input_range(0)
    # Rematerialised layers (jax.checkpoint) record the same inputs.
    config, params = float_model("llama_gqa_unrolled")
    batches = [{"decoder_input_tokens": TOKENS}] * 2
    remat = calibrate(config.replace(remat_policy="full"), params, batches)
    for path, layer in stats.items():
        np.testing.assert_allclose(remat[path].gram, layer.gram, rtol=1e-5, atol=1e-5)


def test_gptq_beats_round_to_nearest_on_the_model_activations():
    config, params = float_model("llama_gqa_unrolled")
    stats = calibration_stats("llama_gqa_unrolled")
    kernels = {}
    for method in ("int8", "gptq"):
        q_config, q_params = quantize_weights(config, params, method=method, bits=4, group_size=16, stats=stats)
        _, deq = dequantised(q_config, q_params)
        kernels[method] = traverse_util.flatten_dict(deq, sep="/")
    flat = traverse_util.flatten_dict(params, sep="/")
    errors = {method: [] for method in kernels}
    for path, layer in stats.items():
        w = flat[f"{path}/kernel"].reshape(layer.gram.shape[0], -1)
        for method, deq in kernels.items():
            errors[method].append(np.linalg.norm(layer.samples @ (w - deq[f"{path}/kernel"].reshape(w.shape))))
    gptq_errors, rtn_errors = np.array(errors["gptq"]), np.array(errors["int8"])
    assert np.all(gptq_errors < rtn_errors), (gptq_errors, rtn_errors)


@pytest.mark.parametrize("method, tolerance", [("llm_int8", 0.03), ("smoothquant", 0.05)])
def test_int8_activation_methods_stay_close_to_the_float_model(method, tolerance):
    config, params = float_model("t5_1_1")
    stats = calibration_stats("t5_1_1") if method == "smoothquant" else None
    q_config, q_params = quantize_weights(config, params, method=method, stats=stats)
    assert q_config.weight_quant.activations == {"llm_int8": "llm_int8", "smoothquant": "int8"}[method]
    actual, original = logits(q_config, q_params), logits(config, params)
    assert np.abs(actual - original).max() / np.abs(original).max() < tolerance
    if method == "llm_int8":  # a lower threshold sends more features through the float matmul
        more_outliers = logits(
            q_config.replace(weight_quant=q_config.weight_quant.replace(outlier_threshold=0.5)), q_params
        )
        assert relative_rms(more_outliers, original) < relative_rms(actual, original)
