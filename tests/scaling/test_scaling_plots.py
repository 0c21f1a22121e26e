"""Plots render from a results CSV; the CSV reader rejects what it cannot use."""

import csv

import numpy as np
import pytest

from t5lite.scaling import plots
from t5lite.scaling.results import read_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_sweep_csv(path):
    rng = np.random.default_rng(0)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["config", "N", "D", "C", "loss", "smoothed_loss"])
        for budget in (1e17, 1e18, 1e19):
            for n in np.sqrt(budget / 120) * np.logspace(-0.6, 0.6, 5):
                d = budget / (6 * n)
                loss = (1.69 + 406.4 / n**0.34 + 410.7 / d**0.28) * np.exp(0.002 * rng.standard_normal())
                writer.writerow([f"run_{budget:.0e}_{n:.0f}", n, d, budget, loss, loss + 0.01])


def test_render_all_writes_non_empty_pngs(tmp_path):
    write_sweep_csv(tmp_path / "results.csv")
    paths = plots.render_all(tmp_path / "results.csv", tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["allocations.png", "isoflops.png", "loss_contours.png"]
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_read_results_picks_a_loss_column(tmp_path):
    write_sweep_csv(tmp_path / "results.csv")
    plain, smoothed = read_results(tmp_path / "results.csv"), read_results(tmp_path / "results.csv", "smoothed_loss")
    assert len(plain.config) == 15 and plain.N.shape == (15,)
    assert smoothed.loss == pytest.approx(plain.loss + 0.01)


def test_read_results_rejects_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="No sweep results"):
        read_results(tmp_path / "missing.csv")
    (tmp_path / "bad.csv").write_text("config,N,C,loss\na,1,2,3\n")
    with pytest.raises(ValueError, match=r"lacks columns \['D'\]"):
        read_results(tmp_path / "bad.csv")
    (tmp_path / "empty.csv").write_text("config,N,D,C,loss\n")
    with pytest.raises(ValueError, match="no runs"):
        read_results(tmp_path / "empty.csv")
