"""RL training's pieces: rollouts against generate() and the full forward pass, reward rules, and
the settings an RL run refuses."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5lite import data as t5data
from t5lite.config import MoeConfig
from t5lite.decoding import DecodingOptions, generate
from t5lite.models import abstract_params, build, get_config
from t5lite.train import optimizers
from t5lite.train.rewards import exact_match, finished
from t5lite.train.rl import GRPO, PPO, rl_step, score
from t5lite.train.rollouts import Rollout, prompts_and_targets, rollout, training_rows
from t5lite.train.spec import RunSpec
from t5lite.train.step import TrainState

TINY = dict(dtype="float32", vocab_size=64, d_model=32, d_ff=48, num_heads=4, head_dim=8, max_length=64)
DECODER = get_config("llama/tiny").replace(num_kv_heads=2, **TINY)
ENCODER_DECODER = get_config("t5_1_1/tiny").replace(**TINY)
EOS, T, GROUP = 1, 6, 2
PROMPTS = np.array([[5, 6, 7, 0], [8, 9, 0, 0], [3, 4, 5, 6]], np.int32)  # right-padded
TARGETS = np.array([[9, 8, EOS, 0, 0, 0], [4, EOS, 0, 0, 0, 0], [7, 7, 7, 7, 7, 7]], np.int32)


def task_batch(config):
    """The prompts and targets as seqio's unpacked converters give them: an encoder-decoder's
    inputs and targets, or causal_prefix_lm rows (prompt, then target with the loss weight)."""
    if config.is_encoder_decoder:
        return {
            "encoder_input_tokens": PROMPTS,
            "decoder_target_tokens": TARGETS,
            "decoder_loss_weights": (TARGETS > 0).astype(np.int32),
        }
    rows, weights = np.zeros((3, 4 + T), np.int32), np.zeros((3, 4 + T), np.int32)
    for i, (prompt, target) in enumerate(zip(PROMPTS, TARGETS)):
        p, t = np.count_nonzero(prompt), np.count_nonzero(target)
        rows[i, :p], rows[i, p : p + t], weights[i, p : p + t] = prompt[:p], target[:t], 1
    return {"decoder_target_tokens": rows, "decoder_loss_weights": weights}


@functools.cache
def model_params(config):
    random = np.random.RandomState(0)
    return jax.tree.map(lambda leaf: random.normal(0, 0.5, leaf.shape).astype(leaf.dtype), abstract_params(config))


@pytest.mark.parametrize("config", [DECODER, ENCODER_DECODER], ids=["decoder", "encoder_decoder"])
def test_rollouts_are_the_decoders_samples_and_score_as_it_sampled_them(config):
    params, key = model_params(config), jax.random.PRNGKey(3)
    options = DecodingOptions(max_new_tokens=T, temperature=1.0, eos_id=EOS, suppress_tokens=(0,))
    kind = "encoder_decoder" if config.is_encoder_decoder else "causal_prefix_lm"
    sample = jax.jit(functools.partial(rollout, config, kind=kind, options=options, group_size=GROUP))
    sampled = sample(params, task_batch(config), key=key)
    # generate() on each prompt repeated GROUP times, with the same key, samples the same responses.
    repeated = np.repeat(PROMPTS, GROUP, axis=0)
    inputs = {"encoder_input_tokens": repeated} if config.is_encoder_decoder else {"prompt_tokens": repeated}
    generated = generate(build(config), params, options=options, rng=key, **inputs)
    np.testing.assert_array_equal(sampled.responses, generated.tokens)
    assert np.all((np.asarray(sampled.responses) != 0) == (np.asarray(sampled.mask) == 1))  # no padding sampled
    assert len({tuple(r) for r in np.asarray(sampled.responses)}) > GROUP  # rows draw their own tokens
    np.testing.assert_array_equal(sampled.targets, np.repeat(TARGETS, GROUP, axis=0))
    ends = [list(r).index(EOS) + 1 if EOS in r else T for r in np.asarray(sampled.responses)]
    np.testing.assert_array_equal(sampled.mask.sum(axis=1), ends)
    # The training rows, run through the full forward pass, give the log-probabilities the sampler drew with.
    scored = score(config, params, sampled, temperature=1.0)
    np.testing.assert_allclose(scored.log_probs.sum(axis=1), generated.scores, rtol=1e-4, atol=1e-4)
    assert scored.values is None and np.all(scored.entropy[sampled.mask == 0] == 0)
    if not config.is_encoder_decoder:  # each row: its prompt, then its response, weighted
        rows, weights = np.asarray(sampled.batch["decoder_target_tokens"]), sampled.batch["decoder_loss_weights"]
        for row, weight, prompt, response, end in zip(rows, weights, repeated, sampled.responses, ends):
            p = np.count_nonzero(prompt)
            np.testing.assert_array_equal(row[:p], prompt[:p])
            np.testing.assert_array_equal(row[p : p + end], response[:end])
            assert weight.sum() == end and np.all(weight[p : p + end] == 1)


@pytest.mark.parametrize("config", [DECODER, ENCODER_DECODER], ids=["decoder", "encoder_decoder"])
def test_each_tokens_log_prob_and_value_see_only_the_tokens_before_it(config):
    """Changing response token k changes its own log-probability and the values (and log-probs)
    after it, never those before: values are estimates before each token, aligned with it."""
    config = config.replace(adapters=config.adapters.replace(reward_head=True))
    params = model_params(config)
    rs = np.random.RandomState(1)
    responses = rs.randint(2, config.vocab_size, (3, T)).astype(np.int32)
    mask = np.ones((3, T), np.float32)
    encoder = PROMPTS if config.is_encoder_decoder else None
    prompts = np.zeros((3, 0), np.int32) if config.is_encoder_decoder else PROMPTS

    def scored(responses):
        batch, offsets = training_rows(config.start_id, encoder, prompts, jnp.asarray(responses), jnp.asarray(mask))
        return score(config, params, Rollout(batch, responses, mask, responses, offsets), temperature=1.0)

    before, k = scored(responses), 2
    changed = responses.copy()
    changed[:, k] = changed[:, k] % (config.vocab_size - 2) + 2  # another token
    after = scored(changed)
    np.testing.assert_array_equal(after.values[:, : k + 1], before.values[:, : k + 1])
    np.testing.assert_array_equal(after.log_probs[:, :k], before.log_probs[:, :k])
    assert np.all(after.log_probs[:, k] != before.log_probs[:, k])
    assert np.all(after.values[:, k + 1] != before.values[:, k + 1])


def test_a_decoders_prompts_and_targets_are_the_encoder_decoders():
    """From seqio's causal_prefix_lm rows (prompt and target in one row) the rollout takes the same
    prompts and targets as from the encoder-decoder's features of the same examples."""
    lengths = {"inputs": 24, "targets": 16}

    def first_batch(kind):
        stream = t5data.DataStream(
            "t5lite_synthetic_copy",
            split="train",
            task_feature_lengths=lengths,
            batch_size=8,
            model_kind=kind,
            pack=False,
            shuffle=False,
        )
        return {name: jnp.asarray(value) for name, value in next(stream).items()}

    encoder, _, targets = prompts_and_targets(first_batch("encoder_decoder"), "encoder_decoder")
    _, prompts, decoder_targets = prompts_and_targets(first_batch("causal_prefix_lm"), "causal_prefix_lm")
    np.testing.assert_array_equal(prompts[:, : lengths["inputs"]], encoder)
    assert not np.any(prompts[:, lengths["inputs"] :])
    np.testing.assert_array_equal(decoder_targets[:, : lengths["targets"]], targets)
    assert np.all(np.count_nonzero(targets, axis=1) > 1)  # real targets, EOS included


