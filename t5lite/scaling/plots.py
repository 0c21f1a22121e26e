"""PNG figures of a sweep: IsoFLOP profiles, optimal N and D against compute, Approach-3 contours.

Figures are built with `matplotlib.figure.Figure` and saved through its Agg canvas, never
pyplot, so plotting needs no display and leaves no global state behind.
"""

from __future__ import annotations

import pathlib

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from t5lite.scaling import fits
from t5lite.scaling.results import read_results


def plot_isoflops(path, N, C, L, fit: fits.AllocationFit, rtol: float = 0.05) -> pathlib.Path:
    """Loss against N for each budget, with Approach 2's parabolas and their minima."""
    labels, budgets = fits.group_budgets(C, rtol)
    N, L = np.asarray(N, float), np.asarray(L, float)
    fig = Figure(figsize=(7, 5))
    ax = fig.add_subplot()
    colors = colormaps["viridis"](np.linspace(0, 0.9, budgets.size))
    for i, (budget, color) in enumerate(zip(budgets, colors)):
        members = labels == i
        ax.scatter(N[members], L[members], color=color, s=18, label=f"C = {budget:.2g}")
        x = np.linspace(np.log(N[members].min()), np.log(N[members].max()), 100)
        ax.plot(np.exp(x), np.polyval(fit.parabolas[i], x), color=color, lw=1)
        ax.plot(fit.n_opt[i], np.polyval(fit.parabolas[i], np.log(fit.n_opt[i])), "x", color=color, ms=9, mew=2)
    ax.set(xscale="log", xlabel="parameters N", ylabel="final loss", title="IsoFLOP profiles (Approach 2)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_allocations(
    path,
    allocations: dict[str, fits.AllocationFit],
    law: fits.ChinchillaLaw | None = None,
    flops_per_param_token: float = 6.0,
) -> pathlib.Path:
    """Optimal N and D against C: each approach's optima and fitted power law, and Approach 3's closed form."""
    fig = Figure(figsize=(11, 4.5))
    axes = fig.subplots(1, 2)
    budgets = np.concatenate([fit.budgets for fit in allocations.values()])
    grid = np.logspace(np.log10(budgets.min()) - 0.5, np.log10(budgets.max()) + 0.5, 50)
    for ax, quantity in zip(axes, ("N", "D")):
        for (name, fit), marker in zip(allocations.items(), "os^v"):
            points, power_law = (fit.n_opt, fit.n_law) if quantity == "N" else (fit.d_opt, fit.d_law)
            (line,) = ax.plot(grid, power_law(grid), lw=1, label=f"{name}: exponent {power_law.exponent:.3f}")
            ax.scatter(fit.budgets, points, marker=marker, color=line.get_color())
        if law is not None:
            optimum = law.compute_optimal(grid, flops_per_param_token)[0 if quantity == "N" else 1]
            exponent = law.a if quantity == "N" else law.b
            ax.plot(grid, optimum, "k--", lw=1, label=f"approach3: exponent {exponent:.3f}")
        ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel=f"optimal {quantity}")
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_loss_contours(path, law: fits.ChinchillaLaw, N, D, flops_per_param_token: float = 6.0) -> pathlib.Path:
    """Approach 3's L(N, D) as contours over the runs, with the compute-efficient frontier."""
    N, D = np.asarray(N, float), np.asarray(D, float)
    n_grid = np.logspace(np.log10(N.min()) - 0.5, np.log10(N.max()) + 0.5, 200)
    d_grid = np.logspace(np.log10(D.min()) - 0.5, np.log10(D.max()) + 0.5, 200)
    fig = Figure(figsize=(7, 5.5))
    ax = fig.add_subplot()
    contours = ax.contourf(n_grid, d_grid, law.loss(n_grid[None, :], d_grid[:, None]), levels=20, cmap="viridis_r")
    fig.colorbar(contours, ax=ax, label="predicted loss")
    ax.scatter(N, D, s=10, color="white", edgecolor="black", lw=0.5, label="runs")
    compute = np.logspace(
        np.log10(flops_per_param_token * n_grid[0] * d_grid[0]),
        np.log10(flops_per_param_token * n_grid[-1] * d_grid[-1]),
        100,
    )
    n_opt, d_opt = law.compute_optimal(compute, flops_per_param_token)
    ax.plot(n_opt, d_opt, "r-", lw=2, label=f"efficient frontier: N ∝ C^{law.a:.2f}, D ∝ C^{law.b:.2f}")
    ax.set(
        xscale="log",
        yscale="log",
        xlim=(n_grid[0], n_grid[-1]),
        ylim=(d_grid[0], d_grid[-1]),
        xlabel="parameters N",
        ylabel="tokens D",
        title=f"L = {law.E:.3g} + {law.A:.3g}/N^{law.alpha:.3f} + {law.B:.3g}/D^{law.beta:.3f}",
    )
    ax.legend(fontsize=8, loc="upper right")
    return _save(fig, path)


def render_all(csv_path, out_dir, flops_per_param_token: float = 6.0, rtol: float = 0.05) -> list[pathlib.Path]:
    """Fits a results CSV and writes isoflops.png, allocations.png and loss_contours.png into `out_dir`."""
    results = read_results(csv_path)
    N, D, C, L = results.N, results.D, results.C, results.loss
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    approach2 = fits.approach2(N, D, C, L, rtol)
    law = fits.approach3(N, D, L)
    allocations = {"approach1": fits.approach1(N, D, C, L, rtol), "approach2": approach2}
    return [
        plot_isoflops(out_dir / "isoflops.png", N, C, L, approach2, rtol),
        plot_allocations(out_dir / "allocations.png", allocations, law, flops_per_param_token),
        plot_loss_contours(out_dir / "loss_contours.png", law, N, D, flops_per_param_token),
    ]


def _save(fig: Figure, path) -> pathlib.Path:
    path = pathlib.Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path
