"""The planner's shape rule and IsoFLOP grid."""

import gin
import numpy as np
import pytest

from t5lite.config import gin_bindings, model_config_from_gin
from t5lite.models import flops, param_count
from t5lite.scaling import planner


@pytest.mark.parametrize(
    "family, activation, d_ff_ratio", [("decoder", "swiglu", 8 / 3), ("encoder_decoder", "geglu", 2.5)]
)
@pytest.mark.parametrize("target", [3e7, 3e8, 3e9])
def test_shape_rule(family, activation, d_ff_ratio, target):
    config = planner.config_for_size(family, target)
    assert config.mlp_activation == activation
    assert config.d_model % 64 == 0 and config.head_dim == 64 and config.num_heads == config.d_model // 64
    assert d_ff_ratio * config.d_model <= config.d_ff < d_ff_ratio * config.d_model + 64
    assert 32 <= config.d_model / config.num_decoder_layers <= 128
    assert param_count(config) == pytest.approx(target, rel=0.1)
    if family == "encoder_decoder":
        assert config.num_encoder_layers == config.num_decoder_layers


def test_plan_spaces_sizes_in_log_n_and_spends_each_budget():
    budgets = [1e17, 1e18]
    points = planner.plan(
        budgets, "decoder", inputs_length=0, targets_length=256, num_sizes=5, span=4.0, overrides={"vocab_size": 8192}
    )
    assert len(points) == 10 and len({p.name for p in points}) == 10
    for budget in budgets:
        profile = [p for p in points if p.flops == budget]
        sizes = np.array([param_count(p.config) for p in profile])
        # Targets: sqrt(C / (6 * 20)) * 4^[-1, -0.5, 0, 0.5, 1].
        targets = np.sqrt(budget / 120) * 4.0 ** np.linspace(-1, 1, 5)
        assert sizes == pytest.approx(targets, rel=0.1)
        for p in profile:
            assert p.config.vocab_size == 8192
            spent = p.tokens * flops.training_flops_per_token(p.config, 0, 256)
            assert spent == pytest.approx(budget, rel=1e-6)


def test_encoder_decoder_plan_counts_both_stacks_tokens():
    point = planner.plan([1e17], "encoder_decoder", inputs_length=128, targets_length=64)[2]
    per_sequence = flops.training_flops_per_sequence(point.config, 128, 64)
    assert point.tokens == pytest.approx(1e17 / per_sequence * (128 + 64), rel=1e-6)


@pytest.mark.parametrize("family", ["decoder", "encoder_decoder"])
def test_gin_bindings_round_trip(family):
    config = planner.config_for_size(family, 1e8)
    try:
        assert model_config_from_gin([], gin_bindings(config)) == config
    finally:
        gin.clear_config()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(budgets=[1e17], family="mlp_mixer"), "Unknown model family"),
        (dict(budgets=[], family="decoder"), "non-empty"),
        (dict(budgets=[-1.0], family="decoder"), "positive"),
        (dict(budgets=[1e17], family="decoder", num_sizes=2), "at least 3"),
        (dict(budgets=[1e17], family="decoder", span=1.0), "span"),
        (dict(budgets=[1e9], family="decoder"), "less than one sequence"),
    ],
)
def test_bad_plans_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        planner.plan(**kwargs, inputs_length=0, targets_length=512)
