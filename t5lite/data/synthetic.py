"""Synthetic seq2seq tasks whose exact-match accuracy shows within seconds that a model learns.

"reverse: 3 1 4 1" -> "1 4 1 3"; likewise "copy" and "sort". Sequences of 3 to 8 digits are
drawn from a seeded generator; a hash of the input decides the split, so no validation input
appears in training.
"""

from __future__ import annotations

import functools
import random
import zlib

OPERATIONS = {"copy": lambda digits: digits, "reverse": lambda digits: digits[::-1], "sort": sorted}
SPLIT_SIZES = {"train": 20_000, "validation": 500}
MIN_DIGITS, MAX_DIGITS = 3, 8
_VALIDATION_ONE_IN = 10


@functools.cache
def examples(operation: str, split: str) -> tuple[dict[str, str], ...]:
    """{"inputs", "targets"} records of `split`, the same on every machine."""
    if operation not in OPERATIONS:
        raise ValueError(f"Unknown synthetic operation {operation!r}. Allowed values: {', '.join(OPERATIONS)}.")
    rng, pairs = random.Random(f"t5lite-synthetic-{operation}"), []
    while len(pairs) < SPLIT_SIZES[split]:
        digits = [str(rng.randrange(10)) for _ in range(rng.randint(MIN_DIGITS, MAX_DIGITS))]
        inputs = f"{operation}: {' '.join(digits)}"
        if (zlib.crc32(inputs.encode()) % _VALIDATION_ONE_IN == 0) == (split == "validation"):
            pairs.append({"inputs": inputs, "targets": " ".join(OPERATIONS[operation](digits))})
    return tuple(pairs)
