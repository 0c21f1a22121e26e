"""Scaling-law fits recover the constants that generated their data."""

import csv
import json
import pathlib
import warnings

import numpy as np
import pytest
from scipy import optimize

from t5lite.scaling import fit, fits

SHARED_DATA = pathlib.Path(__file__).parents[2].parent / "shared" / "data"
FIGURE4 = SHARED_DATA / "chinchilla_figure4_points.csv"

# Hoffmann et al.'s published constants generate the synthetic data.
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28
A_EXPONENT, B_EXPONENT = BETA / (ALPHA + BETA), ALPHA / (ALPHA + BETA)  # 0.4516, 0.5484


def true_loss(N, D):
    return E + A / N**ALPHA + B / D**BETA


def isoflop_sweep(sizes_per_budget, span_decades, noise, seed=0):
    """Seven budgets 1e18..1e21; sizes centred on a 20-tokens-per-parameter guess, not the true optimum."""
    rng = np.random.default_rng(seed)
    N, C = [], []
    for budget in np.logspace(18, 21, 7):
        centre = np.sqrt(budget / 120)
        N.extend(centre * np.logspace(-span_decades, span_decades, sizes_per_budget))
        C.extend([budget] * sizes_per_budget)
    N, C = np.array(N), np.array(C)
    D = C / (6 * N)
    return N, D, C, true_loss(N, D) * np.exp(noise * rng.standard_normal(N.size))


@pytest.mark.skipif(
    not FIGURE4.is_file(), reason=f"{FIGURE4} is absent (Epoch AI's Figure 4 points live outside the repo)"
)
def test_approach3_reproduces_epoch_ai_refit_of_chinchilla_figure4():
    with FIGURE4.open(newline="") as f:
        rows = list(csv.DictReader(f))
    N = np.array([float(r["Model Size"]) for r in rows])
    C = np.array([float(r["Training FLOP"]) for r in rows])
    L = np.array([float(r["loss"]) for r in rows])
    law = fits.approach3(N, C / (6 * N), L, exclude_highest=5)
    # Besiroglu et al. (2024), Table 1: their refit of Hoffmann et al.'s Approach 3.
    assert law.E == pytest.approx(1.8172, rel=0.01)
    assert law.A == pytest.approx(477.82, rel=0.01)
    assert law.B == pytest.approx(2142.52, rel=0.01)
    assert law.alpha == pytest.approx(0.34731, rel=0.01)
    assert law.beta == pytest.approx(0.36715, rel=0.01)


def test_approach3_recovers_noisy_synthetic_constants_with_intervals():
    rng = np.random.default_rng(1)
    N = 10 ** rng.uniform(7, 10, 150)
    D = 10 ** rng.uniform(8, 11.5, 150)
    L = true_loss(N, D) * np.exp(0.002 * rng.standard_normal(N.size))
    law = fits.approach3(N, D, L, bootstrap=30)
    assert law.E == pytest.approx(E, rel=0.03)
    assert law.alpha == pytest.approx(ALPHA, abs=0.015)
    assert law.beta == pytest.approx(BETA, abs=0.015)
    assert law.a == pytest.approx(A_EXPONENT, abs=0.01)
    for name, truth in {"alpha": ALPHA, "beta": BETA, "a": A_EXPONENT}.items():
        low, high = law.intervals[name]
        estimate = getattr(law, name)
        assert low < estimate < high and 0.001 < high - low < 0.03
        # Near-L1 losses make percentile intervals a little narrow; the truth is still close by.
        assert abs(truth - estimate) < 1.5 * (high - low)


def test_approach3_exclude_highest_drops_outliers():
    N, D, C, L = isoflop_sweep(9, 0.7, noise=0.0)
    L[:3] += 5.0  # the three worst runs diverged
    law = fits.approach3(N, D, L, exclude_highest=3)
    assert law.alpha == pytest.approx(ALPHA, abs=1e-3)
    assert law.beta == pytest.approx(BETA, abs=1e-3)


def test_approach1_recovers_the_exponents():
    N, D, C, L = isoflop_sweep(31, 1.0, noise=0.0)
    fit = fits.approach1(N, D, C, L)
    assert fit.budgets.size == 7
    assert fit.n_law.exponent == pytest.approx(A_EXPONENT, abs=0.01)
    assert fit.d_law.exponent == pytest.approx(B_EXPONENT, abs=0.01)


