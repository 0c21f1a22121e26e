"""Ratings of runs from pairwise judgments: online Elo, Bradley-Terry, bootstrap intervals, win rates.

A judgment is `(model_a, model_b, outcome)`: outcome 1.0 if model_a won, 0.0 if model_b won,
0.5 for a tie (e.g. a reward model or a metric comparing two runs' generations for one prompt).
Ratings are on the Elo scale: a lead of `scale` points means `base`-to-1 odds of winning.

Pure numpy/scipy, so ratings can be computed wherever the judgments are.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import NamedTuple

import numpy as np
from scipy import sparse, special, stats
from scipy.sparse import csgraph

OUTCOMES = (0.0, 0.5, 1.0)


class Judgment(NamedTuple):
    """One comparison; outcome is 1.0 if model_a won, 0.0 if model_b won, 0.5 for a tie."""

    model_a: Hashable
    model_b: Hashable
    outcome: float


class Estimate(NamedTuple):
    """A point estimate with the low and high ends of its confidence interval."""

    value: float
    low: float
    high: float


class _Games(NamedTuple):
    """Validated judgments as arrays: models in order of first appearance, indices into them."""

    models: list
    a: np.ndarray
    b: np.ndarray
    outcome: np.ndarray


def elo_ratings(judgments: Iterable, k=4.0, base=10.0, scale=400.0, initial=1000.0) -> dict:
    """Online Elo, one update per judgment in the given order (as Chatbot Arena's original Elo).

    Order matters and recent games weigh more; `bradley_terry` is the order-free alternative.
    """
    games = _validate(judgments)
    ratings = dict.fromkeys(games.models, float(initial))
    for a, b, outcome in zip(games.a.tolist(), games.b.tolist(), games.outcome.tolist()):
        ma, mb = games.models[a], games.models[b]
        expected_a = 1.0 / (1.0 + base ** ((ratings[mb] - ratings[ma]) / scale))
        ratings[ma] += k * (outcome - expected_a)
        ratings[mb] -= k * (outcome - expected_a)
    return ratings


def bradley_terry(
    judgments: Iterable, scale=400.0, base=10.0, initial=1000.0, anchor: Hashable = None, prior=0.0
) -> dict:
    """Maximum-likelihood Bradley-Terry ratings on the Elo scale; a tie counts half a win each way.

    The ratings are shifted so that their mean (or the `anchor` model's rating) is `initial`.
    If some models never lost nor tied against the rest, their ratings would be infinite: that
    raises ValueError unless `prior` > 0, which adds `prior` virtual ties to every pair of models
    that played each other (shrinking ratings towards each other, as a symmetric prior would).
    """
    games = _validate(judgments)
    if prior < 0:
        raise ValueError(f"prior={prior} must be >= 0 (the number of virtual ties added to each pair)")
    if anchor is not None and anchor not in games.models:
        raise ValueError(f"anchor {anchor!r} never plays in the judgments; anchor one of {games.models}")
    lo, hi, n, score = _pairs(games, prior)
    _check_identifiable(games.models, lo, hi, n, score)
    theta = _newton(len(games.models), lo, hi, n, score)
    ratings = theta * scale / math.log(base)
    shift = initial - (ratings.mean() if anchor is None else ratings[games.models.index(anchor)])
    return dict(zip(games.models, (ratings + shift).tolist()))


def bootstrap_intervals(
    judgments: Iterable,
    method: Callable[[list], Mapping] = bradley_terry,
    rounds=1000,
    confidence=0.95,
    seed=0,
) -> dict:
    """Percentile bootstrap: `method` refitted on judgments resampled with replacement.

    Returns {model: Estimate(rating on all judgments, low, high)}. For online Elo the resampling
    also shuffles the order, so the interval covers the order's effect as well.
    """
    judgments = list(judgments)
    if not (isinstance(rounds, numbers.Integral) and rounds >= 1):
        raise ValueError(f"rounds={rounds!r} must be a positive integer (e.g. 1000)")
    _check_confidence(confidence)
    point = method(judgments)
    samples = np.empty((rounds, len(point)))
    rng = np.random.default_rng(seed)
    for r in range(rounds):
        resample = [judgments[i] for i in rng.integers(0, len(judgments), len(judgments))]
        samples[r] = _resample_ratings(method, resample, point, r)
    low, high = np.quantile(samples, [(1 - confidence) / 2, (1 + confidence) / 2], axis=0)
    return {m: Estimate(v, lo, hi) for m, v, lo, hi in zip(point, point.values(), low.tolist(), high.tolist())}


def win_rate(judgments: Iterable, model: Hashable = None, confidence=0.95) -> Estimate:
    """Score of `model` (default: the first judgment's model_a) against the one other model.

    Wins plus half the ties over games, with a Wilson score interval; ties make the true spread
    smaller than a binomial's, so the interval is then conservative.
    """
    games = _validate(judgments)
    if len(games.models) != 2:
        raise ValueError(f"win_rate compares two models, got {len(games.models)}: {games.models}")
    model = games.models[0] if model is None else model
    if model not in games.models:
        raise ValueError(f"model {model!r} is not one of the two models {games.models}")
    is_a = games.a == games.models.index(model)
    score = float(np.where(is_a, games.outcome, 1.0 - games.outcome).sum())
    _check_confidence(confidence)
    return _wilson(score, len(games.outcome), float(stats.norm.ppf((1 + confidence) / 2)))


def _validate(judgments: Iterable) -> _Games:
    """Checks every judgment once, so the fits can trust their arrays."""
    judgments = list(judgments)
    if not judgments:
        raise ValueError("no judgments: pass a sequence of (model_a, model_b, outcome) tuples")
    for i, j in enumerate(judgments):
        if not isinstance(j, tuple | list) or len(j) != 3:
            raise ValueError(f"judgment {i} is {j!r}; each judgment is a (model_a, model_b, outcome) tuple")
        if j[0] == j[1]:
            raise ValueError(f"judgment {i} {tuple(j)!r} has a model playing itself; drop it or fix the names")
        if not isinstance(j[2], numbers.Real) or j[2] not in OUTCOMES:
            raise ValueError(
                f"judgment {i} {tuple(j)!r} has outcome {j[2]!r}; use 1.0 if model_a won, "
                "0.0 if model_b won, 0.5 for a tie"
            )
    models = list(dict.fromkeys(m for j in judgments for m in j[:2]))
    index = {m: i for i, m in enumerate(models)}
    a, b, outcome = zip(*judgments)
    return _Games(models, np.array([index[m] for m in a]), np.array([index[m] for m in b]), np.array(outcome, float))


def _pairs(games: _Games, prior: float):
    """Games and score of the first model, per pair of models (lo < hi) that played each other."""
    lo, hi = np.minimum(games.a, games.b), np.maximum(games.a, games.b)
    score_lo = np.where(games.a == lo, games.outcome, 1.0 - games.outcome)
    pair, inverse = np.unique(lo * len(games.models) + hi, return_inverse=True)
    n = np.bincount(inverse).astype(float) + prior
    score = np.bincount(inverse, score_lo) + prior / 2
    return pair // len(games.models), pair % len(games.models), n, score


def _check_identifiable(models: list, lo, hi, n, score):
    """The MLE is unique and finite iff the graph of 'scored against' is strongly connected."""
    m = len(models)
    adjacency = sparse.coo_matrix((np.ones(len(lo)), (lo, hi)), shape=(m, m))
    count, labels = csgraph.connected_components(adjacency, directed=False)
    if count > 1:
        groups = [[x for x, lab in zip(models, labels) if lab == c] for c in range(count)]
        raise ValueError(
            f"the models fall into {count} groups that never play each other: {groups}; "
            "ratings across groups are undefined, so add judgments between the groups or rate each apart"
        )
    scored = np.concatenate([lo[score > 0], hi[n - score > 0]]), np.concatenate([hi[score > 0], lo[n - score > 0]])
    adjacency = sparse.coo_matrix((np.ones(len(scored[0])), scored), shape=(m, m))
    count, labels = csgraph.connected_components(adjacency, directed=True, connection="strong")
    if count > 1:
        beaten = set(labels[scored[1][labels[scored[0]] != labels[scored[1]]]].tolist())
        unbeaten = [x for x, lab in zip(models, labels) if lab == min(set(range(count)) - beaten)]
        raise ValueError(
            f"models {unbeaten} never lost nor tied against the other models, so their maximum-likelihood "
            "ratings are infinite; pass prior > 0 (e.g. prior=1.0 adds one virtual tie per pair that played)"
        )


def _newton(m: int, lo, hi, n, score) -> np.ndarray:
    """Maximises the Bradley-Terry log-likelihood over natural-log strengths by damped Newton.

    The Hessian is a graph Laplacian, singular along equal shifts of all strengths; adding 1/m to
    every entry makes it invertible without changing the step, which stays mean-free.
    """
    theta = np.zeros(m)
    for _ in range(100):
        d = theta[lo] - theta[hi]
        residual = score - n * special.expit(d)
        grad = np.bincount(lo, residual, m) - np.bincount(hi, residual, m)
        weight = n * special.expit(d) * special.expit(-d)
        hess = np.zeros((m, m))
        np.add.at(hess, (lo, hi), -weight)
        hess += hess.T
        hess[np.diag_indices(m)] = -hess.sum(axis=1)
        step = np.linalg.solve(hess + 1.0 / m, grad)
        if np.max(np.abs(step)) < 1e-11:
            return theta + step
        theta += _line_search(theta, step, lo, hi, n, score) * step
    raise RuntimeError("Bradley-Terry Newton iterations did not converge; please report the judgments")


def _line_search(theta, step, lo, hi, n, score) -> float:
    """Halves the Newton step until the likelihood does not decrease (far from the optimum)."""

    def nll(t):
        d = t[lo] - t[hi]
        return np.sum(score * np.logaddexp(0, -d) + (n - score) * np.logaddexp(0, d))

    t, start = 1.0, nll(theta)
    while t > 1e-6 and nll(theta + t * step) > start + 1e-12 * abs(start):  # rounding: not an increase
        t /= 2
    return t


def _resample_ratings(method: Callable, resample: list, models: Iterable, round_: int) -> list:
    """One bootstrap refit, which must still rate every model of the full data."""
    advice = (
        "with this few judgments per model, use a prior, e.g. "
        "method=functools.partial(bradley_terry, prior=1.0), or collect more judgments"
    )
    try:
        ratings = method(resample)
    except ValueError as e:
        raise ValueError(f"bootstrap round {round_}: {e}; {advice}") from e
    missing = [m for m in models if m not in ratings]
    if missing:
        raise ValueError(f"bootstrap round {round_}: models {missing} are not in the resample; {advice}")
    return [ratings[m] for m in models]


def _check_confidence(confidence: float):
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must be between 0 and 1 (e.g. 0.95)")


def _wilson(score: float, games: int, z: float) -> Estimate:
    p = score / games
    center = (p + z**2 / (2 * games)) / (1 + z**2 / games)
    half = z / (1 + z**2 / games) * math.sqrt(p * (1 - p) / games + z**2 / (4 * games**2))
    return Estimate(p, center - half, center + half)
