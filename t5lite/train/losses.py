"""Losses, computed in float32: token-level cross entropy (with z-loss and label smoothing), and the
post-training losses on top of it: distillation (of logits and of hidden states), DPO, a pairwise
reward-model loss, and the pieces of PPO and GRPO (clipped policy and value losses, KL estimators,
entropy, and how per-token losses become one)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def loss_weights(batch):
    """Which target tokens count: seqio's decoder_loss_weights, else every non-padding target."""
    if "decoder_loss_weights" in batch:
        return batch["decoder_loss_weights"]
    return batch["decoder_target_tokens"] > 0


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


def sequence_log_probs(logits, targets, weights):
    """log p(targets) of each row: the sum over its weighted tokens. [B, T, V], [B, T] -> [B]."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(token * weights.astype(jnp.float32), axis=-1)


def distillation(student_logits, teacher_logits, targets, weights, temperature: float = 1.0, alpha: float = 0.5):
    """Knowledge distillation (Hinton et al. 2015), summed over weighted tokens:
    alpha·T²·KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha)·CE(student, targets).
    T² keeps the soft term's gradients on the scale of the hard term's as T grows.
    Returns (loss_sum, kl_sum)."""
    weights = weights.astype(jnp.float32)
    teacher = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature, axis=-1)
    student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)
    kl_sum = jnp.sum(kl * weights)
    ce_sum = -jnp.sum(sequence_log_probs(student_logits, targets, weights))
    return alpha * temperature**2 * kl_sum + (1.0 - alpha) * ce_sum, kl_sum


def hidden_distance(student, teacher, valid):
    """Mean over the `valid` tokens of 1 - cos(student, teacher) between two layers' outputs [B, T, D]
    (DistilBERT's cosine loss): blind to the scale of each residual stream, which grows with depth and
    training and would otherwise swamp the logit losses. The teacher's outputs are a constant."""
    student, teacher = student.astype(jnp.float32), jax.lax.stop_gradient(teacher).astype(jnp.float32)
    norms = jnp.linalg.norm(student, axis=-1) * jnp.linalg.norm(teacher, axis=-1)
    cosine = jnp.sum(student * teacher, axis=-1) / jnp.maximum(norms, 1e-6)
    valid = valid.astype(jnp.float32)
    return jnp.sum((1.0 - cosine) * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def dpo(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta: float = 0.1):
    """Direct preference optimisation (Rafailov et al. 2023) from sequence log-probabilities [B]:
    -log σ(β·((π_c - ref_c) - (π_r - ref_r))). Returns (per-pair losses, implicit reward margins β·(...))."""
    margin = beta * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected))
    return jax.nn.softplus(-margin), margin


def pairwise_reward(reward_chosen, reward_rejected):
    """A reward model's Bradley-Terry loss per pair: -log σ(r_chosen - r_rejected)."""
    return jax.nn.softplus(reward_rejected - reward_chosen)


KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("token_mean", "sequence_mean", "constant")


def kl_estimate(log_probs, reference_log_probs, estimator: str = "k3"):
    """Per-token estimates of KL(π ‖ π_ref) from tokens sampled from π (Schulman, "Approximating KL
    divergence", 2020), with log r = log π_ref − log π: k1 = −log r (unbiased, can be negative), k2 =
    ½(log r)² (biased, low variance), k3 = (r − 1) − log r (unbiased and never negative)."""
    log_ratio = reference_log_probs.astype(jnp.float32) - log_probs.astype(jnp.float32)
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * jnp.square(log_ratio)
    if estimator == "k3":
        return jnp.expm1(log_ratio) - log_ratio
    raise ValueError(f"KL estimator {estimator!r} is not one of {', '.join(KL_ESTIMATORS)}.")


def clipped_policy_loss(log_probs, old_log_probs, advantages, clip: float = 0.2):
    """PPO's clipped surrogate per token, −min(ρ·A, clip(ρ, 1 − ε, 1 + ε)·A) with ρ = π / π_old:
    no gradient once ρ has moved past the clip range in the advantage's direction.
    Returns (losses, clipped) per token; clipped is 1 where the clipped term was the smaller."""
    ratio = jnp.exp(log_probs.astype(jnp.float32) - old_log_probs.astype(jnp.float32))
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - clip, 1.0 + clip) * advantages
    return -jnp.minimum(unclipped, clipped), (clipped < unclipped).astype(jnp.float32)


def clipped_value_loss(values, old_values, returns, clip: float = 0.2):
    """PPO's value loss per token, ½·max((V − R)², (V_old + clip(V − V_old, ±ε) − R)²): the value
    model gains nothing by moving further than ε from the values the rollout saw."""
    values, old_values = values.astype(jnp.float32), old_values.astype(jnp.float32)
    kept = old_values + jnp.clip(values - old_values, -clip, clip)
    return 0.5 * jnp.maximum(jnp.square(values - returns), jnp.square(kept - returns))


def token_entropy(logits):
    """Entropy of each position's next-token distribution [..., V] -> [...]."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)


def aggregate(per_token, mask, how: str = "token_mean"):
    """One number from per-token losses [B, T] over the `mask`ed tokens: "token_mean" (every token
    weighs the same), "sequence_mean" (GRPO: each response's mean, then their mean: a long
    response's tokens count less), "constant" (Dr. GRPO: the sum over B·T, free of that length bias)."""
    mask = mask.astype(jnp.float32)
    total = per_token * mask
    if how == "token_mean":
        return jnp.sum(total) / jnp.maximum(jnp.sum(mask), 1.0)
    if how == "sequence_mean":
        return jnp.mean(jnp.sum(total, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0))
    if how == "constant":
        return jnp.sum(total) / mask.size
    raise ValueError(f"Loss aggregation {how!r} is not one of {', '.join(AGGREGATIONS)}.")
