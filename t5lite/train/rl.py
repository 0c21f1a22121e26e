"""Reinforcement learning from feedback as a training objective: GRPO and PPO.

`train.rl = @GRPO()` or `@PPO()` trains a policy on a task of prompts, unpacked (train.pack =
False): an encoder-decoder's inputs, or a causal decoder's `causal_prefix_lm` rows. One step of
the run is one iteration: sample responses to `batch_size` prompts (`group_size` each) with the
compiled decoder, score them (`t5lite.train.rewards`), compute advantages, then make `epochs`
passes over the responses in `minibatches` optimizer updates each. The frozen reference is the
model the run starts from (`train.init_from`), rebuilt when a run resumes, as DPO's; step s
samples with fold_in(key, s), so a resumed run samples what the uninterrupted one did.

GRPO (Shao et al. 2024): each group's rewards less their mean, over their std, are every token's
advantage; the loss is the clipped ratio objective plus kl_weight·KL(π‖π_ref) per token (k3),
averaged over each response, then over responses. `length_unbiased` is Dr. GRPO (Liu et al.
2025): no std division and a sum over a constant number of tokens. PPO (as in Ouyang et al.
2022): a value head on the policy's trunk (AdapterConfig.reward_head), per-token rewards
−kl_weight·KL (k1) plus the response's score at its last token, GAE(γ, λ) advantages whitened
over the batch, clipped policy and value losses, an entropy bonus.

Log-probabilities are the model's at the sampling temperature (logits / temperature); top-p only
shapes the sampling. Dropout is off throughout, so the ratio is 1 before the first update. The
learning-rate schedule counts optimizer updates: epochs × minibatches per step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import gin
import jax
import jax.numpy as jnp
import optax

from t5lite.config import ModelConfig
from t5lite.decoding import NEG_INF, DecodingOptions
from t5lite.models import build
from t5lite.models.params import merge_params, model_features, split_params
from t5lite.train.advantages import gae, group_advantages, whiten
from t5lite.train.losses import (
    KL_ESTIMATORS,
    aggregate,
    clipped_policy_loss,
    clipped_value_loss,
    kl_estimate,
    token_entropy,
)
from t5lite.train.preference import response_rewards
from t5lite.train.rewards import RewardModel, exact_match
from t5lite.train.rollouts import KINDS, Rollout, response_view, rollout
from t5lite.train.step import TrainState, all_finite, guarded

PADDING = 0  # never sampled: scoring would read it as a hole in the row


class Scored(NamedTuple):
    """A model's view of a rollout's responses, [N, T] each, 0 off the response mask."""

    log_probs: jax.Array
    entropy: jax.Array
    values: jax.Array | None  # the value head's, when the model has one


def score(config: ModelConfig, params, sampled: Rollout, temperature: float) -> Scored:
    logits, state = build(config).apply(
        {"params": params}, **model_features(config, sampled.batch), enable_dropout=False, mutable=["intermediates"]
    )
    logits = logits.astype(jnp.float32).at[..., PADDING].set(NEG_INF) / temperature  # as sampled
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    tokens = jnp.take_along_axis(log_probs, sampled.batch["decoder_target_tokens"][..., None], axis=-1)[..., 0]

    def view(rows):
        return response_view(rows, sampled.offsets, sampled.mask.shape[1]) * sampled.mask

    values = state["intermediates"]["decoder"]["reward"][0] if config.adapters.reward_head else None
    entropy = token_entropy(logits)
    return Scored(view(tokens), view(entropy), None if values is None else view(values))


@dataclasses.dataclass(frozen=True)
class PolicyGradient:
    """What GRPO and PPO share: how responses are sampled and scored, and how far a step moves."""

    reward: Callable | RewardModel = exact_match  # a rule (@rewards.exact_match) or @RewardModel()
    group_size: int = 1  # responses sampled per prompt
    kl_weight: float = 0.05  # of KL(π ‖ π_ref)
    kl_estimator: str = "k1"
    clip: float = 0.2  # the ratio's range, 1 ± clip
    epochs: int = 1  # passes over each rollout batch
    minibatches: int = 1  # optimizer updates per pass
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self):
        name = type(self).__name__
        for field in ("group_size", "epochs", "minibatches"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}.{field}={value!r} must be a positive integer.")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(
                f"{name}.kl_estimator={self.kl_estimator!r} is not supported. Allowed values: "
                f"{', '.join(KL_ESTIMATORS)}."
            )
        if not self.kl_weight >= 0:
            raise ValueError(f"{name}.kl_weight={self.kl_weight} must be >= 0 (0: no KL penalty).")
        if not 0 < self.clip < 1:
            raise ValueError(f"{name}.clip={self.clip} must be in (0, 1).")
        if not self.temperature > 0:
            raise ValueError(f"{name}.temperature={self.temperature} must be > 0: RL samples its responses.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"{name}.top_p={self.top_p} must be in (0, 1].")
        if not (isinstance(self.reward, RewardModel) or callable(self.reward)):
            raise ValueError(f"{name}.reward={self.reward!r} must be a rule (@rewards.exact_match) or @RewardModel().")

    @property
    def needs_values(self) -> bool:
        return False

    def options(self, max_new_tokens: int, eos_id: int) -> DecodingOptions:
        return DecodingOptions(
            max_new_tokens=max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            eos_id=eos_id,
            suppress_tokens=(PADDING,),
        )

    def check(self, config: ModelConfig, kind: str, rows: int) -> None:
        """What the policy and its batch need: refused with a message before anything runs."""
        name = type(self).__name__
        if kind not in KINDS:
            raise ValueError(
                f"train.rl samples responses to prompts; train.model_kind={kind!r} is not supported. Allowed "
                f"values: {', '.join(KINDS)} (a decoder fine-tuned on prompts and responses as causal_prefix_lm)."
            )
        if self.needs_values != config.adapters.reward_head:
            raise ValueError(
                f"{name} with AdapterConfig.reward_head={config.adapters.reward_head}: PPO's value model is a "
                f"head on the policy's trunk (reward_head=True), and GRPO needs none (reward_head=False)."
            )
        if (rows * self.group_size) % self.minibatches:
            raise ValueError(
                f"{name}.minibatches={self.minibatches} must divide the {rows * self.group_size} responses of a "
                f"step (train.batch_size={rows} prompts x group_size={self.group_size})."
            )

    def rewards(self, sampled: Rollout, eos_id: int, reward_config: ModelConfig | None, reward_params) -> jax.Array:
        """[N]: each response's score."""
        if isinstance(self.reward, RewardModel):
            return response_rewards(reward_config, reward_params, sampled.batch)
        return self.reward(sampled.responses, sampled.targets, eos_id).astype(jnp.float32)


