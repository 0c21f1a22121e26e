"""T5-style encoder-decoder: a shared token embedding, an encoder stack and a decoder stack."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from t5lite.config import ModelConfig
from t5lite.models.transformer import DecoderStack, EncoderStack, make_embedder


class EncoderDecoder(nn.Module):
    config: ModelConfig

    def setup(self):
        self.token_embedder = make_embedder(self.config)
        self.encoder = EncoderStack(self.config, self.token_embedder)
        self.decoder = DecoderStack(self.config, self.token_embedder)

    def encode(self, encoder_input_tokens, encoder_segment_ids=None, encoder_positions=None, enable_dropout=True):
        return self.encoder(
            encoder_input_tokens, encoder_segment_ids, encoder_positions, deterministic=not enable_dropout
        )

    def decode(
        self,
        encoded,
        encoder_input_tokens,
        decoder_input_tokens,
        decoder_target_tokens=None,
        encoder_segment_ids=None,
        decoder_segment_ids=None,
        decoder_positions=None,
        enable_dropout=True,
        decode=False,
    ):
        """Logits [batch, length, vocab] in float32. `encoder_input_tokens` only supply the padding mask."""
        encoder_valid = encoder_input_tokens > 0 if encoder_segment_ids is None else encoder_segment_ids > 0
        prompt = self.config.adapters.prompt_length  # the encoder's outputs start with the soft prompt's
        if prompt:
            encoder_valid = jnp.pad(encoder_valid, ((0, 0), (prompt, 0)), constant_values=True)
        return self.decoder(
            decoder_input_tokens,
            encoded=encoded,
            encoder_valid=encoder_valid,
            encoder_segment_ids=encoder_segment_ids,
            segment_ids=decoder_segment_ids,
            positions=decoder_positions,
            target_tokens=decoder_target_tokens,
            deterministic=not enable_dropout,
            decode=decode,
        )

    def __call__(
        self,
        encoder_input_tokens,
        decoder_input_tokens,
        decoder_target_tokens=None,
        encoder_segment_ids=None,
        decoder_segment_ids=None,
        encoder_positions=None,
        decoder_positions=None,
        enable_dropout=True,
        decode=False,
    ):
        encoded = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions, enable_dropout)
        return self.decode(
            encoded,
            encoder_input_tokens,
            decoder_input_tokens,
            decoder_target_tokens,
            encoder_segment_ids,
            decoder_segment_ids,
            decoder_positions,
            enable_dropout,
            decode,
        )
