"""Preference optimisation as a training objective: DPO against a frozen reference, or a reward model.

`train.preference = @Preference()` trains on a preference task (`t5lite.data.preferences`:
pairs as two rows, chosen on even rows). With objective "dpo" the loss is
-log σ(β·((π_c - ref_c) - (π_r - ref_r))), where π and ref are the log-probabilities of each
row's response tokens under the policy and under the reference. The reference is the model the
run starts from (`train.init_from`, adapters at zero): the step-0 parameters, which the loop
rebuilds, identically, when it resumes. With objective "reward" a model with
`AdapterConfig.reward_head` learns a scalar reward r per response (the head's value at its last
token) with the Bradley-Terry loss -log σ(r_c - r_r).
"""

from __future__ import annotations

import dataclasses

import gin
import jax
import jax.numpy as jnp

from t5lite.config import ModelConfig
from t5lite.models import build
from t5lite.models.params import model_features
from t5lite.train.losses import dpo, loss_weights, pairwise_reward, sequence_log_probs

OBJECTIVES = ("dpo", "reward")


@gin.configurable(module="t5lite")
@dataclasses.dataclass(frozen=True)
class Preference:
    objective: str = "dpo"  # or "reward"
    beta: float = 0.1  # DPO: how far the policy may move from the reference (the KL penalty's inverse weight)

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"Preference.objective={self.objective!r} is not supported. Allowed values: {', '.join(OBJECTIVES)}."
            )
        if not self.beta > 0:
            raise ValueError(f"Preference.beta={self.beta} must be > 0.")

    @property
    def needs_reference(self) -> bool:
        return self.objective == "dpo"

    def check(self, config: ModelConfig) -> None:
        if (self.objective == "reward") != config.adapters.reward_head:
            raise ValueError(
                f"Preference.objective={self.objective!r} with AdapterConfig.reward_head="
                f"{config.adapters.reward_head}: a reward model needs the head (reward_head=True), and DPO "
                f"trains a language model without one."
            )

    def sums(self, config: ModelConfig, params, reference_params, batch, rng, enable_dropout: bool):
        """(objective, sums) of a batch of pair rows, as the train step accumulates them: the loss
        summed over the pairs, and sums of it, of the pairs ranked right ("correct"), of the margins
        (DPO's implicit reward margin, or r_c - r_r), and the number of pairs ("weight"; all-padding
        pairs do not count)."""
        if self.objective == "reward":
            rewards = response_rewards(config, params, batch, enable_dropout, rng)
            margins = rewards[0::2] - rewards[1::2]
            losses = pairwise_reward(rewards[0::2], rewards[1::2])
        else:
            reference = jax.lax.stop_gradient(response_log_probs(config, reference_params, batch))
            policy = response_log_probs(config, params, batch, enable_dropout, rng)
            losses, margins = dpo(policy[0::2], policy[1::2], reference[0::2], reference[1::2], self.beta)
        pairs = (jnp.sum(loss_weights(batch)[0::2], axis=-1) > 0).astype(jnp.float32)
        sums = {
            "loss": jnp.sum(losses * pairs),
            "z_loss": jnp.zeros(()),
            "correct": jnp.sum((margins > 0) * pairs),
            "weight": jnp.sum(pairs),
            "margin": jnp.sum(margins * pairs),
        }
        return sums["loss"], sums


def response_rewards(config: ModelConfig, params, batch, enable_dropout: bool = False, rng=None) -> jax.Array:
    """The reward head's value at each row's last loss-weighted token (its response's EOS). [rows]."""
    _, state = build(config).apply(
        {"params": params},
        **model_features(config, batch),
        enable_dropout=enable_dropout,
        rngs={"dropout": rng} if enable_dropout else None,
        mutable=["intermediates"],
    )
    rewards = state["intermediates"]["decoder"]["reward"][0]
    weights = loss_weights(batch) > 0
    last = weights.shape[1] - 1 - jnp.argmax(weights[:, ::-1], axis=1)
    return jnp.take_along_axis(rewards, last[:, None], axis=1)[:, 0]


def response_log_probs(config: ModelConfig, params, batch, enable_dropout: bool = False, rng=None) -> jax.Array:
    """log p(response) of every row: the sum over its loss-weighted tokens. [rows]."""
    logits = build(config).apply(
        {"params": params},
        **model_features(config, batch),
        enable_dropout=enable_dropout,
        rngs={"dropout": rng} if enable_dropout else None,
    )
    return sequence_log_probs(logits, batch["decoder_target_tokens"], loss_weights(batch))
