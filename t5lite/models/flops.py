"""Training FLOPs of a model config, the 6·N·D rule they refine, and model FLOP utilisation.

The exact count follows MaxText's MFU convention so that numbers compare across codebases:
only matmuls count (2 FLOPs per multiply-add); the embedding lookup is free, the logits
projection is not; attention scores plus the weighted sum cost 4·Sq·Sk·H·dh per layer and
sequence, halved for causal self-attention (a good kernel skips the masked half); norms,
softmax, position biases and the optimizer are left out; training is 3 × forward (the
backward pass costs two forwards).

Conventions worth knowing:
- Prefix-LM decoders are counted as causal over their whole length, as MaxText does.
- Mixture-of-experts layers count the router and `experts_per_token` experts per token (the
  active parameters), not the capacity slack or dispatch einsums.
- Sliding windows are not discounted: the count describes the dense computation.
- Tokens: a decoder's sequence is `targets_length` tokens (for a prefix LM that length
  already includes the prefix). An encoder-decoder's sequence is `inputs_length +
  targets_length` tokens; each token passes through only one stack, so its training cost
  is about 3·N per token rather than 6·N.
"""

from __future__ import annotations

from t5lite.config import ModelConfig
from t5lite.models.params import mlp_param_count, param_count


def six_n_d(num_params: float, num_tokens: float) -> float:
    """Kaplan's and Hoffmann's approximation of training compute."""
    _check_positive(num_params=num_params, num_tokens=num_tokens)
    return 6.0 * num_params * num_tokens


def embedding_param_count(config: ModelConfig) -> int:
    """Token embedding, untied logits matrix and position tables (learned or relative bias)."""
    vocab = config.vocab_size * config.d_model * (1 if config.tie_embeddings else 2)
    return vocab + param_count(config) - param_count(config.replace(position_encoding="none"))


def non_embedding_param_count(config: ModelConfig) -> int:
    """Kaplan et al.'s N: everything but the embedding and position tables."""
    return param_count(config) - embedding_param_count(config)


def tokens_per_sequence(config: ModelConfig, inputs_length: int, targets_length: int) -> int:
    _check_lengths(config, inputs_length, targets_length)
    return targets_length + (inputs_length if config.is_encoder_decoder else 0)


def forward_flops_per_sequence(config: ModelConfig, inputs_length: int, targets_length: int) -> int:
    """Matmul FLOPs of one forward pass over one sequence (see the module docstring).

    `inputs_length` is the encoder's length and is ignored for decoder-only models, whose
    length is `targets_length` (prefix included for a prefix LM).
    """
    _check_lengths(config, inputs_length, targets_length)
    d = config.d_model
    query_out = 2 * 2 * d * config.query_dim  # per query token: query and output projections
    key_value = 2 * 2 * d * config.kv_dim  # per key token: key and value projections
    mlp = 2 * mlp_param_count(config)

    def attention(q_len: int, k_len: int, causal: bool) -> int:
        scores_and_values = 4 * q_len * k_len * config.query_dim
        return q_len * query_out + k_len * key_value + (scores_and_values // 2 if causal else scores_and_values)

    # An MoE layer runs a token through the router and `experts_per_token` experts instead of one MLP.
    experts = config.moe
    moe_extra = (experts.experts_per_token - 1) * mlp + 2 * d * experts.num_experts if experts.num_experts else 0
    dec = targets_length
    decoder_layer = attention(dec, dec, causal=True) + dec * mlp
    total = 2 * d * config.vocab_size * dec  # logits
    total += config.num_moe_layers("decoder") * dec * moe_extra
    if config.is_encoder_decoder:
        enc = inputs_length
        total += config.num_encoder_layers * (attention(enc, enc, causal=False) + enc * mlp)
        total += config.num_moe_layers("encoder") * enc * moe_extra
        decoder_layer += attention(dec, enc, causal=False)
    return total + config.num_decoder_layers * decoder_layer


def training_flops_per_sequence(
    config: ModelConfig, inputs_length: int, targets_length: int, frozen_base: bool = False
) -> int:
    """Forward plus backward (3 × forward); what MFU divides by step time. With a frozen base (only
    adapters or another small subset train) the backward skips the weight gradients: 2 × forward."""
    return (2 if frozen_base else 3) * forward_flops_per_sequence(config, inputs_length, targets_length)


def training_flops_per_token(config: ModelConfig, inputs_length: int, targets_length: int) -> float:
    """Training FLOPs per token of `tokens_per_sequence`; compare with 6·N."""
    return training_flops_per_sequence(config, inputs_length, targets_length) / tokens_per_sequence(
        config, inputs_length, targets_length
    )


def mfu(flops_per_step: float, step_time_s: float, num_devices: int, peak_flops_per_device: float) -> float:
    """Model FLOP utilisation: achieved model FLOP/s over the devices' combined peak."""
    _check_positive(
        flops_per_step=flops_per_step,
        step_time_s=step_time_s,
        num_devices=num_devices,
        peak_flops_per_device=peak_flops_per_device,
    )
    return flops_per_step / (step_time_s * num_devices * peak_flops_per_device)


def _check_lengths(config: ModelConfig, inputs_length: int, targets_length: int) -> None:
    if targets_length <= 0:
        raise ValueError(f"targets_length={targets_length} must be positive.")
    if config.is_encoder_decoder and inputs_length <= 0:
        raise ValueError(f"inputs_length={inputs_length} must be positive for an encoder-decoder model.")


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name}={value!r} must be positive.")
