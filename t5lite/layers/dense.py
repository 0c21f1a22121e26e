"""A dense layer over several input and output axes, with logical axis names on its kernel."""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from pallas_kernels.int8_matmul import int8_dense, quantize_over, weight_only_dense


def fan_in_init(scale: float = 1.0, in_axes: int = 1):
    """Variance-scaling init over the first `in_axes` kernel axes (the contracted ones)."""
    return nn.initializers.variance_scaling(
        scale, "fan_in", "truncated_normal", in_axis=tuple(range(in_axes)), out_axis=-1)


class DenseGeneral(nn.Module):
    """Contracts the last `in_axes` axes of the input with a kernel of shape in + `features`.

    `kernel_axes` names every kernel axis (inputs first), e.g. ("embed", "heads", "kv").
    With `int8`, the forward quantises inputs (per row) and kernel (per output column) to int8 on
    the fly; gradients are the straight-through estimate, computed in `dtype`.
    With `int8_weights`, the kernel is stored in int8 with `kernel_scale` (size 1 over the input
    axes, one float32 scale per output feature) and the forward is `weight_only_dense`.
    Initialised as the quantised float init.
    """

    features: Sequence[int]
    kernel_axes: Sequence[str]
    in_axes: int = 1
    kernel_scale: float = 1.0
    int8: bool = False
    int8_weights: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        features = tuple(self.features)
        batch, inputs = x.shape[:x.ndim - self.in_axes], x.shape[x.ndim - self.in_axes:]
        shape = inputs + features
        assert len(shape) == len(self.kernel_axes), (shape, self.kernel_axes)
        x = x.astype(self.dtype)
        # The int8 paths take the kernel as a [K, N] matrix and x as [..., K].
        flat = (math.prod(inputs), math.prod(features))
        to_features = lambda y: y.reshape(*batch, *features)  # noqa: E731
        if self.int8_weights:
            kernel, scale = self._int8_kernel(shape)
            return to_features(weight_only_dense(x.reshape(*batch, flat[0]), kernel.reshape(flat),
                                               scale.reshape(1, flat[1])))
        init = nn.with_logical_partitioning(fan_in_init(self.kernel_scale, self.in_axes), tuple(self.kernel_axes))
        kernel = self.param("kernel", init, shape, self.param_dtype)
        if self.int8:
            return to_features(int8_dense(x.reshape(*batch, flat[0]), kernel.reshape(flat), backward_dtype=self.dtype))
        contract = (tuple(range(x.ndim - self.in_axes, x.ndim)), tuple(range(self.in_axes)))
        return lax.dot_general(x, kernel.astype(self.dtype), (contract, ((), ())))

    def _int8_kernel(self, shape):
        quantized = scale = None
        if self.is_initializing():
            init = fan_in_init(self.kernel_scale, self.in_axes)(self.make_rng("params"), shape, jnp.float32)
            quantized, scale = quantize_over(init, range(self.in_axes))
        scale_axes = (None,) * self.in_axes + tuple(self.kernel_axes[self.in_axes:])
        kernel = self.param("kernel", nn.with_logical_partitioning(lambda _: quantized, tuple(self.kernel_axes)))
        return kernel, self.param("kernel_scale", nn.with_logical_partitioning(lambda _: scale, scale_axes))
