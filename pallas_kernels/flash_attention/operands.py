"""The optional per-call arrays the kernels read, in the padded kernel layout.

Query-side vectors are stored as columns `[B, T, 1]` and key-side ones as rows `[B, 1, S]`, so
a kernel block is already in the shape the tile math broadcasts with (a TPU block's last two
dims must be lane/sublane shaped; transposing a vector inside a kernel is not).
"""

import typing

import jax

Q_SIDE = ("q_pos", "q_seg")
KV_SIDE = ("kv_pos", "kv_seg")


class Operands(typing.NamedTuple):
    q_pos: jax.Array | None = None  # [B, T, 1] int32
    kv_pos: jax.Array | None = None  # [B, 1, S] int32
    q_seg: jax.Array | None = None  # [B, T, 1] int32
    kv_seg: jax.Array | None = None  # [B, 1, S] int32
    prefix: jax.Array | None = None  # [B] int32
    weights: jax.Array | None = None  # [H, K] float32, positional-bias weights (relpos steps, ALiBi)
    bias: jax.Array | None = None  # [B or 1, H or 1, T, S]

    def present(self, names):
        """(name, array) for each of `names` that this call has."""
        return [(n, getattr(self, n)) for n in names if getattr(self, n) is not None]
