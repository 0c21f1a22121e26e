"""Ratings from pairwise judgments, checked against scikit-learn, closed forms and hand arithmetic."""

import functools
import math

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from t5lite.ratings import Estimate, Judgment, bootstrap_intervals, bradley_terry, elo_ratings, win_rate


def _random_judgments(seed, games, models="ABCDE"):
    """Random pairs and outcomes, ties included."""
    rng = np.random.default_rng(seed)
    judgments = []
    for _ in range(games):
        a, b = rng.choice(len(models), 2, replace=False)
        judgments.append((models[a], models[b], float(rng.choice([0.0, 0.5, 1.0], p=[0.35, 0.15, 0.5]))))
    return judgments


def _simulate(true_ratings, games, seed):
    """Win/loss games from Bradley-Terry strengths on the Elo scale (base 10, scale 400)."""
    rng = np.random.default_rng(seed)
    models = list(true_ratings)
    judgments = []
    for _ in range(games):
        a, b = rng.choice(len(models), 2, replace=False)
        p_a = 1 / (1 + 10 ** ((true_ratings[models[b]] - true_ratings[models[a]]) / 400))
        judgments.append((models[a], models[b], float(rng.random() < p_a)))
    return judgments


def _sklearn_bradley_terry(judgments, models):
    """Chatbot Arena's way: logistic regression on +1/-1 rows; a tie is half a row of each label."""
    x = np.zeros((len(judgments), len(models)))
    for i, (a, b, _) in enumerate(judgments):
        x[i, models.index(a)], x[i, models.index(b)] = 1.0, -1.0
    outcome = np.array([o for _, _, o in judgments])
    # C=inf is scikit-learn >= 1.8's spelling of penalty=None (which now warns).
    fit = LogisticRegression(C=np.inf, fit_intercept=False, tol=1e-12, max_iter=10_000).fit(
        np.vstack([x, x]),
        np.r_[np.ones(len(judgments)), np.zeros(len(judgments))],
        sample_weight=np.r_[outcome, 1 - outcome],
    )
    ratings = fit.coef_[0] * 400 / math.log(10)
    return dict(zip(models, ratings - ratings.mean() + 1000))


def test_bradley_terry_matches_sklearn_logistic_regression():
    judgments = _random_judgments(seed=1, games=300)
    expected = _sklearn_bradley_terry(judgments, list("ABCDE"))
    ratings = bradley_terry(judgments)
    assert set(ratings) == set("ABCDE")
    for model, rating in expected.items():
        assert ratings[model] == pytest.approx(rating, abs=1e-3)
    assert max(expected.values()) - min(expected.values()) > 30  # the data does separate the models


def test_bradley_terry_two_players_closed_form():
    # 30 wins of 40: the MLE win probability is 3/4, so the difference is 400 log10(30 / 10).
    judgments = [("A", "B", 1.0)] * 30 + [("A", "B", 0.0)] * 5 + [("B", "A", 1.0)] * 5
    ratings = bradley_terry(judgments)
    assert ratings["A"] - ratings["B"] == pytest.approx(400 * math.log10(3), abs=1e-9)  # 190.85
    assert ratings["A"] + ratings["B"] == pytest.approx(2000, abs=1e-9)
    # Ties count half: 7 wins, 2 ties, 1 loss is a score of 8 of 10; base e and scale 1 give log odds.
    tied = [Judgment("A", "B", 1.0)] * 7 + [Judgment("A", "B", 0.5)] * 2 + [Judgment("B", "A", 1.0)]
    ratings = bradley_terry(tied, scale=1.0, base=math.e, initial=0.0, anchor="B")
    assert ratings == pytest.approx({"A": math.log(8 / 2), "B": 0.0}, abs=1e-12)


def test_bradley_terry_anchor_shifts_only():
    judgments = _random_judgments(seed=2, games=200)
    by_mean, by_c = bradley_terry(judgments), bradley_terry(judgments, anchor="C")
    assert by_c["C"] == pytest.approx(1000, abs=1e-9)
    assert np.mean(list(by_mean.values())) == pytest.approx(1000, abs=1e-9)
    assert by_c["A"] - by_c["E"] == pytest.approx(by_mean["A"] - by_mean["E"], abs=1e-9)


