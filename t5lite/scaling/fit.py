"""The public fitting API, `from t5lite.scaling import fit`: `fit.approach3(N, D, L)` and friends.

The implementations live in `t5lite.scaling.fits`; results index like dicts (`r["alpha"]`).
"""

from t5lite.scaling.fits import (
    AllocationFit,
    ChinchillaLaw,
    KaplanLaw,
    PowerLaw,
    approach1,
    approach2,
    approach3,
    fit_power_law,
    group_budgets,
    holdout_largest_budget,
    kaplan,
    summary,
)

__all__ = [
    "AllocationFit",
    "ChinchillaLaw",
    "KaplanLaw",
    "PowerLaw",
    "approach1",
    "approach2",
    "approach3",
    "fit_power_law",
    "group_budgets",
    "holdout_largest_budget",
    "kaplan",
    "summary",
]
