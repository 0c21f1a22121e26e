"""What an RL step scores its sampled responses with: a rule, or a reward model's run.

A rule is a function registered with gin, `(responses [N, T], targets [N, T], eos_id) -> [N]`,
traced into the step: responses are the sampled tokens (0 after EOS), targets the task's (its
"targets" feature, EOS included, 0-padded). Bind one as `GRPO.reward = @rewards.exact_match`; your own
is a `@gin.configurable` function of the same signature. A reward model is a run trained with
`train.preference = @Preference(objective='reward')`: `PPO.reward = @RewardModel()` with
`RewardModel.model_dir`; it scores (prompt, response) as it scored preference pairs.
"""

from __future__ import annotations

import dataclasses

import gin
import jax.numpy as jnp

from t5lite.config import ModelConfig
from t5lite.train import checkpoint


@gin.configurable(module="t5lite.rewards")
def exact_match(responses, targets, eos_id: int):
    """1 where the response is the target token for token (EOS included), else 0."""
    del eos_id  # both rows stop at their EOS and are 0 after it
    return jnp.all(responses == targets, axis=1).astype(jnp.float32)


@gin.configurable(module="t5lite.rewards")
def finished(responses, targets, eos_id: int):
    """A format check: 1 where the response ended with EOS within the token budget, else 0."""
    del targets
    return jnp.any(responses == eos_id, axis=1).astype(jnp.float32)


@gin.configurable(module="t5lite")
@dataclasses.dataclass(frozen=True)
class RewardModel:
    """A reward model's run (or checkpoint): its reward head's value at each response's EOS."""

    model_dir: str

    def config(self, policy: ModelConfig) -> ModelConfig:
        """Its model (read without its parameters), checked against the policy it scores."""
        config = checkpoint.pretrained_config(self.model_dir)
        if not config.adapters.reward_head:
            raise ValueError(
                f"RewardModel.model_dir={self.model_dir} holds a model without a reward head; give a run "
                f"trained with train.preference = @Preference(objective='reward')."
            )
        if config.vocab_size != policy.vocab_size or config.is_encoder_decoder != policy.is_encoder_decoder:
            raise ValueError(
                f"RewardModel.model_dir={self.model_dir} is a {config.architecture} model with vocab_size="
                f"{config.vocab_size}; the policy is a {policy.architecture} model with vocab_size="
                f"{policy.vocab_size}. The reward model reads the policy's tokens: one vocabulary and one kind."
            )
        return config.replace(dropout_rate=0.0)
