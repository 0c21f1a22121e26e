"""Validation loss, perplexity and token accuracy of parameters on a run's validation split."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from t5lite.train.spec import RunSpec

VALIDATION_SEED = 0  # every run of a task is evaluated on the same validation examples


def evaluate(
    params,
    spec: RunSpec,
    eval_fn: Callable,
    num_batches: int,
    global_batch: Callable = dict,
    data_shard: tuple[int, int] = (0, 1),
) -> dict[str, float]:
    """Perplexity and token accuracy over the first `num_batches` validation batches of `spec`'s task.

    `eval_fn(params, batch)` returns the sums of one batch (`step.eval_step`); `global_batch` turns
    this process's rows (shard `data_shard`) into its input. In a multi-process run every process
    runs `num_batches` steps; one whose shard has run out feeds all-padding batches."""
    stream = spec.data_stream("validation", data_shard, shuffle=False, repeat=False, seed=VALIDATION_SEED)
    totals = {"loss_sum": 0.0, "correct": 0.0, "weight": 0.0}
    last = None
    for _ in range(num_batches):
        local = next(stream, None)
        if local is None and jax.process_count() == 1:
            break
        last = local if local is not None else {key: np.zeros_like(value) for key, value in last.items()}
        totals = {k: totals[k] + float(v) for k, v in jax.device_get(eval_fn(params, global_batch(last))).items()}
    if not totals["weight"]:
        raise ValueError(f"The validation split of {spec.mixture_or_task_name!r} gave no target tokens to evaluate on.")
    loss = totals["loss_sum"] / totals["weight"]
    return {
        "loss": loss,
        "perplexity": float(np.exp(min(loss, 50.0))),
        "accuracy": totals["correct"] / totals["weight"],
    }
