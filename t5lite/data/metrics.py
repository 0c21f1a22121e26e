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
