"""What the model and the loss take of a batch (seqio's model feature names)."""

from __future__ import annotations

import jax

from t5lite.config import ModelConfig

ENCODER_DECODER_FEATURES = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
                            "encoder_segment_ids", "decoder_segment_ids", "encoder_positions", "decoder_positions")
DECODER_FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "decoder_segment_ids", "decoder_positions",
                    "decoder_causal_attention")


def model_features(config: ModelConfig, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The batch features the model takes (loss weights stay with the loss)."""
    names = ENCODER_DECODER_FEATURES if config.is_encoder_decoder else DECODER_FEATURES
    return {name: batch[name] for name in names if name in batch}


def loss_weights(batch):
    if "decoder_loss_weights" in batch:
        return batch["decoder_loss_weights"]
    return batch["decoder_target_tokens"] > 0
