"""experiments/benchmarks/device_check.sh, the accelerator check, end to end on the CPU: tiny sizes,
kernels interpreted, so that it is known to work before a GPU or TPU machine is lent."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_device_check_runs_every_part_and_writes_one_table(tmp_path):
    out = tmp_path / "device_check.md"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("JAX_PLATFORMS", None)  # the script picks the CPU itself on a machine without accelerators
    done = subprocess.run(
        ["bash", str(ROOT / "experiments/benchmarks/device_check.sh"), "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = out.read_text().splitlines()
    assert lines[0].startswith("device check on cpu") and "(tiny)" in lines[0]
    rows = [line.split(" | ") for line in lines if line.startswith("| ") and not line.startswith("| part")]
    parts = [row[0].lstrip("| ") for row in rows]
    assert {"kernels", "attention", "int8", "train"} <= set(parts), parts
    kernel_rows = [row for row in rows if row[0] == "| kernels"]
    assert len(kernel_rows) >= 4 and all(row[-1].rstrip(" |") == "pass" for row in kernel_rows), kernel_rows
    assert any("flash_attention" in row[1] for row in kernel_rows) and any("int8" in row[1] for row in kernel_rows)
    assert "MFU" in next(row[2] for row in rows if row[0] == "| train")
    assert "ERROR" not in out.read_text() and "libtpu" not in done.stderr
