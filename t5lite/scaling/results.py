"""The sweep results CSV: one row per finished run. The runner writes it; fits, plots and reports read it."""

from __future__ import annotations

import csv
import dataclasses
import pathlib

import numpy as np

# config: the run's name in the plan; N: parameters; D: training tokens; C: training FLOPs.
COLUMNS = ("config", "N", "D", "C", "loss")


@dataclasses.dataclass(frozen=True)
class Results:
    config: list[str]
    N: np.ndarray
    D: np.ndarray
    C: np.ndarray
    loss: np.ndarray


def read_results(path: str | pathlib.Path, loss_column: str = "loss") -> Results:
    """Reads the CSV; `loss_column` picks another loss column (e.g. a smoothed one) as `loss`."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No sweep results at {path}; run the sweep first or pass the right --csv.")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    wanted = ("config", "N", "D", "C", loss_column)
    missing = [c for c in wanted if rows and c not in rows[0]]
    if not rows or missing:
        raise ValueError(f"{path} has no runs or lacks columns {missing}; it needs a header with {', '.join(wanted)}.")
    numbers = {c: np.array([float(row[c]) for row in rows]) for c in ("N", "D", "C", loss_column)}
    return Results([row["config"] for row in rows], numbers["N"], numbers["D"], numbers["C"], numbers[loss_column])


def write_results(path: str | pathlib.Path, rows: list[dict]) -> None:
    """Writes rows holding at least `COLUMNS`; further keys become further columns."""
    if not rows:
        raise ValueError("No results to write.")
    extra = [k for k in rows[0] if k not in COLUMNS]
    with pathlib.Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*COLUMNS, *extra])
        writer.writeheader()
        writer.writerows(rows)