def starts_with_five(responses, targets, eos_id):
    """A rule a random model satisfies now and then, and learns to satisfy by changing one token."""
    return (responses[:, 0] == 5).astype(jnp.float32)


@pytest.mark.parametrize(
    "config, rl",
    [
        (ENCODER_DECODER, GRPO(reward=starts_with_five, group_size=8)),
        (DECODER, PPO(reward=starts_with_five, group_size=8, epochs=2, minibatches=4)),
    ],
    ids=["grpo_encoder_decoder", "ppo_decoder"],
)
def test_rl_steps_raise_a_learnable_reward(config, rl):
    """The whole step (sampling, scoring, advantages, epochs of minibatch updates) on a random model."""
    if isinstance(rl, PPO):
        config = config.replace(adapters=config.adapters.replace(reward_head=True))  # the value head
    params, tx = model_params(config), optimizers.optimizer("adamw", 1e-2 if isinstance(rl, GRPO) else 3e-3)
    kind = "encoder_decoder" if config.is_encoder_decoder else "causal_prefix_lm"
    step = jax.jit(
        functools.partial(rl_step, config=config, tx=tx, schedule=lambda s: 0.0, rl=rl, kind=kind, max_new_tokens=T)
    )
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    rewards, kls = [], []
    for _ in range(12):
        state, metrics = step(state, task_batch(config), jax.random.PRNGKey(0), params)
        rewards.append(float(metrics["reward_mean"]))
        kls.append(float(metrics["kl"]))
        assert metrics["finite"]
    assert kls[0] == 0.0  # the policy starts as the reference
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.25, rewards
    if isinstance(rl, PPO):
        assert np.isfinite(float(metrics["value_loss"])) and 0 < float(metrics["clip_fraction"]) < 1


