"""The arithmetic of PPO and GRPO against hand computations and closed forms: GAE, the clipped
policy and value losses, group-normalised advantages, KL estimators and loss aggregation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5lite.train.advantages import gae, group_advantages, whiten
from t5lite.train.losses import aggregate, clipped_policy_loss, clipped_value_loss, kl_estimate, token_entropy


def test_gae_matches_a_hand_computed_example():
    rewards = jnp.array([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])
    values = jnp.array([[0.5, 0.6, 0.7], [1.0, 0.5, 9.0]])
    mask = jnp.array([[1, 1, 1], [1, 1, 0]])  # the second response ends after two tokens
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # Row 1: δ = (0 + .9·.6 − .5, 0 + .9·.7 − .6, 1 − .7) = (.04, .03, .3); A_t = δ_t + .72·A_{t+1}.
    # Row 2: δ = (0 + .9·.5 − 1, 2 − .5) = (−.55, 1.5); its third token is past the end.
    expected = [[0.04 + 0.72 * (0.03 + 0.72 * 0.3), 0.03 + 0.72 * 0.3, 0.3], [-0.55 + 0.72 * 1.5, 1.5, 0.0]]
    np.testing.assert_allclose(advantages, expected, rtol=1e-6)
    np.testing.assert_allclose(returns, np.array(expected) + [[0.5, 0.6, 0.7], [1.0, 0.5, 0.0]], rtol=1e-6)


def test_gae_with_gamma_and_lambda_one_is_the_monte_carlo_return_less_the_value():
    rewards = jax.random.normal(jax.random.PRNGKey(0), (3, 6))
    values = jax.random.normal(jax.random.PRNGKey(1), (3, 6))
    mask = jnp.arange(6)[None, :] < jnp.array([[6], [4], [1]])
    advantages, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = np.cumsum(np.asarray(rewards * mask)[:, ::-1], axis=1)[:, ::-1]
    np.testing.assert_allclose(advantages, (to_go - values) * mask, atol=1e-5)


def test_whitened_advantages_have_zero_mean_and_unit_variance_on_the_mask():
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 5)) * 3.0 + 7.0
    mask = jnp.arange(5)[None, :] < jnp.array([[5], [3], [2], [4]])
    white = np.asarray(whiten(x, mask))[np.asarray(mask)]
    assert abs(white.mean()) < 1e-5 and abs(white.std() - 1.0) < 1e-4
    assert np.all(np.asarray(whiten(x, mask))[~np.asarray(mask)] == 0.0)


@pytest.mark.parametrize(
    "log_ratio, advantage, gradient",
    [
        (0.1, 1.0, -np.exp(0.1)),  # inside the range: the plain policy gradient −ρ·A
        (0.5, 1.0, 0.0),  # ρ = 1.65 > 1.2 with A > 0: already pushed far enough
        (-0.5, -1.0, 0.0),  # ρ = 0.61 < 0.8 with A < 0: likewise
        (0.5, -1.0, np.exp(0.5)),  # ρ > 1.2 with A < 0: moved the wrong way, not clipped
    ],
)
def test_the_clipped_objective_has_no_gradient_past_the_clip_range(log_ratio, advantage, gradient):
    def loss(log_prob):
        losses, _ = clipped_policy_loss(log_prob, jnp.zeros(()), jnp.asarray(advantage), clip=0.2)
        return losses

    np.testing.assert_allclose(jax.grad(loss)(jnp.asarray(log_ratio)), gradient, rtol=1e-6)
    _, clipped = clipped_policy_loss(jnp.asarray(log_ratio), jnp.zeros(()), jnp.asarray(advantage), clip=0.2)
    assert float(clipped) == (gradient == 0.0)


def test_the_value_loss_stops_at_the_clip_range():
    old, target = jnp.zeros(()), jnp.ones(())
    loss = lambda v: clipped_value_loss(v, old, target, clip=0.2)
    np.testing.assert_allclose(loss(jnp.asarray(0.5)), 0.5 * 0.8**2)  # kept at 0.2: the larger error
    assert float(jax.grad(loss)(jnp.asarray(0.5))) == 0.0
    np.testing.assert_allclose(jax.grad(loss)(jnp.asarray(0.1)), 0.1 - 1.0, rtol=1e-6)


def test_group_advantages_have_zero_mean_in_every_group():
    rewards = jnp.array([1.0, 0.0, 0.0, 1.0, 0.2, 0.4, 0.9, 0.5, 3.0, 3.0, 3.0, 3.0])
    grpo = np.asarray(group_advantages(rewards, group_size=4)).reshape(3, 4)
    np.testing.assert_allclose(grpo.mean(axis=1), 0.0, atol=1e-6)
    np.testing.assert_allclose(grpo[:2].std(axis=1), 1.0, rtol=1e-4)
    assert np.all(grpo[2] == 0.0)  # every sample alike: nothing to learn, and no NaN
    dr_grpo = np.asarray(group_advantages(rewards, group_size=4, scale=False)).reshape(3, 4)
    np.testing.assert_allclose(dr_grpo[0], [0.5, -0.5, -0.5, 0.5], atol=1e-6)
    with pytest.raises(ValueError, match="do not split into groups of 5"):
        group_advantages(rewards, group_size=5)


def test_kl_estimators_against_the_closed_form():
    """Expectations under π, by enumeration of a 6-way categorical: k1 and k3 are unbiased, k3 never
    negative while k1 is for some tokens; k2 agrees to second order for nearby distributions."""
    policy = jax.nn.log_softmax(jax.random.normal(jax.random.PRNGKey(3), (6,)))
    for spread in (1.0, 0.1):
        reference = jax.nn.log_softmax(policy + spread * jax.random.normal(jax.random.PRNGKey(4), (6,)))
        kl = float(jnp.sum(jnp.exp(policy) * (policy - reference)))
        expect = {e: float(jnp.sum(jnp.exp(policy) * kl_estimate(policy, reference, e))) for e in ("k1", "k2", "k3")}
        np.testing.assert_allclose([expect["k1"], expect["k3"]], [kl, kl], rtol=1e-5, atol=5e-7)  # float32
        assert np.all(np.asarray(kl_estimate(policy, reference, "k3")) >= 0.0)
        assert np.any(np.asarray(kl_estimate(policy, reference, "k1")) < 0.0)
    np.testing.assert_allclose(expect["k2"], kl, rtol=0.05)  # spread 0.1: third-order error only
    with pytest.raises(ValueError, match="'k4' is not one of k1, k2, k3"):
        kl_estimate(policy, reference, "k4")


def test_aggregations_weigh_tokens_and_responses_as_named():
    per_token = jnp.array([[1.0, 1.0, 1.0, 1.0], [4.0, 9.0, 9.0, 9.0]])
    mask = jnp.array([[1, 1, 1, 1], [1, 0, 0, 0]])
    assert float(aggregate(per_token, mask, "token_mean")) == pytest.approx((4 + 4) / 5)
    assert float(aggregate(per_token, mask, "sequence_mean")) == pytest.approx((1 + 4) / 2)
    assert float(aggregate(per_token, mask, "constant")) == pytest.approx((4 + 4) / 8)
    with pytest.raises(ValueError, match="'median' is not one of"):
        aggregate(per_token, mask, "median")


def test_entropy_of_uniform_and_certain_distributions():
    np.testing.assert_allclose(token_entropy(jnp.zeros((2, 8))), np.log(8.0), rtol=1e-6)
    assert float(token_entropy(jnp.array([0.0, -1e4, -1e4]))) == pytest.approx(0.0, abs=1e-6)
