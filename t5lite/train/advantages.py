"""Advantages for policy-gradient training: generalised advantage estimation over a value model's
per-token values (PPO), and rewards compared within each prompt's group of samples (GRPO).

Responses are rows of tokens [batch, length] with a mask of the generated tokens, which start
each row (the valid tokens are a prefix); a step past a response's last token is terminal.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gae(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation (Schulman et al. 2016). `rewards[t]` is what emitting token
    t earned (the sequence's score on its last token, less any per-token KL penalty), `values[t]`
    the value model's estimate before token t. With δ_t = r_t + γ·V_{t+1} − V_t (V = 0 after the
    last token), A_t = δ_t + γλ·A_{t+1}. Returns (advantages, returns = A + V), both 0 off the mask.
    """
    mask = mask.astype(jnp.float32)
    rewards, values = rewards.astype(jnp.float32) * mask, values.astype(jnp.float32) * mask
    next_values = jnp.pad(values[:, 1:], ((0, 0), (0, 1)))

    def back(next_advantage, step):
        delta, valid = step
        advantage = (delta + gamma * lam * next_advantage) * valid
        return advantage, advantage

    deltas = rewards + gamma * next_values - values
    _, advantages = jax.lax.scan(back, jnp.zeros(rewards.shape[0]), (deltas.T, mask.T), reverse=True)
    advantages = advantages.T
    return advantages, (advantages + values) * mask


def whiten(x, mask, epsilon: float = 1e-8):
    """(x − mean) / std over the masked entries: PPO's advantage normalisation per batch."""
    mask = mask.astype(jnp.float32)
    count = jnp.maximum(mask.sum(), 1.0)
    mean = jnp.sum(x * mask) / count
    variance = jnp.sum(jnp.square(x - mean) * mask) / count
    return (x - mean) * jax.lax.rsqrt(variance + epsilon) * mask


def group_advantages(rewards, group_size: int, scale: bool = True, epsilon: float = 1e-6):
    """GRPO (Shao et al. 2024): each prompt's `group_size` samples (consecutive rows of `rewards`
    [batch]) scored against their group, (r − mean) / (std + ε). Dr. GRPO (Liu et al. 2025)
    drops the division (`scale=False`), which favours questions of middling difficulty."""
    if rewards.shape[0] % group_size:
        raise ValueError(
            f"{rewards.shape[0]} rewards do not split into groups of {group_size} samples per prompt; the batch "
            f"must hold whole groups."
        )
    groups = rewards.astype(jnp.float32).reshape(-1, group_size)
    centred = groups - groups.mean(axis=1, keepdims=True)
    if scale:
        centred = centred / (groups.std(axis=1, keepdims=True) + epsilon)
    return centred.reshape(rewards.shape)
