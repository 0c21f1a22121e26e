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
            "embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
            (self.num_embeddings, self.features), self.param_dtype)

    def __call__(self, ids):
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

    def attend(self, x):
        """Tied output projection: logits against every row of the table."""
        return jnp.einsum("...d,vd->...v", x.astype(self.dtype), self.embedding.astype(self.dtype))
