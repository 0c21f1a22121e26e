"""Where training numbers go: JSONL and TensorBoard in the model dir, and a terminal progress bar.

Throughput is derived on the host from step times; FLOPs come from `t5lite.scaling.flops`
(3 x forward matmul FLOPs, attention halved under a causal mask), so MFU here and in
sweeps is the same number.
"""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np


class MetricsWriter:
    """Appends one JSON object per logged step to `<model_dir>/<split>_metrics.jsonl` and mirrors
    scalars to TensorBoard under `<model_dir>/tensorboard/<split>`."""

    def __init__(self, model_dir: str | pathlib.Path, split: str = "train"):
        import tensorflow as tf

        self._tf = tf
        self.path = pathlib.Path(model_dir) / f"{split}_metrics.jsonl"
        self._summary = tf.summary.create_file_writer(str(pathlib.Path(model_dir) / "tensorboard" / split))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")
        with self._summary.as_default(step=int(step)):
            for name, value in scalars.items():
                self._tf.summary.scalar(name, float(value))
        self._summary.flush()


def read_metrics(path: str | pathlib.Path) -> list[dict]:
    """Logged rows in order; where a resumed run logged a step again, the later row wins."""
    by_step = {}
    for line in pathlib.Path(path).read_text().splitlines():
        row = json.loads(line)
        by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def measure_peak_flops(seconds: float = 0.5, size: int = 1024) -> float:
    """A float32 matmul's FLOP/s on the default device: the reference peak for MFU on a CPU."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        matmul(a).block_until_ready()
        runs += 1
    return 2 * size ** 3 * runs / (time.perf_counter() - start)


def summarize(window: list[dict], seconds: float, steps: int, flops_per_step: float, tokens_per_step: int,
              num_devices: int, peak_flops_per_device: float) -> dict[str, float]:
    """Means over the steps of a logging window, plus throughput over the `steps` of it that were
    timed (the first step of a run compiles and is not)."""
    means = {name: float(np.mean([m[name] for m in window])) for name in window[0] if name != "target_tokens"}
    means["perplexity"] = float(np.exp(min(means["loss"] - means["z_loss"], 50.0)))
    if not steps:
        return means
    step_time = seconds / steps
    flops_per_device = flops_per_step / step_time / num_devices
    return {**means, "step_time_s": step_time, "tokens_per_s": tokens_per_step / step_time,
            "target_tokens_per_s": float(np.mean([m["target_tokens"] for m in window])) / step_time,
            "tflops_per_device": flops_per_device / 1e12, "mfu": flops_per_device / peak_flops_per_device}
