"""Scaling-law fits of final losses: Hoffmann et al.'s (2022) three approaches and Kaplan-style laws.

Pure numpy/scipy, so fits run wherever the results CSV is. All inputs are 1-D arrays of
positive numbers: N parameters, D training tokens, C training FLOPs, L final losses.
Compute-optimal allocations assume C = k·N·D with k = 6 by default; an encoder-decoder
whose D counts encoder plus decoder tokens has k ≈ 3 (see `t5lite.models.flops`).
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings

import numpy as np
from scipy import optimize

HUBER_DELTA = 1e-3
# Hoffmann et al.'s initialisation grid: exponents 0..2, log coefficients 0..25, log E -1..1.
_EXPONENT_GRID = np.arange(0.0, 2.01, 0.5)
_LOG_COEFFICIENT_GRID = np.arange(0.0, 25.1, 5.0)
_LOG_E_GRID = np.arange(-1.0, 1.01, 0.5)


@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """y = coefficient · x^exponent, fitted by least squares in log-log space."""

    coefficient: float
    exponent: float

    def __call__(self, x):
        return self.coefficient * np.asarray(x, float) ** self.exponent


@dataclasses.dataclass(frozen=True)
class AllocationFit:
    """Approaches 1 and 2: the compute-optimal N and D of each budget, and power laws through them."""

    budgets: np.ndarray
    n_opt: np.ndarray
    d_opt: np.ndarray
    n_law: PowerLaw  # N_opt = n_law(C); its exponent is Hoffmann's a
    d_law: PowerLaw  # D_opt = d_law(C); its exponent is b
    # Approach 2 only: per budget, loss = p[0]·x² + p[1]·x + p[2] with x = ln N.
    parabolas: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class ChinchillaLaw:
    """L(N, D) = E + A/N^alpha + B/D^beta, with bootstrap intervals when they were asked for."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    # name -> (low, high) for E, A, B, alpha, beta, a and b.
    intervals: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)

    def __getitem__(self, name: str) -> float:
        """r["E"], r["alpha"], ...: the issue's dict-style access."""
        return getattr(self, name)

    def loss(self, N, D):
        return self.E + self.A / np.asarray(N, float) ** self.alpha + self.B / np.asarray(D, float) ** self.beta

    @property
    def a(self) -> float:
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    def compute_optimal(self, C, flops_per_param_token: float = 6.0):
        """(N_opt, D_opt) minimising L subject to C = k·N·D: N_opt = G·(C/k)^a, D_opt = (C/k)^b / G."""
        _positive("C", C)
        budget = np.asarray(C, float) / flops_per_param_token
        return self.G * budget**self.a, budget**self.b / self.G

    def tokens_per_parameter(self, C, flops_per_param_token: float = 6.0):
        n_opt, d_opt = self.compute_optimal(C, flops_per_param_token)
        return d_opt / n_opt

    def as_dict(self) -> dict:
        return {
            "E": self.E,
            "A": self.A,
            "B": self.B,
            "alpha": self.alpha,
            "beta": self.beta,
            "a": self.a,
            "b": self.b,
            "G": self.G,
            "intervals": {k: list(v) for k, v in self.intervals.items()},
        }


@dataclasses.dataclass(frozen=True)
class KaplanLaw:
    """L(x) = L_inf + (x0/x)^alpha for one of x = N, D or C."""

    L_inf: float
    x0: float
    alpha: float

    def __call__(self, x):
        return self.L_inf + (self.x0 / np.asarray(x, float)) ** self.alpha


