"""Timing, table printing and CSV output shared by the benchmark scripts."""

import csv
import os
import statistics
import sys
import time

import jax

# Make `pallas_kernels` importable when a script runs from a checkout without an install.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from t5lite import hardware  # noqa: E402

# As the t5lite command does: without a TPU or GPU, the CPU alone (libtpu, when installed, logs an
# error where there is no TPU); subprocesses inherit it.
if "JAX_PLATFORMS" not in os.environ and hardware.no_accelerator_here():
    os.environ["JAX_PLATFORMS"] = "cpu"
    jax.config.update("jax_platforms", "cpu")


def on_accelerator():
    return jax.default_backend() in ("tpu", "gpu")


def device_description():
    d = jax.devices()[0]
    mode = "" if on_accelerator() else " (no accelerator: Pallas kernels run in INTERPRET mode, tiny sizes)"
    return f"{d.platform}:{d.device_kind}{mode}"


def time_call(fn, *args, repeats=5):
    """Median seconds per call of a jitted fn, after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def temp_bytes(fn, *args):
    """XLA's compiled scratch size: the peak memory a call needs beyond its inputs and outputs."""
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    return getattr(analysis, "temp_size_in_bytes", float("nan")) if analysis is not None else float("nan")


def report(rows, path):
    """Print rows (dicts with the same keys) as an aligned table and write them as CSV."""
    if not rows:
        return
    keys = list(rows[0])
    cells = [[_fmt(r[k]) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("  ".join(k.rjust(w) for k, w in zip(keys, widths)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths)))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
