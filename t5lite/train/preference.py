"""Preference optimisation as a training objective: DPO against a frozen reference.

`train.preference = @Preference()` trains on a preference task (`t5lite.data.preferences`:
pairs as two rows, chosen on even rows) with the DPO loss
-log σ(β·((π_c - ref_c) - (π_r - ref_r))), where π and ref are the log-probabilities of each
row's response tokens under the policy and under the reference. The reference is the model the
run starts from (`train.init_from`, adapters at zero): the step-0 parameters, which the loop
rebuilds, identically, when it resumes.
"""

from __future__ import annotations

import dataclasses

import gin
import jax
import jax.numpy as jnp

from t5lite.config import ModelConfig
from t5lite.models import build
from t5lite.train.batch import loss_weights, model_features
from t5lite.train.losses import dpo, sequence_log_probs


@gin.configurable(module="t5lite")
@dataclasses.dataclass(frozen=True)
class Preference:
    beta: float = 0.1  # how far the policy may move from the reference (the KL penalty's inverse weight)

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"Preference.beta={self.beta} must be > 0.")


def response_log_probs(config: ModelConfig, params, batch, enable_dropout: bool = False, rng=None) -> jax.Array:
    """log p(response) of every row: the sum over its loss-weighted tokens. [rows]."""
    logits = build(config).apply({"params": params}, **model_features(config, batch), enable_dropout=enable_dropout,
                                 rngs={"dropout": rng} if enable_dropout else None)
    return sequence_log_probs(logits, batch["decoder_target_tokens"], loss_weights(batch))


def dpo_sums(config: ModelConfig, params, reference_params, batch, rng, enable_dropout: bool, beta: float):
    """(objective, sums) of a batch of pair rows, as the train step accumulates them: the DPO loss
    summed over the pairs, and sums of it, of the pairs ranked right ("correct"), of the implicit
    reward margins, and the number of pairs ("weight"; all-padding pairs do not count)."""
    reference = jax.lax.stop_gradient(response_log_probs(config, reference_params, batch))
    policy = response_log_probs(config, params, batch, enable_dropout, rng)
    losses, margins = dpo(policy[0::2], policy[1::2], reference[0::2], reference[1::2], beta)
    pairs = (jnp.sum(loss_weights(batch)[0::2], axis=-1) > 0).astype(jnp.float32)
    sums = {"loss": jnp.sum(losses * pairs), "z_loss": jnp.zeros(()), "correct": jnp.sum((margins > 0) * pairs),
            "weight": jnp.sum(pairs), "margin": jnp.sum(margins * pairs)}
    return sums["loss"], sums