def test_approach2_recovers_the_exponents_from_noisy_profiles():
    N, D, C, L = isoflop_sweep(9, 0.7, noise=0.001)
    fit = fits.approach2(N, D, C, L)
    assert fit.parabolas.shape == (7, 3)
    assert fit.n_law.exponent == pytest.approx(A_EXPONENT, abs=0.02)
    assert fit.d_law.exponent == pytest.approx(B_EXPONENT, abs=0.02)
    # Each budget's optimum lies on its IsoFLOP line.
    assert 6 * fit.n_opt * fit.d_opt == pytest.approx(fit.budgets, rel=1e-9)


@pytest.mark.parametrize("k", [6.0, 3.0])
def test_closed_form_optimum_is_the_numerical_argmin(k):
    law = fits.ChinchillaLaw(E, A, B, ALPHA, BETA)
    for budget in (1e18, 5.76e23):
        result = optimize.minimize_scalar(
            lambda log_n: true_loss(np.exp(log_n), budget / (k * np.exp(log_n))),
            bounds=(5, 40),
            method="bounded",
            options={"xatol": 1e-10},
        )
        n_opt, d_opt = law.compute_optimal(budget, k)
        assert n_opt == pytest.approx(np.exp(result.x), rel=1e-4)
        assert d_opt == pytest.approx(budget / (k * np.exp(result.x)), rel=1e-4)
        assert law.tokens_per_parameter(budget, k) == pytest.approx(d_opt / n_opt)


def test_kaplan_laws_recover_their_constants():
    rng = np.random.default_rng(2)
    x = np.logspace(6, 11, 40)
    for l_inf, x0, alpha in [(1.8, 8.8e13, 0.076), (2.0, 5.4e9, 0.3)]:
        L = (l_inf + (x0 / x) ** alpha) * np.exp(0.001 * rng.standard_normal(x.size))
        law = fits.kaplan(x, L)
        assert law.alpha == pytest.approx(alpha, rel=0.1)
        assert law.L_inf == pytest.approx(l_inf, rel=0.05)
        assert law(x) == pytest.approx(l_inf + (x0 / x) ** alpha, rel=0.005)


def test_holdout_predicts_the_largest_budget():
    N, D, C, L = isoflop_sweep(9, 0.7, noise=0.001)
    check = fits.holdout_largest_budget(N, D, C, L)
    assert check["budget"] == pytest.approx(1e21)
    assert abs(check["relative_error"]) < 0.01


def test_summary_reports_every_approach_as_json():
    N, D, C, L = isoflop_sweep(9, 0.7, noise=0.0)
    out = json.loads(json.dumps(fits.summary(N, D, C, L)))
    assert set(out) == {"approach1", "approach2", "approach3", "kaplan", "holdout_largest_budget"}
    for name in ("approach2", "approach3"):
        assert out[name]["a"] == pytest.approx(A_EXPONENT, abs=0.01)
        assert out[name]["b"] == pytest.approx(B_EXPONENT, abs=0.01)
    assert set(out["kaplan"]) == {"N", "D", "C"}


def test_group_budgets_tolerates_rounding():
    labels, budgets = fits.group_budgets([1e18, 1.01e18, 0.995e18, 1e19, 1.02e19])
    assert labels.tolist() == [0, 0, 0, 1, 1]
    assert budgets == pytest.approx([1e18, 1e19], rel=0.02)


def test_bad_input_raises():
    N, D, C, L = isoflop_sweep(9, 0.7, noise=0.0)
    with pytest.raises(ValueError, match="non-empty"):
        fits.approach3([], [], [])
    with pytest.raises(ValueError, match="positive"):
        fits.approach3(-N, D, L)
    with pytest.raises(ValueError, match="differ in length"):
        fits.approach1(N, D[:-1], C, L)
    with pytest.raises(ValueError, match="at least 3"):
        keep = np.r_[0:2, 9 : len(N)]
        fits.approach2(N[keep], D[keep], C[keep], L[keep])
    with pytest.raises(ValueError, match="two or more"):
        fits.approach1(N[:9], D[:9], C[:9], L[:9])


def test_public_api_reads_like_a_dict():
    N = np.array([1e8, 3e8, 1e9, 3e9] * 3)
    D = np.repeat([2e9, 2e10, 2e11], 4)
    L = 1.7 + 400 / N**0.34 + 410 / D**0.28
    r = fit.approach3(N, D, L, exclude_highest=0)
    np.testing.assert_allclose([r["alpha"], r["beta"], r["E"]], [0.34, 0.28, 1.7], rtol=0.02)


def test_a_coefficient_beyond_float_range_is_inf_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        law = fits._chinchilla(np.array([1.0, 800.0, 0.3, 2.0, 0.3]))
    assert law.A == np.inf and law.E == pytest.approx(np.e)
