"""A dense layer over several input and output axes, with logical axis names on its kernel."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels.int8_matmul import int8_dense, weight_only_dense
from t5lite.layers.int8_matmul import llm_int8_matmul, smoothquant_matmul
from t5lite.layers.quant import (
    Scheme,
    dequantize,
    dequantize_scales,
    fit,
    pack_int4,
    quantize,
    quantize_scales,
    unpack_int4,
)


def fan_in_init(scale: float = 1.0, in_axes: int = 1):
    """Variance-scaling init over the first `in_axes` kernel axes (the contracted ones)."""
    return nn.initializers.variance_scaling(
        scale, "fan_in", "truncated_normal", in_axis=tuple(range(in_axes)), out_axis=-1
    )


# The name of every dense layer's output, for rematerialisation policies (t5lite.models.transformer):
# `contract` has its own backward rule, so policies that look for dot_general do not see it.
DENSE_OUTPUT = "dense"


def contract(x, kernel, in_axes: int):
    """x [..., *in] · kernel [*in, *out] -> [..., *out], the last `in_axes` axes of x contracted.

    The backward pass computes the kernel's gradient as x contracted with the cotangent over their
    batch axes, straight into the kernel's [*in, *out] layout. Autodiff of `lax.dot_general` gives
    the transposed product and then a transpose, which XLA:CPU lays out as a strided copy fused into
    the elementwise ops before it, costing about as much as the matmul (a third of a T5 v1.1 MLP's
    backward on CPU; experiments/benchmarks/README.md). Same values, same FLOPs."""
    return checkpoint_name(_contract(x, kernel, in_axes), DENSE_OUTPUT)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _contract(x, kernel, in_axes):
    return lax.dot_general(x, kernel, ((tuple(range(x.ndim - in_axes, x.ndim)), tuple(range(in_axes))), ((), ())))


def _contract_forward(x, kernel, in_axes):
    return _contract(x, kernel, in_axes), (x, kernel)


def _contract_backward(in_axes, residuals, g):
    x, kernel = residuals
    batch = x.ndim - in_axes
    outputs = tuple(range(batch, g.ndim))
    dx = lax.dot_general(g, kernel, ((outputs, tuple(range(in_axes, kernel.ndim))), ((), ())))
    dkernel = lax.dot_general(x, g, ((tuple(range(batch)), tuple(range(batch))), ((), ())))
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_contract.defvjp(_contract_forward, _contract_backward)


@dataclasses.dataclass(frozen=True)
class WeightQuant:
    """How a quantised dense layer stores and runs its kernel (built by `t5lite.quantization`).

    The kernel is stored as `scheme` says (int8 bytes; 4-bit values, NF4 indices among them, two
    per byte along the last input axis), with `kernel_scale` [groups, *features] and, without
    symmetry, `kernel_zero`. With double quantisation `kernel_scale` holds int8 codes and
    `kernel_scale_scale` [1, *features] their float32 step.
    `input_scaling` divides inputs by a per-input-channel `input_scale` first (AWQ, SmoothQuant).
    `activations`: "none" (weight-only: the matmul runs in `dtype`), "int8" (per-token int8
    activations, an int8 x int8 matmul: W8A8) or "llm_int8" (int8, except input features holding
    a value of magnitude >= `threshold`, which run in `dtype`)."""

    scheme: Scheme = Scheme()
    input_scaling: bool = False
    activations: str = "none"
    threshold: float = 6.0

    def __post_init__(self):
        if self.activations != "none" and self.scheme.format != "int":
            raise ValueError(
                f"activations={self.activations!r} multiply integer weights; format="
                f"{self.scheme.format!r} is weight-only (activations='none')."
            )


@dataclasses.dataclass(frozen=True)
class Lora:
    """A low-rank adapter beside a kernel W: y = x·W + scale·dropout(x)·A·B, with A [*inputs, rank]
    drawn like a kernel and B [rank, *features] zero, so an adapted model starts as its base."""

    rank: int
    scale: float
    dropout_rate: float = 0.0
    deterministic: bool = True


class DenseGeneral(nn.Module):
    """Contracts the last `in_axes` axes of the input with a kernel of shape in + `features`.

    `kernel_axes` names every kernel axis (inputs first), e.g. ("embed", "heads", "kv").
    With `int8`, the forward quantises inputs (per row) and kernel (per output column) to int8 on
    the fly; gradients are the straight-through estimate, computed in `dtype`.
    With `weight_quant`, the kernel is stored quantised (see `WeightQuant`); initialised as the
    quantised float init. With `lora`, a low-rank adapter adds to whichever of these computes x·W;
    `use_bias` adds a bias, zero at initialisation (what BitFit trains).
    """

    features: Sequence[int]
    kernel_axes: Sequence[str]
    in_axes: int = 1
    kernel_scale: float = 1.0
    int8: bool = False
    weight_quant: WeightQuant | None = None
    lora: Lora | None = None
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = self._base(x.astype(self.dtype))
        if self.lora is not None:
            y = y + self._adapter(x.astype(self.dtype))
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, tuple(self.kernel_axes[self.in_axes :])),
                tuple(self.features),
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y

    def _base(self, x):
        features = tuple(self.features)
        batch, inputs = x.shape[: x.ndim - self.in_axes], x.shape[x.ndim - self.in_axes :]
        shape = inputs + features
        assert len(shape) == len(self.kernel_axes), (shape, self.kernel_axes)
        # The int8 paths take the kernel as a [K, N] matrix and x as [..., K].
        flat = (math.prod(inputs), math.prod(features))
        if self.weight_quant is not None:
            return self._quantized(x.reshape(*batch, flat[0]), inputs).reshape(*batch, *features)
        init = nn.with_logical_partitioning(fan_in_init(self.kernel_scale, self.in_axes), tuple(self.kernel_axes))
        kernel = self.param("kernel", init, shape, self.param_dtype)
        if self.int8:
            y = int8_dense(x.reshape(*batch, flat[0]), kernel.reshape(flat), backward_dtype=self.dtype)
            return y.reshape(*batch, *features)
        return contract(x, kernel.astype(self.dtype), self.in_axes)

    def _adapter(self, x):
        lora, inputs = self.lora, x.shape[x.ndim - self.in_axes :]
        in_names, out_names = tuple(self.kernel_axes[: self.in_axes]), tuple(self.kernel_axes[self.in_axes :])
        a = self.param(
            "lora_a",
            nn.with_logical_partitioning(fan_in_init(1.0, self.in_axes), in_names + (None,)),
            inputs + (lora.rank,),
            self.param_dtype,
        )
        b = self.param(
            "lora_b",
            nn.with_logical_partitioning(nn.initializers.zeros, (None,) + out_names),
            (lora.rank, *self.features),
            self.param_dtype,
        )
        x = nn.Dropout(lora.dropout_rate)(x, deterministic=lora.deterministic)
        contract = (tuple(range(x.ndim - self.in_axes, x.ndim)), tuple(range(self.in_axes)))
        h = lax.dot_general(x, a.astype(self.dtype), (contract, ((), ())))
        return lora.scale * lax.dot_general(h, b.astype(self.dtype), (((h.ndim - 1,), (0,)), ((), ())))

    def _quantized(self, x, inputs):
        """x [..., K] times the stored kernel, as `weight_quant` says."""
        quant, features = self.weight_quant, tuple(self.features)
        scheme, (k, n) = quant.scheme, (math.prod(inputs), math.prod(features))
        initial = {}  # the stored parameters of one quantised float init, drawn with the kernel's key

        def param(name, axes):
            def init(key):
                if not initial:
                    initial.update(self._quantized_init(key, inputs + features))
                return initial[name]

            return self.param(name, nn.with_logical_partitioning(init, axes))

        group_axes = (None,) + tuple(self.kernel_axes[self.in_axes :])
        q = param("kernel", tuple(self.kernel_axes)).reshape(-1, n)
        q = unpack_int4(q) if scheme.bits == 4 else q
        scale = param("kernel_scale", group_axes).reshape(-1, n)
        if scheme.double_quant:
            scale = dequantize_scales(scale, param("kernel_scale_scale", group_axes).reshape(1, n))
        zero = None if scheme.symmetric else param("kernel_zero", group_axes).reshape(-1, n)
        input_scale = (
            param("input_scale", tuple(self.kernel_axes[: self.in_axes])).reshape(k) if quant.input_scaling else None
        )
        if quant.activations == "int8":
            return smoothquant_matmul(x, q, scale, jnp.ones(k) if input_scale is None else input_scale)
        if input_scale is not None:
            x = x / input_scale.astype(x.dtype)
        if quant.activations == "llm_int8":
            return llm_int8_matmul(x, q, scale, threshold=quant.threshold)
        if zero is None and scheme.format == "int":
            return weight_only_dense(x, q, scale)
        # Zero points and NF4's level lookup dequantise in XLA, then multiply in `dtype`.
        w = dequantize(q, scale, zero, scheme).astype(x.dtype)
        return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)

    def _quantized_init(self, key, shape):
        """The stored parameters of the quantised float init (float32, but for the int8 kernel and
        double quantisation's scale codes)."""
        scheme, k = self.weight_quant.scheme, math.prod(shape[: self.in_axes])
        w = fan_in_init(self.kernel_scale, self.in_axes)(key, shape, jnp.float32).reshape(k, -1)
        scale, zero = fit(w, scheme)
        q = quantize(w, scale, zero, scheme)
        packed = pack_int4(q) if scheme.bits == 4 else q
        stored_in = shape[: self.in_axes - 1] + (shape[self.in_axes - 1] // (8 // scheme.bits),)
        features = shape[self.in_axes :]
        stored = {
            "kernel": packed.reshape(stored_in + features),
            "kernel_scale": scale.reshape(-1, *features),
            "kernel_zero": zero.reshape(-1, *features),
            "input_scale": jnp.ones(shape[: self.in_axes]),
        }
        if scheme.double_quant:
            codes, step = quantize_scales(scale)
            stored.update(kernel_scale=codes.reshape(-1, *features), kernel_scale_scale=step.reshape(1, *features))
        return stored
