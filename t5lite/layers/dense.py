"""A dense layer over several input and output axes, with logical axis names on its kernel."""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from pallas_kernels.int8_matmul import int8_dense


def fan_in_init(scale: float = 1.0, in_axes: int = 1):
    """Variance-scaling init over the first `in_axes` kernel axes (the contracted ones)."""
    return nn.initializers.variance_scaling(
        scale, "fan_in", "truncated_normal", in_axis=tuple(range(in_axes)), out_axis=-1)


class DenseGeneral(nn.Module):
    """Contracts the last `in_axes` axes of the input with a kernel of shape in + `features`.

    `kernel_axes` names every kernel axis (inputs first), e.g. ("embed", "heads", "kv").
    With `int8`, the forward quantises inputs (per row) and kernel (per output column) to int8 on
    the fly; gradients are the straight-through estimate, computed in `dtype`.
    """

    features: Sequence[int]
    kernel_axes: Sequence[str]
    in_axes: int = 1
    kernel_scale: float = 1.0
    int8: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        features = tuple(self.features)
        shape = x.shape[x.ndim - self.in_axes:] + features
        assert len(shape) == len(self.kernel_axes), (shape, self.kernel_axes)
        init = nn.with_logical_partitioning(fan_in_init(self.kernel_scale, self.in_axes), tuple(self.kernel_axes))
        kernel = self.param("kernel", init, shape, self.param_dtype)
        if self.int8:
            batch = x.shape[:x.ndim - self.in_axes]
            flat = (math.prod(shape[:self.in_axes]), math.prod(features))
            y = int8_dense(x.astype(self.dtype).reshape(*batch, flat[0]), kernel.reshape(flat),
                           backward_dtype=self.dtype)
            return y.reshape(*batch, *features)
        contract = (tuple(range(x.ndim - self.in_axes, x.ndim)), tuple(range(self.in_axes)))
        return lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
