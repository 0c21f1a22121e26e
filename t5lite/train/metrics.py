"""Where training numbers go: JSONL and TensorBoard in the model dir, and a terminal progress bar.

Throughput is derived on the host from step times; FLOPs come from `t5lite.models.flops`
(3 x forward matmul FLOPs, attention halved under a causal mask), so MFU here and in
sweeps is the same number.
"""

from __future__ import annotations

import json
import pathlib
import time

import jax
import numpy as np


class MetricsWriter:
    """Appends one JSON object per logged step to `<model_dir>/<split>_metrics.jsonl` and mirrors
    scalars to TensorBoard under `<model_dir>/tensorboard/<split>`. A run resumed from step
    `after_step` first drops the rows it will log again (those the interrupted run wrote after
    its last checkpoint), so no step appears twice."""

    def __init__(self, model_dir: str | pathlib.Path, split: str = "train", after_step: int = 0):
        import tensorflow as tf

        self._tf = tf
        self.path = pathlib.Path(model_dir) / f"{split}_metrics.jsonl"
        if self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if _step(line) <= after_step]
            staged = self.path.with_suffix(".tmp")
            staged.write_text("".join(line + "\n" for line in kept))
            staged.replace(self.path)
        self._summary = tf.summary.create_file_writer(str(pathlib.Path(model_dir) / "tensorboard" / split))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")
        with self._summary.as_default(step=int(step)):
            for name, value in scalars.items():
                self._tf.summary.scalar(name, float(value))
        self._summary.flush()


def _step(line: str) -> float:
    """The step of a logged row; a row cut short by a killed process counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError):
        return float("inf")


def read_metrics(path: str | pathlib.Path) -> list[dict]:
    """Logged rows in step order; where a file from an earlier t5lite holds a step twice (a resumed
    run logged it again), the later row."""
    by_step = {}
    for line in pathlib.Path(path).read_text().splitlines():
        row = json.loads(line)
        by_step[row["step"]] = row
    return [by_step[step] for step in sorted(by_step)]


def measure_peak_flops(seconds: float = 0.5, size: int = 1024) -> float:
    """A float32 matmul's FLOP/s on the default device: the reference peak for MFU on a CPU."""
    import jax.numpy as jnp

    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        matmul(a).block_until_ready()
        runs += 1
    return 2 * size**3 * runs / (time.perf_counter() - start)


# Steps dispatched before the oldest must finish: enough to hide the host's work, few enough that
# queued batches do not pile up in device memory. (With ~100 steps queued, XLA:CPU's virtual
# devices deadlocked in an all-reduce of the data-parallel step.)
MAX_STEPS_AHEAD = 2


class StepMetrics:
    """The metrics of the steps since the last log. They stay on the device until the loop logs or
    saves (`fetch`, which also stops a run whose loss is no longer finite); `summary` averages
    them and measures throughput over the steps after the first (which compiles)."""

    def __init__(self, flops_per_step: float, tokens_per_step: int, num_devices: int, peak_flops_per_device: float):
        self._throughput = (flops_per_step, tokens_per_step, num_devices, peak_flops_per_device)
        self._pending, self._window = [], []
        self._start, self._timed = None, 0

    def add(self, step: int, metrics: dict) -> None:
        self._pending.append((step, metrics))
        if len(self._pending) > MAX_STEPS_AHEAD:  # the host runs ahead of the devices by at most this much
            jax.block_until_ready(self._pending[-MAX_STEPS_AHEAD - 1][1])
        if self._start is None:  # leave compilation out of the timings
            jax.block_until_ready(metrics)
            self._start = time.perf_counter()
        else:
            self._timed += 1

    def fetch(self, last_checkpoint: int | None) -> None:
        fetched, self._pending = jax.device_get(self._pending), []
        for step, values in fetched:
            if not np.isfinite(values["loss"]):
                raise FloatingPointError(
                    f"The loss became {float(values['loss'])} at step {step}. Training stopped; the last good "
                    f"checkpoint is step {last_checkpoint}. Lower the learning rate or enable clipping "
                    f"(optimizer.clip_norm)."
                )
        self._window += [values for _, values in fetched]

    def summary(self) -> dict[str, float]:
        summary = summarize(self._window, time.perf_counter() - self._start, self._timed, *self._throughput)
        self._window, self._start, self._timed = [], time.perf_counter(), 0
        return summary


def summarize(
    window: list[dict],
    seconds: float,
    steps: int,
    flops_per_step: float,
    tokens_per_step: int,
    num_devices: int,
    peak_flops_per_device: float,
) -> dict[str, float]:
    """Means over the steps of a logging window, plus throughput over the `steps` of it that were
    timed (the first step of a run compiles and is not)."""
    means = {name: float(np.mean([m[name] for m in window])) for name in window[0] if name != "target_tokens"}
    means["perplexity"] = float(np.exp(min(means["loss"] - means["z_loss"], 50.0)))
    if not steps:
        return means
    step_time = seconds / steps
    flops_per_device = flops_per_step / step_time / num_devices
    return {
        **means,
        "step_time_s": step_time,
        "tokens_per_s": tokens_per_step / step_time,
        "target_tokens_per_s": float(np.mean([m["target_tokens"] for m in window])) / step_time,
        "tflops_per_device": flops_per_device / 1e12,
        "mfu": flops_per_device / peak_flops_per_device,
    }
