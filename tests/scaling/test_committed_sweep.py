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