def group_budgets(C, rtol: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """(budget index of each point, budget values): runs whose C are within `rtol` of their
    neighbour share a budget, so measured FLOPs that differ by rounding still form one profile."""
    C = _positive("C", C)
    order = np.argsort(C)
    starts_new = np.diff(np.log(C[order])) > np.log1p(rtol)
    labels = np.empty(C.size, int)
    labels[order] = np.concatenate([[0], np.cumsum(starts_new)])
    budgets = np.array([np.exp(np.mean(np.log(C[labels == i]))) for i in range(labels.max() + 1)])
    return labels, budgets


def fit_power_law(x, y) -> PowerLaw:
    x, y = _positive("x", x), _positive("y", y)
    if np.unique(x).size < 2:
        raise ValueError(
            f"A power law needs points at two or more distinct x (compute budgets); got {np.unique(x).size}."
        )
    exponent, log_coefficient = np.polyfit(np.log(x), np.log(y), 1)
    return PowerLaw(float(np.exp(log_coefficient)), float(exponent))


def approach1(N, D, C, L, rtol: float = 0.05) -> AllocationFit:
    """Hoffmann et al.'s Approach 1 on final losses: each budget's lowest-loss run is its optimum."""
    N, D, C, L = _columns(N=N, D=D, C=C, L=L)
    labels, budgets = group_budgets(C, rtol)
    best = np.array([np.flatnonzero(labels == i)[np.argmin(L[labels == i])] for i in range(budgets.size)])
    return AllocationFit(budgets, N[best], D[best], fit_power_law(budgets, N[best]), fit_power_law(budgets, D[best]))


def approach2(N, D, C, L, rtol: float = 0.05) -> AllocationFit:
    """Approach 2: a parabola in ln N through each IsoFLOP profile; its vertex is N_opt.

    D_opt comes from the profile's own N-D relation (a line in log-log space), so measured
    token counts are used rather than an assumed C = 6·N·D.
    """
    N, D, C, L = _columns(N=N, D=D, C=C, L=L)
    labels, budgets = group_budgets(C, rtol)
    parabolas, n_opt, d_opt = [], [], []
    for i, budget in enumerate(budgets):
        members = labels == i
        if np.unique(N[members]).size < 3:
            raise ValueError(
                f"The IsoFLOP profile at C={budget:.3g} has {np.unique(N[members]).size} distinct "
                "model sizes; a parabola needs at least 3."
            )
        x = np.log(N[members])
        p = np.polyfit(x, L[members], 2)
        if p[0] <= 0:
            raise ValueError(
                f"The IsoFLOP profile at C={budget:.3g} curves downwards, so it has no minimum: "
                "its sizes do not bracket the optimum; add smaller and larger models."
            )
        vertex = -p[1] / (2 * p[0])
        slope, intercept = np.polyfit(x, np.log(D[members]), 1)
        parabolas.append(p)
        n_opt.append(np.exp(vertex))
        d_opt.append(np.exp(intercept + slope * vertex))
    n_opt, d_opt = np.array(n_opt), np.array(d_opt)
    return AllocationFit(
        budgets, n_opt, d_opt, fit_power_law(budgets, n_opt), fit_power_law(budgets, d_opt), np.array(parabolas)
    )


def approach3(
    N,
    D,
    L,
    *,
    exclude_highest: int = 0,
    delta: float = HUBER_DELTA,
    starts: int | None = 32,
    bootstrap: int = 0,
    confidence: float = 0.95,
    seed: int = 0,
) -> ChinchillaLaw:
    """Approach 3: fit L(N, D) = E + A/N^alpha + B/D^beta as Hoffmann et al. did.

    Minimises the Huber loss (`delta`) of log L against LSE(a - alpha ln N, b - beta ln D, e)
    with A, B, E = exp(a), exp(b), exp(e), by BFGS from Hoffmann et al.'s grid of 4500 starting
    points; `starts` keeps the best 32 of them by objective (None: all; minutes instead of ~1 s).
    `exclude_highest` drops that many highest-loss points first (Epoch AI drop 5 of Figure 4's).
    `bootstrap` > 0 refits that many resamples of the points and reports percentile intervals.
    """
    N, D, L = _columns(N=N, D=D, L=L)
    if exclude_highest:
        keep = np.sort(np.argsort(L)[:-exclude_highest])
        N, D, L = N[keep], D[keep], L[keep]
    theta = _fit_lse(np.log(L), [np.log(N), np.log(D)], delta, starts)
    law = _chinchilla(theta)
    if not bootstrap:
        return law
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(bootstrap):
        idx = rng.integers(0, L.size, L.size)
        # Resamples are close to the full sample, so its optimum starts each refit in the right basin.
        sample = _chinchilla(_fit_lse(np.log(L[idx]), [np.log(N[idx]), np.log(D[idx])], delta, starts=[theta]))
        draws.append([sample.E, sample.A, sample.B, sample.alpha, sample.beta, sample.a, sample.b])
    tail = 50 * (1 - confidence)
    low, high = np.percentile(np.array(draws), [tail, 100 - tail], axis=0)
    names = ("E", "A", "B", "alpha", "beta", "a", "b")
    return dataclasses.replace(law, intervals={k: (float(lo), float(hi)) for k, lo, hi in zip(names, low, high)})


def kaplan(x, L, *, delta: float = HUBER_DELTA, starts: int | None = 32) -> KaplanLaw:
    """Kaplan-style L(x) = L_inf + (x0/x)^alpha, fitted like Approach 3 with a single term."""
    x, L = _columns(x=x, L=L)
    e, c, alpha = _fit_lse(np.log(L), [np.log(x)], delta, starts)
    return KaplanLaw(float(np.exp(e)), float(np.exp(c / alpha)), float(alpha))


def holdout_largest_budget(N, D, C, L, rtol: float = 0.05, **approach3_kwargs) -> dict[str, float]:
    """Predictable scaling: fit Approach 3 without the largest budget and predict its best run's loss."""
    N, D, C, L = _columns(N=N, D=D, C=C, L=L)
    labels, budgets = group_budgets(C, rtol)
    if budgets.size < 2:
        raise ValueError("Holding out the largest budget needs at least two budgets.")
    held = labels == budgets.size - 1
    law = approach3(N[~held], D[~held], L[~held], **approach3_kwargs)
    best = np.flatnonzero(held)[np.argmin(L[held])]
    predicted = float(law.loss(N[best], D[best]))
    return {
        "budget": float(budgets[-1]),
        "N": float(N[best]),
        "D": float(D[best]),
        "actual_loss": float(L[best]),
        "predicted_loss": predicted,
        "relative_error": predicted / float(L[best]) - 1.0,
    }


def summary(N, D, C, L, *, bootstrap: int = 0, rtol: float = 0.05) -> dict:
    """Every fit of a sweep as plain numbers (JSON-ready): what `t5lite sweep fit` prints."""
    law = approach3(N, D, L, bootstrap=bootstrap)
    allocations = {"approach1": approach1(N, D, C, L, rtol), "approach2": approach2(N, D, C, L, rtol)}
    out = {
        name: {
            "a": fit.n_law.exponent,
            "b": fit.d_law.exponent,
            "budgets": fit.budgets.tolist(),
            "n_opt": fit.n_opt.tolist(),
            "d_opt": fit.d_opt.tolist(),
        }
        for name, fit in allocations.items()
    }
    out["approach3"] = law.as_dict()
    out["kaplan"] = {name: dataclasses.asdict(kaplan(x, L)) for name, x in (("N", N), ("D", D), ("C", C))}
    if group_budgets(C, rtol)[1].size > 2:
        out["holdout_largest_budget"] = holdout_largest_budget(N, D, C, L, rtol)
    return out


def _chinchilla(theta: np.ndarray) -> ChinchillaLaw:
    """A degenerate bootstrap resample may fit a coefficient beyond float range: it is inf, not a warning."""
    e, a, alpha, b, beta = theta
    with np.errstate(over="ignore"):
        return ChinchillaLaw(float(np.exp(e)), float(np.exp(a)), float(np.exp(b)), float(alpha), float(beta))


def _fit_lse(y: np.ndarray, log_xs: list[np.ndarray], delta: float, starts) -> np.ndarray:
    """Minimises sum Huber(LSE(e, c_i - alpha_i·log_x_i) - y) over theta = [e, c_1, alpha_1, c_2, ...].

    `starts`: explicit starting points, or how many of the best grid points (by objective) to
    descend from (None: all of them, Hoffmann et al.'s full procedure, some minutes).
    """
    if isinstance(starts, int) or starts is None:
        grid = np.array(list(itertools.product(_LOG_E_GRID, *[_LOG_COEFFICIENT_GRID, _EXPONENT_GRID] * len(log_xs))))
        values = np.array([_huber_lse(theta, y, log_xs, delta)[0] for theta in grid])
        starts = grid[np.argsort(values)[:starts]]
    best = None
    with warnings.catch_warnings():
        # Huber's kink stops line searches short of gtol ("precision loss") at converged points.
        warnings.simplefilter("ignore", optimize.OptimizeWarning)
        for theta in starts:
            # BFGS, not L-BFGS: with 3-5 parameters the limited memory buys nothing, and scipy's
            # L-BFGS-B core calls threaded BLAS that made it 10-30x slower on a busy CPU.
            result = optimize.minimize(
                _huber_lse, theta, args=(y, log_xs, delta), jac=True, method="BFGS", options={"gtol": 1e-9}
            )
            if np.isfinite(result.fun) and (best is None or result.fun < best.fun):
                best = result
    if best is None:
        raise ValueError("The scaling-law fit diverged from every starting point; check the data for outliers.")
    return best.x


def _huber_lse(theta: np.ndarray, y: np.ndarray, log_xs: list[np.ndarray], delta: float):
    """Objective and gradient of `_fit_lse`."""
    terms = np.empty((1 + len(log_xs), y.size))
    terms[0] = theta[0]
    for i, log_x in enumerate(log_xs):
        terms[i + 1] = theta[1 + 2 * i] - theta[2 + 2 * i] * log_x
    top = terms.max(axis=0)
    prediction = top + np.log(np.exp(terms - top).sum(axis=0))  # log-sum-exp, without scipy's per-call overhead
    residual = prediction - y
    abs_residual = np.abs(residual)
    value = np.where(abs_residual <= delta, 0.5 * residual**2, delta * (abs_residual - 0.5 * delta)).sum()
    # d prediction / d term_i is term i's softmax weight.
    weighted = np.exp(terms - prediction) * np.clip(residual, -delta, delta)
    grad = np.empty_like(theta)
    grad[0] = weighted[0].sum()
    for i, log_x in enumerate(log_xs):
        grad[1 + 2 * i] = weighted[i + 1].sum()
        grad[2 + 2 * i] = -weighted[i + 1] @ log_x
    return value, grad


def _columns(**columns) -> list[np.ndarray]:
    arrays = [_positive(name, values) for name, values in columns.items()]
    if len({a.size for a in arrays}) > 1:
        raise ValueError("Columns differ in length: " + ", ".join(f"{k}={a.size}" for k, a in zip(columns, arrays)))
    return arrays


def _positive(name: str, values) -> np.ndarray:
    array = np.atleast_1d(np.asarray(values, float))
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of numbers; got shape {array.shape}.")
    if not np.all(np.isfinite(array) & (array > 0)):
        raise ValueError(f"{name} must be finite and positive; got {array[~(np.isfinite(array) & (array > 0))][:5]}.")
    return array
