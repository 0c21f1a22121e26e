"""Token embedding whose table can also project hidden states back onto the vocabulary."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class Embed(nn.Module):
    num_embeddings: int
    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
            (self.num_embeddings, self.features),
            self.param_dtype,
        )

    def __call__(self, ids):
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

    def attend(self, x):
        """Tied output projection: logits against every row of the table."""
        return jnp.einsum("...d,vd->...v", x.astype(self.dtype), self.embedding.astype(self.dtype))


class SoftPrompt(nn.Module):
    """Prompt tuning's learned prompt: `length` vectors put before every sequence's embeddings, with
    positions 0..length-1 (the tokens' move up by `length`), always valid."""

    length: int
    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, positions, valid):
        """x [B, T, D], positions [B, T], valid [B, T] -> the same with length + T positions."""
        prompt = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, "embed")),
            (self.length, self.features),
            self.param_dtype,
        )
        batch = x.shape[0]
        x = jnp.concatenate([jnp.broadcast_to(prompt.astype(self.dtype), (batch, *prompt.shape)), x], axis=1)
        own = jnp.broadcast_to(jnp.arange(self.length, dtype=positions.dtype), (batch, self.length))
        positions = jnp.concatenate([own, positions + self.length], axis=1)
        valid = jnp.concatenate([jnp.ones((batch, self.length), bool), valid], axis=1)
        return x, positions, valid
