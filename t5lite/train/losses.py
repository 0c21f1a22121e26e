"""Token-level cross entropy with z-loss and label smoothing, computed in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits, targets, weights, z_loss: float = 1e-4, label_smoothing: float = 0.0):
    """Sums over weighted tokens (divide by `weights.sum()` for the mean).

    z-loss (PaLM, ST-MoE) adds z_loss·logsumexp(logits)² to keep the softmax normaliser near 1.
    Label smoothing moves `label_smoothing` of the target mass uniformly onto the other classes; the
    constant entropy of that target is subtracted so a perfect prediction scores 0.
    Returns (loss_sum, z_loss_sum, correct_sum).
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    log_z = jax.nn.logsumexp(logits, axis=-1)
    log_probs = logits - log_z[..., None]
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    target_log_prob = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    loss = -confidence * target_log_prob
    if label_smoothing:
        others = jnp.sum(log_probs, axis=-1) - target_log_prob
        loss = loss - low * others
        loss = loss + confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low + 1e-20)
    z = z_loss * jnp.square(log_z)
    weights = weights.astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum((loss + z) * weights), jnp.sum(z * weights), jnp.sum(correct * weights)
