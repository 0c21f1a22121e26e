"""seqio metric functions: `(targets, predictions) -> {name: value}` over decoded strings."""

from __future__ import annotations

from collections.abc import Sequence


def exact_match(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Percentage of predictions equal to their target (ends stripped), as T5 reports accuracy."""
    if len(targets) != len(predictions):
        raise ValueError(f"Got {len(predictions)} predictions for {len(targets)} targets.")
    if not targets:
        raise ValueError("exact_match needs at least one example.")
    hits = sum(t.strip() == p.strip() for t, p in zip(targets, predictions))
    return {"exact_match": 100.0 * hits / len(targets)}


def sampled(samples: int, temperature: float):
    """Marks a metric that scores several samples per example (pass@k): evaluation then decodes
    `samples` outputs per example at `temperature` and passes, for each example, their list."""

    def mark(metric_fn):
        metric_fn.samples, metric_fn.temperature = samples, temperature
        return metric_fn

    return mark
