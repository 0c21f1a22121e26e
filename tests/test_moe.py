"""Mixture of experts: routing and dispatch against per-token loops, auxiliary losses, the MoE
MLP against a float64 loop, config errors, and a small Switch model training on CPU."""

import math
import pathlib

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5lite import cli
from t5lite.config import ModelConfig, MoeConfig
from t5lite.layers import moe
from t5lite.models import active_param_count, build, flops, get_config, init_params, param_count
from t5lite.train.metrics import read_metrics


def random_probs(groups=3, tokens=16, experts=4, seed=0):
    logits = np.random.RandomState(seed).normal(size=(groups, tokens, experts)) * 2
    return np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32)))


def loop_tokens_choose(probs, k, capacity, causal=False):
    """Tokens pick their top-k experts; experts fill their slots with first choices in token order,
    then second choices, ... until full (causal: token by token, each token's choices in order)."""
    groups, tokens, experts = probs.shape
    dispatch = np.zeros((groups, tokens, experts, capacity))
    combine = np.zeros_like(dispatch)
    for g in range(groups):
        filled = [0] * experts
        ranked = [np.argsort(-probs[g, s])[:k] for s in range(tokens)]
        order = (
            [(s, c) for s in range(tokens) for c in range(k)]
            if causal
            else [(s, c) for c in range(k) for s in range(tokens)]
        )
        for s, choice in order:
            e = ranked[s][choice]
            if filled[e] < capacity:
                dispatch[g, s, e, filled[e]] = 1
                combine[g, s, e, filled[e]] = probs[g, s, e]
                filled[e] += 1
    return dispatch, combine


def loop_experts_choose(probs, capacity):
    groups, tokens, experts = probs.shape
    dispatch = np.zeros((groups, tokens, experts, capacity))
    combine = np.zeros_like(dispatch)
    for g in range(groups):
        for e in range(experts):
            for slot, s in enumerate(np.argsort(-probs[g, :, e], kind="stable")[:capacity]):
                dispatch[g, s, e, slot] = 1
                combine[g, s, e, slot] = probs[g, s, e]
    return dispatch, combine


@pytest.mark.parametrize(
    "k, capacity, causal", [(1, 3, False), (1, 16, False), (2, 5, False), (3, 2, False), (2, 5, True), (3, 2, True)]
)
def test_tokens_choose_equals_the_loop(k, capacity, causal):
    probs = random_probs()
    routing = moe.tokens_choose(jnp.asarray(probs), k, capacity, causal)
    dispatch, combine = loop_tokens_choose(probs, k, capacity, causal)
    np.testing.assert_array_equal(np.asarray(routing.dispatch), dispatch)
    np.testing.assert_allclose(np.asarray(routing.combine), combine, rtol=1e-6)
    if capacity == 3:  # 16 tokens, 4 experts, 3 slots each: some must be dropped
        assert dispatch.sum() <= 3 * 4 * 3 < 3 * 16
    np.testing.assert_allclose(np.asarray(routing.picks).sum(-1), 1.0, rtol=1e-6)


def test_experts_choose_equals_the_loop():
    probs = random_probs(seed=1)
    routing = moe.experts_choose(jnp.asarray(probs), 5)
    dispatch, combine = loop_experts_choose(probs, 5)
    np.testing.assert_array_equal(np.asarray(routing.dispatch), dispatch)
    np.testing.assert_allclose(np.asarray(routing.combine), combine, rtol=1e-6)


def test_expert_capacity_and_groups():
    assert moe.expert_capacity(512, 8, 1, 1.25, 4) == 80
    assert moe.expert_capacity(512, 8, 2, 1.25, 4) == 160
    assert moe.expert_capacity(16, 8, 1, 1.0, 4) == 4  # the minimum
    assert moe.expert_capacity(4, 2, 2, 2.0, 4) == 4  # never more than the group
    assert moe.expert_capacity(512, 8, 1, 0.0, 64) == 64  # factor 0: a fixed capacity
    assert moe.group_length(512, 4096) == 512
    assert moe.group_length(512, 100) == 64
    assert moe.group_length(12, 5) == 4


def test_load_balance_loss_is_one_when_uniform_and_grows_with_imbalance():
    experts, tokens = 4, 32
    uniform = jnp.full((2, tokens, experts), 1 / experts)
    round_robin = jax.nn.one_hot(jnp.arange(tokens) % experts, experts)[None].repeat(2, 0)
    assert float(moe.load_balance_loss(uniform, round_robin)) == pytest.approx(1.0)
    losses = []
    for skew in (0.0, 1.0, 2.0, 4.0, 8.0):
        probs = jax.nn.softmax(jnp.array([skew, 0, 0, 0]) + jnp.zeros((2, tokens, experts)))
        picks = moe.tokens_choose(probs, 1, tokens).picks
        picks = jnp.where(skew == 0.0, round_robin, picks)
        losses.append(float(moe.load_balance_loss(probs, picks)))
    assert losses[0] == pytest.approx(1.0)
    assert all(b > a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] == pytest.approx(experts * float(jax.nn.softmax(jnp.array([8.0, 0, 0, 0]))[0]), rel=1e-5)