@gin.configurable(module="t5lite")
@dataclasses.dataclass(frozen=True)
class GRPO(PolicyGradient):
    group_size: int = 4
    kl_weight: float = 0.04
    kl_estimator: str = "k3"
    length_unbiased: bool = False  # Dr. GRPO

    def __post_init__(self):
        super().__post_init__()
        if self.group_size < 2:
            raise ValueError(
                f"GRPO.group_size={self.group_size} must be at least 2: advantages compare the responses to one prompt."
            )

    def advantages(self, scores, old: Scored, reference_log_probs, mask):
        """(advantages [N, T], returns None): the group-relative score, on every token."""
        del old, reference_log_probs
        return group_advantages(scores, self.group_size, scale=not self.length_unbiased)[:, None] * mask, None

    def loss(self, new: Scored, old: Scored, reference_log_probs, advantages, returns, mask):
        del returns
        policy, clipped = clipped_policy_loss(new.log_probs, old.log_probs, advantages, self.clip)
        kl = kl_estimate(new.log_probs, reference_log_probs, self.kl_estimator)
        how = "constant" if self.length_unbiased else "sequence_mean"
        stats = {"clip_fraction": aggregate(clipped, mask), "policy_kl": aggregate(kl, mask)}
        return aggregate(policy + self.kl_weight * kl, mask, how), stats


@gin.configurable(module="t5lite")
@dataclasses.dataclass(frozen=True)
class PPO(PolicyGradient):
    epochs: int = 4
    minibatches: int = 2
    gamma: float = 1.0
    lam: float = 0.95
    value_clip: float = 0.2
    value_weight: float = 0.1
    entropy_weight: float = 0.0
    whiten_advantages: bool = True

    @property
    def needs_values(self) -> bool:
        return True

    def advantages(self, scores, old: Scored, reference_log_probs, mask):
        """(advantages, returns) by GAE over per-token rewards: the KL penalty, and the score at the last token."""
        kl = kl_estimate(old.log_probs, reference_log_probs, self.kl_estimator)
        last = jnp.sum(mask, axis=1).astype(jnp.int32) - 1
        rewards = -self.kl_weight * kl * mask + jax.nn.one_hot(last, mask.shape[1]) * scores[:, None]
        advantages, returns = gae(rewards, old.values, mask, self.gamma, self.lam)
        return (whiten(advantages, mask) if self.whiten_advantages else advantages), returns

    def loss(self, new: Scored, old: Scored, reference_log_probs, advantages, returns, mask):
        del reference_log_probs
        policy, clipped = clipped_policy_loss(new.log_probs, old.log_probs, advantages, self.clip)
        value = aggregate(clipped_value_loss(new.values, old.values, returns, self.value_clip), mask)
        entropy = aggregate(new.entropy, mask)
        stats = {"clip_fraction": aggregate(clipped, mask), "value_loss": value}
        return aggregate(policy, mask) + self.value_weight * value - self.entropy_weight * entropy, stats


