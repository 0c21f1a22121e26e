"""T5 relative-position buckets, recast so a kernel needs neither gathers nor logs.

T5's bucket is a monotone step function of a clipped distance code `m` (below). A table lookup
`table[h, bucket(m)]` therefore equals a constant plus a sum of steps,
`sum_k [m >= T_k] * W[h, k]` with static thresholds `T_k` and per-head weights
`W[h, k] = table[h, hi_k] - table[h, lo_k]`. The constant drops out of the softmax, the steps are
one compare-select-add each in the kernel, and the gradient of `W` (a sum of `ds` per step) maps
back to the table through the same linear map, by ordinary autodiff outside the kernel.
"""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np


def _half_buckets(distance, num_buckets, max_distance):
    """Buckets of non-negative distances in float32 numpy, as Hugging Face computes them.

    Numpy rather than XLA: XLA turns the division by a constant into a multiply by its
    reciprocal, which moves some distances (e.g. 40 with 64 buckets, max_distance 50) across
    a bucket edge.
    """
    distance = np.asarray(distance, np.int64)
    max_exact = num_buckets // 2
    safe = np.maximum(distance, max_exact).astype(np.float32)
    large = max_exact + (
        np.log(safe / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).astype(np.int64)
    return np.where(distance < max_exact, distance, np.minimum(large, num_buckets - 1))


def relative_position_bucket(relative_position, *, bidirectional, num_buckets, max_distance):
    """Hugging Face T5's `_relative_position_bucket` (relative_position = key_pos - query_pos).

    Jittable: distances saturate at `max_distance`, so a lookup table of that length is exact.
    """
    relative_position = jnp.asarray(relative_position, jnp.int32)
    half = num_buckets // 2 if bidirectional else num_buckets
    _check_bucket_args(num_buckets, bidirectional, max_distance)
    lut = jnp.asarray(_half_buckets(np.arange(max_distance + 1), half, max_distance), jnp.int32)
    if bidirectional:
        distance = jnp.abs(relative_position)
        offset = jnp.where(relative_position > 0, half, 0)
    else:
        distance = jnp.maximum(-relative_position, 0)
        offset = 0
    return offset + lut[jnp.minimum(distance, max_distance)]


def _check_bucket_args(num_buckets, bidirectional, max_distance):
    half = num_buckets // 2 if bidirectional else num_buckets
    if half < 2 or max_distance <= half // 2:
        raise ValueError(
            f"relpos_bias needs num_buckets >= {4 if bidirectional else 2} and max_distance > "
            f"{half // 2} (half of the {'halved ' if bidirectional else ''}bucket count); got "
            f"num_buckets={num_buckets}, max_distance={max_distance}"
        )


@dataclasses.dataclass(frozen=True)
class RelposSteps:
    """Static description of the bucket function as steps over the distance code `m`.

    m = min(max(-d, 0), max_distance)                      unidirectional (d = key - query)
    m = min(|d|, max_distance) + (d > 0) * (max_distance + 1)   bidirectional
    """

    bidirectional: bool
    max_distance: int
    thresholds: tuple  # T_k, increasing
    lo: tuple  # bucket just below T_k
    hi: tuple  # bucket from T_k on

    def distance_code(self, d):
        """The integer code `m` for key-minus-query distances `d` (any shape, int32)."""
        if self.bidirectional:
            code = jnp.minimum(jnp.abs(d), self.max_distance)
            return jnp.where(d > 0, code + (self.max_distance + 1), code)
        return jnp.minimum(jnp.maximum(-d, 0), self.max_distance)

    def weights(self, table):
        """[H, num_buckets] table -> [H, K] step weights (linear, so autodiff gives d table)."""
        return table[:, list(self.hi)] - table[:, list(self.lo)]


def relpos_steps(num_buckets, bidirectional, max_distance):
    """Derive the steps by evaluating the exact bucket function on every code value."""
    _check_bucket_args(num_buckets, bidirectional, max_distance)
    span = np.arange(max_distance + 1)
    if bidirectional:
        # Codes 0..md are d = 0..-md; code md+1+c is d = c > 0 (code md+1 never occurs: reuse d = 1).
        distances = np.concatenate([-span, np.maximum(span, 1)])
    else:
        distances = -span
    half = num_buckets // 2 if bidirectional else num_buckets
    magnitude = np.abs(distances) if bidirectional else np.maximum(-distances, 0)
    buckets = np.where(distances > 0, half, 0) * bidirectional + _half_buckets(magnitude, half, max_distance)
    steps = [(m, int(buckets[m - 1]), int(buckets[m])) for m in range(1, len(buckets)) if buckets[m] != buckets[m - 1]]
    return RelposSteps(
        bidirectional=bool(bidirectional),
        max_distance=int(max_distance),
        thresholds=tuple(s[0] for s in steps),
        lo=tuple(s[1] for s in steps),
        hi=tuple(s[2] for s in steps),
    )
