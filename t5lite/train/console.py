"""What a run tells the person watching it: how it started, checkpoints as they are saved, evaluations
as they happen, and a closing summary. Lines go above the progress bar (process 0 only); with
`train.progress = False` (`t5lite train --quiet`) both stay silent, for scripts that read the
metrics files instead."""

from __future__ import annotations

import pathlib
import time

import tqdm


class Console:
    def __init__(self, model_dir: pathlib.Path, enabled: bool):
        self.model_dir, self.enabled = model_dir, enabled
        self._began, self._first_step, self._evals = time.perf_counter(), 0, []

    def say(self, line: str) -> None:
        if self.enabled:
            tqdm.tqdm.write(line)

    def started(self, step: int, num_steps: int, checkpoint: pathlib.Path | None, shape: str) -> None:
        self._first_step = step
        if step >= num_steps:
            self.say(
                f"{self.model_dir} is at step {step} of train.num_steps={num_steps}: nothing to train "
                f"(raise train.num_steps to go on)."
            )
        elif checkpoint is not None:
            self.say(f"Resumed from step {step} (checkpoint {checkpoint}); training to step {num_steps}: {shape}.")
        else:
            self.say(f"Training {num_steps} steps into {self.model_dir}: {shape}.")

    def saved(self, step: int, checkpoint: pathlib.Path) -> None:
        self.say(f"step {step}: saved checkpoint {checkpoint}")

    def evaluated(self, step: int, results: dict[str, float]) -> None:
        self._evals.append((results["loss"], step))
        self.say(f"step {step}: eval " + ", ".join(f"{name} {value:.4g}" for name, value in results.items()))

    def finished(self, step: int, tokens_per_step: int, last: dict[str, float]) -> None:
        steps = step - self._first_step
        if not steps:
            return
        minutes = (time.perf_counter() - self._began) / 60
        lines = [f"Done: {steps} steps ({steps * tokens_per_step:,} tokens) in {minutes:.1f} min, now at step {step}."]
        if "loss" in last:
            lines.append(f"  final train loss {last['loss']:.4f}")
        if self._evals:
            loss, at = min(self._evals)
            lines.append(f"  best eval loss {loss:.4f} (step {at})")
        files = ", ".join(
            name
            for name in ("checkpoints/", "train_metrics.jsonl", "eval_metrics.jsonl", "tensorboard/")
            if (self.model_dir / name).exists()
        )
        lines.append(f"  in {self.model_dir}: {files}")
        for line in lines:
            self.say(line)
