"""Where training numbers go: JSONL and TensorBoard in the model dir, and a terminal progress bar.

Throughput is derived on the host from step times; FLOPs come from `t5lite.models.flops`
(3 x forward matmul FLOPs, attention halved under a causal mask), so MFU here and in
sweeps is the same number.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
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
        row = json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n"
        with self.path.open("a") as f:  # one write per row: a crash leaves at most its last row cut short
            f.write(row)
        with self._summary.as_default(step=int(step)):
            for name, value in scalars.items():
                self._tf.summary.scalar(name, float(value))
        self._summary.flush()

    def sync(self) -> None:
        """Rows written so far reach the disk (called at checkpoints, so that they outlive a crash)."""
        if self.path.is_file():
            with self.path.open("rb+") as f:
                os.fsync(f.fileno())


def _step(line: str) -> float:
    """The step of a logged row; a row cut short by a killed process counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError):
        return float("inf")


def read_metrics(path: str | pathlib.Path) -> list[dict]:
    """Logged rows in step order; where a file from an earlier t5lite holds a step twice (a resumed
    run logged it again), the later row. A last row cut short (a crash, a full disk) is left out."""
    by_step = {}
    lines = pathlib.Path(path).read_text().splitlines(keepends=True)
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines) and not line.endswith("\n"):
                break
            raise ValueError(f"{path}:{number} is not a JSON row ({error}).") from None
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


# Steps in a row with a zero gradient norm after which a run is warned that it is not learning.
ZERO_GRADIENT_STEPS = 20
# Per-step values that say whether a step was usable, not what it measured (`overflow`: skipped by
# dynamic loss scaling).
GUARDS = ("finite", "params_finite", "target_tokens", "overflow")
# Per-step values that are a state of the run, not a measurement: a row logs the last step's.
LATEST = ("loss_scale", "loss_scale_overflows")


class StepMetrics:
    """The metrics of the steps since the last log. They stay on the device until the loop logs or
    saves (`fetch`, which also stops a run at a step whose loss, gradient norm or parameters are not
    finite, or after `skip_nonfinite` such steps in a row when the step skips them); `summary`
    averages the usable steps and measures throughput over the steps after the first (which compiles)."""

    def __init__(
        self,
        flops_per_step: float,
        tokens_per_step: int,
        num_devices: int,
        peak_flops_per_device: float,
        skip_nonfinite: int = 0,
    ):
        self._throughput = (flops_per_step, tokens_per_step, num_devices, peak_flops_per_device)
        self._pending, self._window = [], []
        self._start, self._timed = None, 0
        self._skip, self._bad_in_a_row, self._zero_gradients = skip_nonfinite, 0, 0

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
            self._check(step, values, last_checkpoint)
        self._window += [values for _, values in fetched]

    def _check(self, step: int, values: dict, last_checkpoint: int | None) -> None:
        self._zero_gradients = self._zero_gradients + 1 if values["grad_norm"] == 0 else 0
        if self._zero_gradients == ZERO_GRADIENT_STEPS:
            print(
                f"Warning: the gradient norm has been 0 for {ZERO_GRADIENT_STEPS} steps (to step {step}): the model "
                f"is not learning. A learning rate far too high saturates it; check train.learning_rate.",
                file=sys.stderr,
                flush=True,
            )
        if values["finite"]:
            self._bad_in_a_row = 0
            return
        self._bad_in_a_row += 1
        if self._bad_in_a_row <= self._skip:
            return
        if not np.isfinite(values["loss"]):
            what = f"the loss became {float(values['loss'])}"
        elif not np.isfinite(values["grad_norm"]):
            what = f"the gradient norm became {float(values['grad_norm'])}"
            if "loss_scale" in values:
                what += f" with the loss scale at {float(values['loss_scale']):g}"
        else:
            what = "the update made parameters non-finite"
        skipped = f" after skipping {self._skip} such steps in a row" if self._skip else ""
        raise FloatingPointError(
            f"At step {step} {what}{skipped}. Training stopped; nothing non-finite was saved: the last good "
            f"checkpoint is step {last_checkpoint}. Resume from it with a lower train.learning_rate, or set "
            f"train.skip_nonfinite_steps to skip rare bad steps; clipping (optimizer.clip_norm) needs a new run."
        )

    def summary(self) -> dict[str, float]:
        summary = summarize(self._window, time.perf_counter() - self._start, self._timed, *self._throughput)
        self._window, self._start, self._timed = [], time.perf_counter(), 0
        return summary


def _usable(step: dict) -> bool:
    """Whether a step updated the model (the others were skipped: non-finite, or overflowed)."""
    return bool(step.get("finite", True)) and not step.get("overflow", False)


def summarize(
    window: list[dict],
    seconds: float,
    steps: int,
    flops_per_step: float,
    tokens_per_step: int,
    num_devices: int,
    peak_flops_per_device: float,
) -> dict[str, float]:
    """Means over the usable steps of a logging window (`skipped_steps` counts the others, where there
    are or the run scales its loss), the last step's loss scale, plus throughput over the `steps` of it
    that were timed (the first step of a run compiles and is not)."""
    usable = [m for m in window if _usable(m)] or window
    means = {name: float(np.mean([m[name] for m in usable])) for name in window[0] if name not in GUARDS + LATEST}
    means.update({name: float(window[-1][name]) for name in LATEST if name in window[-1]})
    skipped = sum(not _usable(m) for m in window)
    if skipped or "overflow" in window[0]:  # always, with loss scaling
        means["skipped_steps"] = float(skipped)
    if "z_loss" in means:  # a language-modelling loss (an RL step's is a policy objective)
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
