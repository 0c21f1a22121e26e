"""Building a model from its config, initialising it, and counting parameters (all, and active per
token for mixtures of experts) without initialising."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5lite.config import ModelConfig
from t5lite.layers.mlp import is_gated
from t5lite.models.decoder import Decoder
from t5lite.models.encoder_decoder import EncoderDecoder


def build(config: ModelConfig) -> nn.Module:
    return EncoderDecoder(config) if config.is_encoder_decoder else Decoder(config)


def dummy_inputs(config: ModelConfig, batch_size: int = 1, length: int = 8) -> dict[str, jax.Array]:
    tokens = jnp.ones((batch_size, length), jnp.int32)
    if config.is_encoder_decoder:
        return {"encoder_input_tokens": tokens, "decoder_input_tokens": tokens}
    return {"decoder_input_tokens": tokens}


def init_params(config: ModelConfig, rng: jax.Array, boxed: bool = False):
    """Parameters as a pytree; `boxed=True` keeps the logical axis names (nn.LogicallyPartitioned)."""
    variables = jax.jit(lambda key: build(config).init(key, **dummy_inputs(config), enable_dropout=False))(rng)
    return variables["params"] if boxed else nn.unbox(variables["params"])


def abstract_params(config: ModelConfig):
    """Shapes and dtypes of the parameters (jax.ShapeDtypeStruct leaves), without computing anything."""
    return jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))


def mlp_param_count(config: ModelConfig) -> int:
    """One MLP's (or one expert's) parameters."""
    return (3 if is_gated(config.mlp_activation) else 2) * config.d_model * config.d_ff


def param_count(config: ModelConfig) -> int:
    """Total parameters, computed from the config alone (no initialisation)."""
    d, heads, kv_heads, hd = config.d_model, config.num_heads, config.kv_heads, config.head_dim
    norm = d * (2 if config.norm == "layer" else 1)
    attention = d * heads * hd + 2 * d * kv_heads * hd + heads * hd * d
    mlp = mlp_param_count(config)
    per_stack = {"relative": heads * config.relative_num_buckets, "learned": config.max_length * d}.get(
        config.position_encoding, 0)
    final_norm = norm if config.residual == "pre" else 0
    total = config.vocab_size * d  # token embedding
    if not config.tie_embeddings:
        total += d * config.vocab_size
    decoder_layer = attention + mlp + 2 * norm
    if config.is_encoder_decoder:
        total += config.num_encoder_layers * (attention + mlp + 2 * norm) + per_stack + final_norm
        decoder_layer += attention + norm
    total += config.num_decoder_layers * decoder_layer + per_stack + final_norm
    # Each MoE layer holds num_experts MLPs and a router instead of one MLP.
    return total + _moe_layers(config) * ((config.num_experts - 1) * mlp + d * config.num_experts)


def active_param_count(config: ModelConfig) -> int:
    """Parameters one token passes through: MoE layers count `experts_per_token` experts, not all."""
    idle = (config.num_experts - config.experts_per_token) * mlp_param_count(config) if config.num_experts else 0
    return param_count(config) - _moe_layers(config) * idle


def _moe_layers(config: ModelConfig) -> int:
    return config.num_moe_layers("encoder") + config.num_moe_layers("decoder")
