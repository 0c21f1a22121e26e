"""The CPU sweep kept in experiments/chinchilla/: its report is what its CSV gives, approaches side by side."""

import pathlib
import re

import numpy as np

from t5lite.scaling import fits
from t5lite.scaling.results import read_results

SWEEP = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "chinchilla"


def test_committed_report_matches_its_csv():
    results = read_results(SWEEP / "results.csv")
    _, budgets = fits.group_budgets(results.C)
    assert budgets.size == 3 and len(results.config) == 15
    summary = fits.summary(results.N, results.D, results.C, results.loss)
    report = (SWEEP / "report.md").read_text()
    for approach in ("approach1", "approach2", "approach3"):
        row = re.search(rf"^\| {approach} \| ([-0-9.]+)[^|]* \| ([-0-9.]+)[^|]* \|$", report, re.MULTILINE)
        assert row, f"report.md has no row for {approach}"
        np.testing.assert_allclose(
            [float(row[1]), float(row[2])], [summary[approach]["a"], summary[approach]["b"]], atol=1.5e-3
        )
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (SWEEP / image).stat().st_size > 10_000, image


def test_the_small_cpu_spec_is_six_of_these_points_and_they_fit():
    """sweeps/small_cpu.gin plans six of the kept sweep's points (same shapes and steps, so the same
    runs); each budget's IsoFLOP profile curves upwards, so it has a minimum and every approach fits."""
    from t5lite.scaling import runner

    points = runner.make_plan(runner.load_spec("sweeps/small_cpu.gin"))
    results = read_results(SWEEP / "results.csv")
    rows = [results.config.index(point.name) for point in points]
    np.testing.assert_allclose(results.D[rows], [point.num_steps * point.tokens_per_step for point in points])
    N, D, C, loss = (np.asarray(x)[rows] for x in (results.N, results.D, results.C, results.loss))
    for budget in np.unique(np.round(C, -11)):
        at = np.round(C, -11) == budget
        assert at.sum() == 3 and np.polyfit(np.log(N[at]), loss[at], 2)[0] > 0, loss[at]
    summary = fits.summary(N, D, C, loss)
    assert all(np.isfinite(summary[name]["a"]) for name in ("approach1", "approach2", "approach3"))
