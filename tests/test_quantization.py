"""The uniform quantiser (round trips within half a step, int4 packing), and weight-only int8
models: the stored weights, the forward pass and decoding against the float model that holds
the dequantised weights, and against the original float model."""

import functools

import jax
import numpy as np
import pytest
from flax import traverse_util

from pallas_kernels.int8_matmul import quantize_over
from t5lite.decoding import DecodingOptions, generate
from t5lite.models import build, get_config, init_params
from t5lite.quantization import Scheme, dequantize, fit, pack_int4, quantize, quantize_weights, unpack_int4

TINY = dict(dtype="float32", vocab_size=64, d_model=32, d_ff=48, num_heads=4, head_dim=8)
CONFIGS = {
    "t5_1_1": get_config("t5_1_1/tiny").replace(**TINY),
    "llama_gqa_unrolled": get_config("llama/tiny").replace(num_kv_heads=2, scan_layers=False, **TINY),
    "switch": get_config("switch/tiny").replace(**TINY),
}
TOKENS = np.random.RandomState(1).randint(1, 64, (3, 10)).astype(np.int32)


@functools.lru_cache(maxsize=None)
def float_model(name):
    config = CONFIGS[name]
    return config, init_params(config, jax.random.PRNGKey(0))


def dequantised(int8_config, int8_params):
    """The float model holding exactly the int8 weights times their scales."""
    flat = traverse_util.flatten_dict(int8_params)
    out = {}
    for path, value in flat.items():
        if path[-1] == "kernel_scale":
            continue
        if value.dtype == np.int8:
            value = np.asarray(value, np.float32) * np.asarray(flat[path[:-1] + ("kernel_scale",)])
        out[path] = value
    return int8_config.replace(int8_weights=()), traverse_util.unflatten_dict(out)


def logits(config, params):
    features = {"decoder_input_tokens": TOKENS}
    if config.is_encoder_decoder:
        features["encoder_input_tokens"] = TOKENS
    return np.asarray(build(config).apply({"params": params}, **features, enable_dropout=False))


@pytest.mark.parametrize("scheme", [Scheme(bits, symmetric, group, per_tensor)
                                    for bits in (8, 4) for symmetric in (True, False)
                                    for group, per_tensor in ((None, False), (16, False), (None, True))])
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


def test_round_trip_error_is_within_half_a_step_per_output_feature():
    w = np.random.RandomState(0).standard_t(3, (16, 4, 8)).astype(np.float32)  # heavy tails
    q, scale = quantize_over(w, (0,))
    assert q.dtype == np.int8 and scale.shape == (1, 4, 8)
    np.testing.assert_array_equal(np.abs(q).max(axis=0), 127)  # abs-max: each feature's largest maps to 127
    assert np.all(np.abs(np.asarray(q) * scale - w) <= scale / 2 + 1e-7)


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


@pytest.mark.parametrize("name", ["t5_1_1", "llama_gqa_unrolled"])
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
    with pytest.raises(ValueError, match="int8_weights='embedding' is not supported. Allowed values: attention, mlp"):
        quantize_weights(config, params, ["embedding"])
    int8_config, int8_params = quantize_weights(config, params, ["mlp"])
    with pytest.raises(ValueError, match="already quantised"):
        quantize_weights(int8_config, int8_params)
    with pytest.raises(ValueError, match="in both int8_dense .* and int8_weights"):
        config.replace(int8_dense=("mlp",), int8_weights=("mlp",))
    with pytest.raises(ValueError, match="no .*kernel; are they of this config's model"):
        quantize_weights(CONFIGS["llama_gqa_unrolled"], params)