def test_router_z_loss_matches_its_formula():
    logits = np.random.RandomState(2).normal(size=(3, 7, 5)) * 3
    expected = np.mean(np.log(np.exp(logits).sum(-1)) ** 2)
    assert float(moe.router_z_loss(jnp.asarray(logits, jnp.float32))) == pytest.approx(expected, rel=1e-5)


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


@pytest.mark.parametrize(
    "router, k, activation, dropless",
    [
        ("tokens_choose", 1, "relu", False),
        ("tokens_choose", 2, "geglu", False),
        ("experts_choose", 1, "relu", False),
        ("tokens_choose", 2, "geglu", True),
    ],
)
def test_moe_mlp_equals_a_float64_token_loop(router, k, activation, dropless):
    """Every token's output is the probability-weighted sum of the expert MLPs that kept it (zero if none)."""
    experts, d_model, d_ff, batch, length = 4, 8, 16, 2, 12
    layer = moe.MoeMlp(
        num_experts=experts,
        d_ff=d_ff,
        activation=activation,
        experts_per_token=k,
        router=router,
        capacity_factor=1.0,
        min_capacity=1,
        dropless=dropless,
        group_size=6,
    )
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, length, d_model))
    params = flax.linen.unbox(layer.init(jax.random.PRNGKey(1), x)["params"])
    params["router"]["kernel"] = params["router"]["kernel"] * 30  # decisive routing, so capacity binds
    y, sown = layer.apply({"params": params}, x, mutable=["moe"])
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    groups = np.asarray(x, np.float64).reshape(batch * length // 6, 6, d_model)
    logits = groups @ p["router"]["kernel"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    capacity = 6 * k if dropless else moe.expert_capacity(6, experts, k, 1.0, 1)
    loop = loop_experts_choose if router == "experts_choose" else lambda pr, c: loop_tokens_choose(pr, k, c)
    _, combine = loop(probs, capacity)
    weights = combine.sum(-1)  # [g, s, e]
    expected = np.zeros_like(groups)
    for g, s, e in zip(*np.nonzero(weights)):
        h = groups[g, s] @ (p["wi_0"][e] if activation == "geglu" else p["wi"][e])
        h = gelu_tanh(h) * (groups[g, s] @ p["wi_1"][e]) if activation == "geglu" else np.maximum(h, 0)
        expected[g, s] += weights[g, s, e] * (h @ p["wo"][e])
    np.testing.assert_allclose(np.asarray(y).reshape(expected.shape), expected, rtol=1e-4, atol=1e-5)
    if router == "tokens_choose":  # capacity 1.0 with decisive routing drops picks; dropless drops none
        assert (np.count_nonzero(weights) < weights.shape[0] * 6 * k) == (not dropless)
    dropped = float(np.mean(weights.sum(-1) == 0))
    summary = moe.moe_summary(sown["moe"])
    assert float(summary["dropped_fraction"]) == pytest.approx(dropped)
    assert float(summary["router_z_loss"]) == pytest.approx(np.mean(np.log(np.exp(logits).sum(-1)) ** 2), rel=1e-4)
    assert float(summary["expert_fraction"].sum()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "changes, layers, message",
    [
        (dict(num_experts=4, experts_per_token=5), {}, "experts_per_token=5 is larger than num_experts=4"),
        (dict(num_experts=4), dict(num_encoder_layers=3), r"encoder_every=2 must be 0 .* divide num_encoder_layers=3"),
        (dict(num_experts=4, encoder_every=0, decoder_every=0), {}, "no stack has MoE layers"),
        (dict(num_experts=4, dropless=True, router="experts_choose"), {}, "dropless=True.*tokens_choose"),
        (dict(num_experts=4, router="hash"), {}, "router='hash' is not supported"),
        (dict(num_experts=4, train_capacity_factor=-1.0), {}, "train_capacity_factor=-1.0 must be >= 0"),
        (dict(num_experts=4, router="experts_choose"), {}, "experts_choose.*decoder_every=0"),
        (dict(num_experts=-1), {}, "num_experts=-1 must be 0"),
    ],
)
def test_bad_moe_configs_fail_clearly(changes, layers, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{"num_encoder_layers": 2, "num_decoder_layers": 2, **layers}, moe=MoeConfig(**changes))


@pytest.mark.parametrize("name", ["switch/tiny", "switch_decoder/tiny"])
def test_param_counts_equal_initialised_and_active_counts_one_expert(name):
    config = get_config(name)
    params = init_params(config, jax.random.PRNGKey(0))
    assert param_count(config) == sum(leaf.size for leaf in jax.tree.leaves(params))
    mlp = (3 if config.mlp_activation in ("geglu", "swiglu") else 2) * config.d_model * config.d_ff
    moe_layers = config.num_moe_layers("encoder") + config.num_moe_layers("decoder")
    assert param_count(config) - active_param_count(config) == moe_layers * (config.moe.num_experts - 1) * mlp


def test_moe_flops_count_the_router_and_the_active_experts():
    top1 = get_config("switch/tiny")
    dense, top2 = top1.replace(moe=MoeConfig()), top1.replace(moe=top1.moe.replace(experts_per_token=2))
    d, e, inputs, targets = dense.d_model, top1.moe.num_experts, 48, 16
    mlp = 2 * 2 * d * dense.d_ff  # relu: wi and wo
    base = flops.forward_flops_per_sequence(dense, inputs, targets)
    router = 2 * d * e * (inputs + targets)  # one MoE layer per stack
    assert flops.forward_flops_per_sequence(top1, inputs, targets) == base + router
    assert flops.forward_flops_per_sequence(top2, inputs, targets) == base + router + mlp * (inputs + targets)


@pytest.mark.slow
def test_switch_trains_on_cpu_with_every_expert_used(tmp_path):
    bindings = [
        "ModelConfig.dtype='float32'",
        "ModelConfig.dropout_rate=0.0",
        "train.batch_size=8",
        "train.num_steps=20",
        "train.log_every=1",
        "train.progress=False",
        "train.checkpoint_every=20",
        "train.task_feature_lengths={'inputs': 64, 'targets': 16}",
        "learning_rate_schedule.warmup_steps=5",
    ]
    args = ["train", "--gin_file=runs/switch_tiny_span_corruption.gin", f"--model_dir={tmp_path}"]
    assert cli.main(args + [f"--gin.{b}" for b in bindings]) == 0
    rows = read_metrics(pathlib.Path(tmp_path) / "train_metrics.jsonl")
    curve = [row["loss"] for row in rows]
    assert np.mean(curve[-5:]) < np.mean(curve[:5]) - 1.0, curve
    shares = np.array([[row[f"moe_expert_fraction_{e}"] for e in range(4)] for row in rows[-10:]])
    np.testing.assert_allclose(shares.sum(1), 1.0, rtol=1e-4)
    assert shares.mean(0).min() > 0.05, shares  # every expert takes a real share of the picks
    for row in rows[-10:]:
        assert 1.0 <= row["moe_load_balance_loss"] < 4.0  # 1 is perfectly balanced, 4 (= experts) collapsed
        assert row["moe_router_z_loss"] > 0 and 0 <= row["moe_dropped_fraction"] < 1
    assert math.isfinite(rows[-1]["mfu"])


def test_jitter_and_expert_dropout_act_only_while_training():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 16))
    rngs = {"dropout": jax.random.PRNGKey(3)}

    def outputs(**kwargs):
        layer = moe.MoeMlp(num_experts=4, d_ff=32, min_capacity=8, **kwargs)
        params = layer.init(jax.random.PRNGKey(1), x)["params"]
        train = layer.clone(deterministic=False).apply({"params": params}, x, rngs=rngs, mutable=["moe"])[0]
        return layer.apply({"params": params}, x, mutable=["moe"])[0], train

    for kwargs in (dict(jitter=0.5), dict(dropout_rate=0.5)):
        evaluated, trained = outputs(**kwargs)
        assert not np.allclose(evaluated, trained), kwargs
    np.testing.assert_allclose(*outputs(), rtol=1e-6)  # neither: training changes nothing


def test_expert_dropout_rate_overrides_dropout_inside_experts_only():
    config = get_config("switch/tiny").replace(dtype="float32", dropout_rate=0.0, vocab_size=64)
    x = jnp.ones((2, 6), jnp.int32)
    params = init_params(config, jax.random.PRNGKey(0))

    def logits(cfg, enable_dropout):
        return build(cfg).apply(
            {"params": params}, x, x, enable_dropout=enable_dropout, rngs={"dropout": jax.random.PRNGKey(1)}
        )

    np.testing.assert_allclose(logits(config, True), logits(config, False), rtol=1e-6)
    expert_dropout = config.replace(moe=config.moe.replace(expert_dropout_rate=0.4))
    assert not np.allclose(logits(expert_dropout, True), logits(expert_dropout, False))
