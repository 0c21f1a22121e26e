"""`t5lite sweep plan|run|fit|report`: the command line of a scaling study.

fit and report need only numpy/scipy/matplotlib; plan and run import the training stack.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

from t5lite.scaling import fits, plots
from t5lite.scaling.results import Results, read_results

MIN_BUDGETS = 2
MIN_SIZES_PER_BUDGET = 3  # Approach 2's parabola


def add_sweep_commands(subparsers) -> None:
    """Adds `sweep` with its four subcommands to the CLI's argparse subparsers."""
    sweep = subparsers.add_parser(
        "sweep", help="Plan, run, fit and report IsoFLOP compute sweeps.", description=__doc__
    )
    commands = sweep.add_subparsers(dest="sweep_command", required=True)
    p = commands.add_parser("plan", help=plan.__doc__, description=plan.__doc__)
    p.add_argument(
        "--spec",
        required=True,
        help="a sweep gin file binding SweepSpec, e.g. sweeps/tiny_cpu.gin; "
        "--gin.SweepSpec.NAME=VALUE overrides its bindings",
    )
    p.add_argument("--sweep_dir", required=True)
    p.set_defaults(run=plan, gin_bindings=[])
    p = commands.add_parser("run", help=run.__doc__, description=run.__doc__)
    p.add_argument("--sweep_dir", required=True)
    p.set_defaults(run=run)
    for name, function in (("fit", fit), ("report", report)):
        p = commands.add_parser(name, help=function.__doc__, description=function.__doc__)
        p.add_argument("--sweep_dir", help="a sweep dir; its results.csv is read and (report) written into")
        p.add_argument("--csv", help="a results CSV (default: <sweep_dir>/results.csv)")
        p.add_argument("--loss_column", default="loss", help="e.g. train_loss for the smoothed training loss")
        p.add_argument("--bootstrap", type=int, default=0, help="bootstrap resamples for Approach 3's intervals")
        p.set_defaults(run=function)
        if name == "report":
            p.add_argument(
                "--out_dir", help="where the PNGs and report.md go (default: the sweep dir, else the CSV's dir)"
            )


def plan(args: argparse.Namespace) -> None:
    """Writes a sweep's plan: a gin file per IsoFLOP point, plan.json/plan.csv and commands.sh."""
    from t5lite.scaling import runner

    points = runner.write_plan(runner.load_spec(args.spec, args.gin_bindings), args.sweep_dir)
    for p in points:
        print(
            f"{p.name}: d_model={p.config.d_model}, layers={p.config.num_decoder_layers}, {p.num_steps} steps, "
            f"{p.tokens:.3g} tokens, {p.flops:.3g} FLOPs"
        )
    print(f"{len(points)} points in {args.sweep_dir}; launch commands in {args.sweep_dir}/commands.sh")


def run(args: argparse.Namespace) -> None:
    """Trains a planned sweep's points here, one after another; finished points are skipped, interrupted ones resume."""
    from t5lite.scaling import runner

    runner.run(args.sweep_dir)


def fit(args: argparse.Namespace) -> None:
    """Prints the three approaches' fits (and Kaplan's laws) of a results CSV as JSON."""
    print(json.dumps(_summary(load_results(args), args.bootstrap), indent=2))


def report(args: argparse.Namespace) -> None:
    """Writes the plots and report.md (fitted constants side by side, the runs) for a results CSV."""
    results = load_results(args)
    summary = _summary(results, args.bootstrap)  # fails on unfittable data before anything is written
    csv_path = _csv_path(args)
    out_dir = pathlib.Path(args.out_dir or args.sweep_dir or csv_path.parent)
    images = plots.render_all(csv_path, out_dir)
    path = out_dir / "report.md"
    path.write_text(markdown_report(results, summary, [i.name for i in images], csv_path))
    print(f"Wrote {path} and {', '.join(i.name for i in images)}")