def rl_step(
    state: TrainState,
    batch,
    base_rng,
    reference_params,
    reward_params=None,
    *,
    config: ModelConfig,
    tx: optax.GradientTransformation,
    schedule: Callable,
    rl: PolicyGradient,
    kind: str,
    max_new_tokens: int,
    reward_config: ModelConfig | None = None,
    trainable: str | None = None,
    skip_nonfinite: bool = False,
):
    """One RL iteration on a batch of prompts: (new state, metrics). Metrics: `loss` (the objective,
    averaged over the updates), `grad_norm`, `reward_mean` / `reward_std` of the scores, `kl` (per
    response, summed over its tokens, sampling policy against the reference), `entropy` (per token),
    `clip_fraction`, `response_length`, PPO's `value_loss`, and the step's guards."""
    sample_key, shuffle_key = jax.random.split(jax.random.fold_in(base_rng, state.step))
    params, frozen = split_params(state.params, trainable)
    policy = merge_params(params, frozen)
    eos_id = config.eos_id
    sampled = rollout(config, policy, batch, kind, sample_key, rl.options(max_new_tokens, eos_id), rl.group_size)
    mask = sampled.mask
    old = jax.lax.stop_gradient(score(config, policy, sampled, rl.temperature))
    reference = jax.lax.stop_gradient(score(config, reference_params, sampled, rl.temperature).log_probs)
    scores = jax.lax.stop_gradient(rl.rewards(sampled, eos_id, reward_config, reward_params))
    advantages, returns = rl.advantages(scores, old, reference, mask)
    per_row = (sampled, old, reference, advantages, returns)

    def update(carry, rows):
        params, opt_state = carry
        part = jax.tree.map(lambda x: x[rows], per_row)
        (objective, stats), grads = jax.value_and_grad(minibatch_loss, has_aux=True)(params, *part)
        updates, opt_state = tx.update(grads, opt_state, params)
        stats = {"loss": objective, "grad_norm": optax.tree.norm(grads), **stats}
        return (optax.apply_updates(params, updates), opt_state), stats

    def minibatch_loss(params, part_sampled, part_old, part_reference, part_advantages, part_returns):
        new = score(config, merge_params(params, frozen), part_sampled, rl.temperature)
        return rl.loss(new, part_old, part_reference, part_advantages, part_returns, part_sampled.mask)

    responses = mask.shape[0]
    orders = [jax.random.permutation(jax.random.fold_in(shuffle_key, e), responses) for e in range(rl.epochs)]
    orders = jnp.stack(orders).reshape(rl.epochs * rl.minibatches, responses // rl.minibatches)
    (updated, opt_state), stats = jax.lax.scan(update, (params, state.opt_state), orders)
    updates_before = state.step * rl.epochs * rl.minibatches
    metrics = {
        **{name: jnp.mean(values) for name, values in stats.items()},
        "reward_mean": jnp.mean(scores),
        "reward_std": jnp.std(scores),
        "kl": jnp.mean(jnp.sum(kl_estimate(old.log_probs, reference, rl.kl_estimator) * mask, axis=1)),
        "entropy": jnp.sum(old.entropy) / jnp.maximum(jnp.sum(mask), 1.0),
        "response_length": jnp.mean(jnp.sum(mask, axis=1)),
        "learning_rate": schedule(updates_before),
        "target_tokens": jnp.sum(mask),
        "params_finite": all_finite(updated),
    }
    updated, opt_state, _ = guarded(state, (params, updated), opt_state, metrics, None, skip_nonfinite)
    new_state = TrainState(step=state.step + 1, params=merge_params(updated, frozen), opt_state=opt_state)
    return new_state, metrics
