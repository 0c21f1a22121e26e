"""Decoder-only language model: causal, or prefix-LM when given `decoder_causal_attention`.

As in seqio's PrefixLMFeatureConverter, `decoder_causal_attention` is 1 over the inputs
region (which then attends bidirectionally) and 0 over the targets (causal).
"""

from __future__ import annotations

import flax.linen as nn

from t5lite.config import ModelConfig
from t5lite.models.transformer import DecoderStack, make_embedder


class Decoder(nn.Module):
    config: ModelConfig

    def setup(self):
        self.token_embedder = make_embedder(self.config)
        self.decoder = DecoderStack(self.config, self.token_embedder)

    def __call__(
        self,
        decoder_input_tokens,
        decoder_target_tokens=None,
        decoder_segment_ids=None,
        decoder_positions=None,
        decoder_causal_attention=None,
        enable_dropout=True,
        decode=False,
    ):
        """Logits [batch, length, vocab] in float32."""
        return self.decoder(
            decoder_input_tokens,
            segment_ids=decoder_segment_ids,
            positions=decoder_positions,
            target_tokens=decoder_target_tokens,
            causal_attention=decoder_causal_attention,
            deterministic=not enable_dropout,
            decode=decode,
        )