def load_results(args: argparse.Namespace) -> Results:
    """The results CSV the arguments name, refused when it has too few runs to fit."""
    results = read_results(_csv_path(args), args.loss_column)
    labels, budgets = fits.group_budgets(results.C)
    sizes = [np.unique(results.N[labels == i]).size for i in range(budgets.size)]
    if budgets.size < MIN_BUDGETS or min(sizes) < MIN_SIZES_PER_BUDGET:
        raise ValueError(
            f"{_csv_path(args)} has {len(results.config)} runs in {budgets.size} budget(s) with "
            f"{sizes} model sizes; fitting needs at least {MIN_BUDGETS} budgets with "
            f"{MIN_SIZES_PER_BUDGET} sizes each. Run more of the sweep first."
        )
    return results


def markdown_report(results: Results, summary: dict, images: list[str], source) -> str:
    """report.md: the exponents of every approach side by side, Approach 3's law, the plots and the runs."""
    law = summary["approach3"]
    interval = lambda k: (
        f" [{law['intervals'][k][0]:.4g}, {law['intervals'][k][1]:.4g}]"  # noqa: E731
        if k in law["intervals"]
        else ""
    )
    lines = [
        "# Scaling sweep report",
        "",
        f"{len(results.config)} runs from `{source}`.",
        "",
        "## Compute-optimal exponents (N_opt ∝ C^a, D_opt ∝ C^b)",
        "",
        "| approach | a | b |",
        "| --- | --- | --- |",
        *(
            f"| {name} | {summary[name]['a']:.3f}{interval('a') if name == 'approach3' else ''} | "
            f"{summary[name]['b']:.3f}{interval('b') if name == 'approach3' else ''} |"
            for name in ("approach1", "approach2", "approach3")
        ),
        "",
        "## Approach 3: L(N, D) = E + A/N^α + B/D^β",
        "",
        "| constant | value |",
        "| --- | --- |",
        *(
            f"| {k} | {law[key]:.4g}{interval(key)} |"
            for k, key in (("E", "E"), ("A", "A"), ("B", "B"), ("α", "alpha"), ("β", "beta"), ("G", "G"))
        ),
        "",
        "## Kaplan-style laws L(x) = L_inf + (x0/x)^α_x",
        "",
        "| x | L_inf | x0 | α_x |",
        "| --- | --- | --- | --- |",
        *(f"| {x} | {k['L_inf']:.4g} | {k['x0']:.4g} | {k['alpha']:.4g} |" for x, k in summary["kaplan"].items()),
    ]
    if "holdout_largest_budget" in summary:
        h = summary["holdout_largest_budget"]
        lines += [
            "",
            f"Predictable scaling: fitted without the largest budget (C = {h['budget']:.3g}), Approach 3 "
            f"predicts its best run's loss as {h['predicted_loss']:.4f} against {h['actual_loss']:.4f} "
            f"measured ({h['relative_error']:+.2%}).",
        ]
    lines += [
        "",
        "## Plots",
        "",
        *(f"![{name}]({name})" for name in images),
        "",
        "## Runs",
        "",
        "| config | N | D | C | loss |",
        "| --- | --- | --- | --- | --- |",
        *(
            f"| {c} | {n:.4g} | {d:.4g} | {f:.4g} | {l:.4f} |"
            for c, n, d, f, l in zip(results.config, results.N, results.D, results.C, results.loss)
        ),
    ]
    return "\n".join(lines) + "\n"


def _summary(results: Results, bootstrap: int) -> dict:
    return fits.summary(results.N, results.D, results.C, results.loss, bootstrap=bootstrap)


def _csv_path(args: argparse.Namespace) -> pathlib.Path:
    if not (args.csv or args.sweep_dir):
        raise ValueError("Pass --sweep_dir (reads its results.csv) or --csv FILE.")
    return pathlib.Path(args.csv) if args.csv else pathlib.Path(args.sweep_dir) / "results.csv"