def test_reward_rules():
    eos = 1
    responses = jnp.array([[4, 5, eos, 0], [4, 5, 6, 7], [4, 6, eos, 0]])
    targets = jnp.array([[4, 5, eos, 0], [4, 5, eos, 0], [4, 5, eos, 0]])
    np.testing.assert_array_equal(exact_match(responses, targets, eos), [1, 0, 0])
    np.testing.assert_array_equal(finished(responses, targets, eos), [1, 0, 1])


def spec(**settings):
    run = dict(
        model_config=ENCODER_DECODER,
        mixture_or_task_name="t5lite_synthetic",
        task_feature_lengths={"inputs": 16, "targets": 8},
        batch_size=4,
        num_steps=1,
        learning_rate=optimizers.learning_rate_schedule("constant", 1e-3),
        optimizer=functools.partial(optimizers.optimizer, "adamw"),
        pack=False,
        rl=GRPO(),
    )
    return RunSpec(**{**run, **settings})


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(pack=True), "set train.pack=False"),
        (dict(rl=PPO()), "PPO's value model is a head"),
        (dict(rl=GRPO(group_size=3, minibatches=8)), "must divide the 12 responses"),
        (dict(num_microbatches=2), "set train.num_microbatches=1"),
        (dict(model_config=DECODER, model_kind="prefix_lm"), "model_kind='prefix_lm' is not supported"),
        (dict(model_config=ENCODER_DECODER.replace(moe=MoeConfig(num_experts=4))), "mixture-of-experts"),
    ],
)
def test_rl_runs_refuse_what_they_cannot_train(settings, message):
    with pytest.raises(ValueError, match=message):
        spec(**settings)


def test_rl_settings_are_checked():
    for bad in (dict(group_size=1), dict(epochs=0), dict(kl_estimator="k4"), dict(clip=1.5), dict(temperature=0.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GRPO(**bad)
    assert spec().rows_per_step == 16
    # An RL step samples and scores its responses, runs the reference, and trains on them `epochs` times.
    ppo = spec(
        model_config=ENCODER_DECODER.replace(adapters=ENCODER_DECODER.adapters.replace(reward_head=True)), rl=PPO()
    )
    grpo = spec()
    assert ppo.flops_per_step() / ppo.rows_per_step > grpo.flops_per_step() / grpo.rows_per_step