def test_bradley_terry_prior_makes_an_unbeaten_model_finite():
    judgments = [("A", "B", 1.0)] * 3
    with pytest.raises(ValueError, match=r"models \['A'\] never lost nor tied.*infinite.*prior"):
        bradley_terry(judgments)
    # One virtual tie: a score of 3.5 of 4 games.
    ratings = bradley_terry(judgments, prior=1.0)
    assert ratings["A"] - ratings["B"] == pytest.approx(400 * math.log10(3.5 / 0.5), abs=1e-9)  # 338.04


def test_bradley_terry_unbeaten_group_is_named():
    # A and B beat each other but never lose to C or D, who also beat each other.
    judgments = [("A", "B", 1.0), ("B", "A", 1.0), ("C", "D", 0.5), ("A", "C", 1.0), ("D", "B", 0.0)]
    with pytest.raises(ValueError, match=r"models \['A', 'B'\] never lost nor tied"):
        bradley_terry(judgments)


def test_recovers_simulated_strengths_within_bootstrap_intervals():
    truth = {"A": 1150.0, "B": 1050.0, "C": 950.0, "D": 850.0}  # mean 1000, as the fit is anchored
    widths = []
    for seed, games in ((0, 1000), (1, 4000)):
        # 99% intervals: eight 95% intervals would all cover the truth only about two times in three.
        intervals = bootstrap_intervals(_simulate(truth, games, seed), rounds=200, confidence=0.99, seed=1)
        for model, true_rating in truth.items():
            assert intervals[model].low < true_rating < intervals[model].high, (games, model, intervals[model])
        widths.append(np.array([e.high - e.low for e in intervals.values()]))
    assert np.all(widths[0] < 100)  # 1000 games: a standard error near 13 Elo, so a 99% width near 70
    # Four times the games: intervals half as wide (on average: 99% ends of 200 rounds are noisy).
    assert widths[0].sum() / widths[1].sum() == pytest.approx(2.0, rel=0.15)


def _two_players(wins, losses):
    return [("A", "B", 1.0)] * wins + [("B", "A", 1.0)] * losses


def test_bootstrap_width_matches_delta_method():
    # d = 400 log10(p / (1 - p)) has standard error 400 / ln(10) / sqrt(n p (1 - p)); A = 1000 + d / 2.
    for wins, losses in ((300, 100), (1200, 400)):
        n, p = wins + losses, wins / (wins + losses)
        se_a = 400 / math.log(10) / math.sqrt(n * p * (1 - p)) / 2  # 10.03 Elo for 400 games
        a = bootstrap_intervals(_two_players(wins, losses), rounds=400)["A"]
        assert a.value == pytest.approx(1000 + 200 * math.log10(3), abs=1e-9)
        assert a.low < a.value < a.high
        assert a.high - a.low == pytest.approx(2 * 1.96 * se_a, rel=0.12)


def test_bootstrap_deterministic_for_a_seed():
    judgments = _random_judgments(seed=3, games=150)
    first = bootstrap_intervals(judgments, rounds=50, seed=7)
    assert bootstrap_intervals(judgments, rounds=50, seed=7) == first
    assert bootstrap_intervals(judgments, rounds=50, seed=8) != first
    assert list(first) == list(bradley_terry(judgments))
    for model, estimate in first.items():
        assert isinstance(estimate, Estimate)
        assert estimate.value == bradley_terry(judgments)[model]
        assert estimate.low < estimate.value < estimate.high


def test_bootstrap_of_online_elo():
    judgments = _random_judgments(seed=4, games=150)
    intervals = bootstrap_intervals(judgments, method=elo_ratings, rounds=50)
    for model, estimate in intervals.items():
        assert estimate.value == elo_ratings(judgments)[model]
        assert estimate.low < estimate.high


def test_bootstrap_resample_without_a_finite_fit_says_to_use_a_prior():
    judgments = _two_players(wins=9, losses=1)  # about a third of resamples have A unbeaten
    with pytest.raises(ValueError, match=r"bootstrap round \d+: models \['A'\] never lost.*functools.partial"):
        bootstrap_intervals(judgments, rounds=50)
    prior = functools.partial(bradley_terry, prior=1.0)
    a = bootstrap_intervals(judgments, method=prior, rounds=50)["A"]
    assert a.value == pytest.approx(1000 + 200 * math.log10(9.5 / 1.5), abs=1e-9)


