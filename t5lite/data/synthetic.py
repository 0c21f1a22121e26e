"""Synthetic seq2seq tasks whose exact-match accuracy shows within seconds that a model learns.

"reverse: 3 1 4 1" -> "1 4 1 3"; likewise "copy" and "sort". Sequences of 3 to 8 digits are
drawn from a seeded generator; a hash of the input decides the split, so no validation input
appears in training.
"""

from __future__ import annotations

import functools
import random
import zlib

import seqio
import tensorflow as tf

OPERATIONS = {"copy": lambda digits: digits, "reverse": lambda digits: digits[::-1], "sort": sorted}
SPLIT_SIZES = {"train": 20_000, "validation": 500}
MIN_DIGITS, MAX_DIGITS = 3, 8
_VALIDATION_ONE_IN = 10


@functools.lru_cache(maxsize=None)
def examples(operation: str, split: str) -> tuple[tuple[str, str], ...]:
    """(inputs, targets) pairs of `split`, the same on every machine."""
    if operation not in OPERATIONS:
        raise ValueError(f"Unknown synthetic operation {operation!r}. Allowed values: {', '.join(OPERATIONS)}.")
    rng, pairs = random.Random(f"t5lite-synthetic-{operation}"), []
    while len(pairs) < SPLIT_SIZES[split]:
        digits = [str(rng.randrange(10)) for _ in range(rng.randint(MIN_DIGITS, MAX_DIGITS))]
        inputs = f"{operation}: {' '.join(digits)}"
        if (zlib.crc32(inputs.encode()) % _VALIDATION_ONE_IN == 0) == (split == "validation"):
            pairs.append((inputs, " ".join(OPERATIONS[operation](digits))))
    return tuple(pairs)


class SyntheticSource(seqio.DataSource):
    """{"inputs", "targets"} strings of one operation; the Task shuffles them."""

    def __init__(self, operation: str):
        if operation not in OPERATIONS:
            raise ValueError(f"Unknown synthetic operation {operation!r}. Allowed values: {', '.join(OPERATIONS)}.")
        self._operation = operation
        super().__init__(splits=tuple(SPLIT_SIZES), num_input_examples=SPLIT_SIZES)

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return False

    def list_shards(self, split: str) -> list[str]:
        return [split]

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                    shard_info: seqio.ShardInfo | None = None, *, sequence_length=None, use_cached=False,
                    num_epochs=1) -> tf.data.Dataset:
        inputs, targets = zip(*examples(self._operation, split))
        dataset = tf.data.Dataset.from_tensor_slices({"inputs": list(inputs), "targets": list(targets)})
        return dataset.shard(shard_info.num_shards, shard_info.index) if shard_info else dataset
