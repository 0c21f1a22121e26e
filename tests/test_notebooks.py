"""The notebooks in experiments/notebooks run top to bottom on a CPU at their small sizes.

Each notebook ends by writing `results.json` into `$T5LITE_NOTEBOOK_OUT`; the tests check that
what it computed makes sense, not only that no cell raised.
"""

import json
import math
import os
import pathlib

import nbclient
import nbformat
import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "notebooks"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_notebook(name: str, tmp_path: pathlib.Path) -> tuple[dict, pathlib.Path]:
    """Executes the notebook in a fresh kernel of this Python (its "python3" kernel); returns its
    results.json and its output directory. A cell that raises fails the test."""
    out = tmp_path / "out"
    # T5LITE_CACHE (set by conftest) passes on, so the kernel reuses the corpus and vocabulary.
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "T5LITE_NOTEBOOK_SMALL": "1",
        "T5LITE_NOTEBOOK_OUT": str(out),
    }
    env.pop("XLA_FLAGS", None)  # one CPU device, as on a laptop, not conftest's 8 virtual ones
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        notebook, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute(env=env)
    return json.loads((out / "results.json").read_text()), out


def is_png(path: pathlib.Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_SIGNATURE


def test_notebooks_are_committed_without_outputs():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert code, path
        assert all(not cell.outputs and cell.execution_count is None for cell in code), f"{path} has outputs"


@pytest.mark.slow
def test_quickstart_trains_plots_and_generates(tmp_path):
    results, out = run_notebook("quickstart", tmp_path)
    assert results["steps"][-1] == 40
    losses = results["cross_entropy"]
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0] - 1.0, losses  # about 8.5 -> 6.5 nats/token
    assert is_png(out / "loss.png")
    assert (out / "llama_tiny_lm" / "checkpoints").is_dir()
    assert len(results["samples"]) == 2 and all(isinstance(text, str) for text in results["samples"])
    assert any(text.strip() for text in results["samples"]), results["samples"]


@pytest.mark.slow
def test_scaling_fits_the_committed_sweep(tmp_path):
    results, out = run_notebook("scaling", tmp_path)
    for name, (a, b) in results["exponents"].items():
        assert math.isfinite(a) and math.isfinite(b), name
        assert 0.0 < a < 1.5 and -0.5 < b < 1.5, (name, a, b)
        assert abs(a + b - 1.0) < 0.25, (name, a, b)  # N_opt · D_opt must grow about like C
    assert 0.0 < results["alpha"] < 3.0 and 0.0 < results["beta"] < 3.0
    assert abs(results["holdout_relative_error"]) < 0.01  # 8e12's best loss predicted from 2e12 and 4e12
    assert all(is_png(out / name) for name in results["pngs"]) and len(results["pngs"]) == 3


@pytest.mark.slow
def test_kernels_compares_pallas_with_xla(tmp_path):
    results, out = run_notebook("kernels", tmp_path)
    assert results["backend"] == "cpu" and results["interpret"]
    assert results["max_abs_error"]["output"] < 1e-5, results["max_abs_error"]
    assert results["max_abs_error"]["gradients"] < 1e-4, results["max_abs_error"]
    rows = results["rows"]
    assert {(row["impl"], row["pass"]) for row in rows} == {
        (impl, name) for impl in ("pallas", "xla") for name in ("forward", "forward+backward")
    }
    assert all(row["ms"] > 0 and row["scratch_mib"] >= 0 for row in rows)
    xla_forward = [row["scratch_mib"] for row in rows if row["impl"] == "xla" and row["pass"] == "forward"]
    assert xla_forward == sorted(xla_forward) and xla_forward[0] < xla_forward[-1]  # the scores grow with length
    assert is_png(out / "attention.png")