def test_elo_hand_computed_updates():
    judgments = [("A", "B", 1.0), ("A", "C", 0.0), ("B", "C", 0.5)]
    # Game 1: equal ratings expect 0.5 each; A wins: A = 1000 + 32 * 0.5 = 1016, B = 984.
    # Game 2: A (1016) expected 1 / (1 + 10^(-16/400)) = 0.52301 against C (1000); C wins:
    #   A = 1016 - 32 * 0.52301 = 999.264, C = 1000 + 32 * 0.52301 = 1016.736.
    e_a = 1 / (1 + 10 ** ((1000 - 1016) / 400))
    # Game 3: B (984) expected 1 / (1 + 10^(32.736/400)) = 0.45302 against C; a tie:
    #   B = 984 + 32 * (0.5 - 0.45302) = 985.503, C = 1016.736 - 32 * (0.5 - 0.45302) = 1015.233.
    e_b = 1 / (1 + 10 ** ((1000 + 32 * e_a - 984) / 400))
    expected = {"A": 1016 - 32 * e_a, "B": 984 + 32 * (0.5 - e_b), "C": 1000 + 32 * e_a - 32 * (0.5 - e_b)}
    assert elo_ratings(judgments, k=32) == pytest.approx(expected, abs=1e-9)
    assert expected == pytest.approx({"A": 999.264, "B": 985.503, "C": 1015.233}, abs=1e-3)
    # Default k=4 and the Judgment record.
    assert elo_ratings([Judgment("A", "B", 1.0)]) == {"A": 1002.0, "B": 998.0}


def test_win_rate_wilson_interval():
    judgments = [("A", "B", 1.0)] * 7 + [("B", "A", 0.5)] * 2 + [("B", "A", 1.0)]
    # A scores 8 of 10; the 95% Wilson score interval for 8/10 is [0.4902, 0.9433].
    rate = win_rate(judgments)
    assert rate.value == pytest.approx(0.8)
    assert (rate.low, rate.high) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    b = win_rate(judgments, model="B")
    assert (b.value, b.low, b.high) == pytest.approx((0.2, 1 - 0.9433, 1 - 0.4902), abs=1e-4)


@pytest.mark.parametrize(
    "judgments, message",
    [
        ([], r"no judgments: pass a sequence of \(model_a, model_b, outcome\)"),
        ([("A", "B", 1.0), ("A", "B", 2)], r"judgment 1 \('A', 'B', 2\) has outcome 2; use 1.0 if model_a won"),
        ([("A", "B", "tie")], r"outcome 'tie'; use 1.0 if model_a won, 0.0 if model_b won, 0.5 for a tie"),
        ([("A", "B", float("nan"))], r"outcome nan; use 1.0"),
        ([("A", "B", 1.0), ("B", "B", 0.5)], r"judgment 1 \('B', 'B', 0.5\) has a model playing itself"),
        ([("A", "B")], r"judgment 0 is \('A', 'B'\); each judgment is a \(model_a, model_b, outcome\) tuple"),
        ([("A", "B", 1.0), ("C", "D", 0.0)], r"2 groups that never play each other: \[\['A', 'B'\], \['C', 'D'\]\]"),
    ],
)
def test_bad_judgments(judgments, message):
    with pytest.raises(ValueError, match=message):
        bradley_terry(judgments)


def test_bad_arguments():
    judgments = [("A", "B", 1.0), ("B", "A", 1.0)]
    with pytest.raises(ValueError, match=r"anchor 'Z' never plays in the judgments; anchor one of \['A', 'B'\]"):
        bradley_terry(judgments, anchor="Z")
    with pytest.raises(ValueError, match=r"prior=-1 must be >= 0"):
        bradley_terry(judgments, prior=-1)
    with pytest.raises(ValueError, match=r"a model playing itself"):
        elo_ratings([("A", "A", 1.0)])
    with pytest.raises(ValueError, match=r"rounds=0 must be a positive integer"):
        bootstrap_intervals(judgments, rounds=0)
    with pytest.raises(ValueError, match=r"confidence=95 must be between 0 and 1"):
        bootstrap_intervals(judgments, confidence=95)
    with pytest.raises(ValueError, match=r"win_rate compares two models, got 3: \['A', 'B', 'C'\]"):
        win_rate([*judgments, ("A", "C", 0.5)])
    with pytest.raises(ValueError, match=r"model 'C' is not one of the two models \['A', 'B'\]"):
        win_rate(judgments, model="C")
