"""FLOP counts against hand arithmetic, against XLA's own count, and against 6·N·D."""

import jax
import jax.numpy as jnp
import pytest

from t5lite import hardware
from t5lite.config import ModelConfig
from t5lite.models import abstract_params, build, flops, get_config, param_count

# Decoder: vocab 100, d 16, 2 query heads and 1 key/value head of 8, SwiGLU d_ff 32, 2 layers, untied.
SMALL_DECODER = ModelConfig(
    architecture="decoder",
    vocab_size=100,
    d_model=16,
    num_heads=2,
    num_kv_heads=1,
    head_dim=8,
    d_ff=32,
    num_encoder_layers=0,
    num_decoder_layers=2,
    mlp_activation="swiglu",
    position_encoding="rope",
    tie_embeddings=False,
)
# Encoder-decoder: vocab 50, d 8, 2 heads of 4, ReLU d_ff 16, 2 encoder layers and 1 decoder layer, tied.
SMALL_ENCODER_DECODER = ModelConfig(
    architecture="encoder_decoder",
    vocab_size=50,
    d_model=8,
    num_heads=2,
    head_dim=4,
    d_ff=16,
    num_encoder_layers=2,
    num_decoder_layers=1,
    mlp_activation="relu",
    tie_embeddings=True,
)


def test_decoder_matches_hand_count():
    # Per token and layer: query 2*16*16 + key 2*16*8 + value 2*16*8 + out 2*16*16 = 1536,
    # SwiGLU 3 matrices 3*2*16*32 = 3072; 4608 * 10 tokens * 2 layers = 92160.
    # Causal attention 4*10*10*2*8 / 2 = 3200 per layer, 6400. Logits 2*16*100*10 = 32000.
    forward = 92160 + 6400 + 32000
    assert flops.forward_flops_per_sequence(SMALL_DECODER, 0, 10) == forward == 130560
    assert flops.training_flops_per_sequence(SMALL_DECODER, 0, 10) == 3 * 130560
    assert flops.training_flops_per_token(SMALL_DECODER, 0, 10) == pytest.approx(3 * 130560 / 10)


def test_decoder_ignores_inputs_length():
    assert flops.training_flops_per_sequence(SMALL_DECODER, 77, 10) == flops.training_flops_per_sequence(
        SMALL_DECODER, 0, 10
    )


def test_encoder_decoder_matches_hand_count():
    # Encoder, per token and layer: q, k, v, o 4 * 2*8*8 = 512, ReLU MLP 2*2*8*16 = 512;
    # 1024 * 6 tokens * 2 layers = 12288. Bidirectional attention 4*6*6*2*4 = 1152 per layer, 2304.
    encoder = 12288 + 2304
    # Decoder layer: per target token self q, k, v, o 512 + cross q, o 256 + MLP 512 = 1280, * 4 = 5120;
    # cross k, v over 6 encoder tokens 2 * 2*8*8 * 6 = 1536; causal self-attention 4*4*4*2*4 / 2 = 256;
    # cross-attention 4*4*6*2*4 = 768.
    decoder = 5120 + 1536 + 256 + 768
    logits = 2 * 8 * 50 * 4
    assert flops.forward_flops_per_sequence(SMALL_ENCODER_DECODER, 6, 4) == encoder + decoder + logits == 25472
    assert flops.training_flops_per_sequence(SMALL_ENCODER_DECODER, 6, 4) == 3 * 25472
    assert flops.tokens_per_sequence(SMALL_ENCODER_DECODER, 6, 4) == 10


@pytest.mark.parametrize("name, inputs_length, targets_length", [("llama/tiny", 0, 64), ("t5_1_1/tiny", 48, 32)])
def test_agrees_with_xla_cost_analysis(name, inputs_length, targets_length):
    """XLA counts every op of the compiled forward pass, with dense (unhalved) causal attention;
    add the masked half back and allow ~1% for elementwise ops (norms, softmax, activations)."""
    config = get_config(name).replace(dtype="float32", scan_layers=False)
    inputs = {"decoder_input_tokens": jax.ShapeDtypeStruct((1, targets_length), jnp.int32)}
    if config.is_encoder_decoder:
        inputs["encoder_input_tokens"] = jax.ShapeDtypeStruct((1, inputs_length), jnp.int32)
    model = build(config)
    forward = jax.jit(lambda params, batch: model.apply({"params": params}, **batch, enable_dropout=False))
    cost = forward.lower(abstract_params(config), inputs).compile().cost_analysis()
    xla_flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
    masked_half = config.num_decoder_layers * 2 * targets_length**2 * config.num_heads * config.head_dim
    dense = flops.forward_flops_per_sequence(config, inputs_length, targets_length) + masked_half
    assert 1.0 <= xla_flops / dense < 1.01


@pytest.mark.parametrize("name", ["llama/7b", "llama/1b"])
def test_decoder_is_within_ten_percent_of_six_n_d(name):
    config = get_config(name)
    exact = flops.training_flops_per_sequence(config, 0, 2048)
    assert exact == pytest.approx(flops.six_n_d(param_count(config), 2048), rel=0.1)


def test_encoder_decoder_costs_about_three_n_per_token():
    """Each token passes through one of two equal stacks: half of 6·N."""
    config = get_config("t5_1_1/xxl")
    assert flops.training_flops_per_token(config, 512, 512) == pytest.approx(3 * param_count(config), rel=0.1)


def test_non_embedding_params_by_hand():
    # llama/tiny: d 128, 4 heads and 2 kv heads of 32, SwiGLU d_ff 384, 2 layers, RMS norms.
    attention = 128 * 128 + 2 * 128 * 64 + 128 * 128
    layer = attention + 3 * 128 * 384 + 2 * 128
    assert flops.non_embedding_param_count(get_config("llama/tiny")) == 2 * layer + 128
    # t5_1_1/tiny: d 128, 4 heads of 32, GeGLU d_ff 256, 2 + 2 layers; relative bias tables excluded.
    attention = 4 * 128 * 128
    encoder_layer = attention + 3 * 128 * 256 + 2 * 128
    decoder_layer = 2 * attention + 3 * 128 * 256 + 3 * 128
    config = get_config("t5_1_1/tiny")
    assert flops.non_embedding_param_count(config) == 2 * encoder_layer + 128 + 2 * decoder_layer + 128
    assert flops.embedding_param_count(config) == 2 * 32128 * 128 + 2 * 4 * 32


def test_mfu_and_peaks():
    assert flops.mfu(4e14, 2.0, 4, 1e14) == pytest.approx(0.5)
    assert hardware.peak_flops_per_device("TPU v5 lite") == 197e12
    assert hardware.peak_flops_per_device("TPU v4") == 275e12
    assert hardware.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    assert hardware.peak_flops_per_device("NVIDIA A100-SXM4-40GB") == 312e12
    assert hardware.peak_flops_per_device(jax.devices("cpu")[0]) is None


@pytest.mark.parametrize(
    "call",
    [
        lambda: flops.mfu(1e12, 0.0, 1, 1e12),
        lambda: flops.mfu(1e12, 1.0, 0, 1e12),
        lambda: flops.six_n_d(-1, 10),
        lambda: flops.training_flops_per_sequence(SMALL_DECODER, 0, 0),
        lambda: flops.training_flops_per_sequence(SMALL_ENCODER_DECODER, 0, 4),
    ],
)
def test_bad_input_raises(call):
    with pytest.raises(ValueError, match="must be positive"):
        call()
