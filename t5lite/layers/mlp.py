"""Position-wise feed-forward blocks: plain (ReLU, GELU) and gated (GeGLU, SwiGLU, ReGLU)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5lite.layers.dense import DenseGeneral, Lora, WeightQuant


@jax.custom_jvp
def gelu_tanh(x):
    """GELU's tanh approximation, the same values as `jax.nn.gelu(x, approximate=True)`, with a
    derivative rule that leaves one array (the derivative) for the backward pass: autodiff of the
    formula keeps six per layer, whose writes and reads cost ~15% of a T5 v1.1 training step on CPU
    (experiments/benchmarks/README.md)."""
    return jax.nn.gelu(x, approximate=True)


@gelu_tanh.defjvp
def _gelu_tanh_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    c = np.sqrt(2 / np.pi).astype(x.dtype)
    t = jnp.tanh(c * (x + 0.044715 * (x**3)))
    cdf = 0.5 * (1.0 + t)
    derivative = cdf + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * (x * x))
    return x * cdf, derivative * dx


# name -> (activation, gated). "gelu" is the exact erf form; T5 v1.1's "gated-gelu"
# (Hugging Face's gelu_new) is the tanh approximation, hence geglu uses it.
ACTIVATIONS = {
    "relu": (nn.relu, False),
    "gelu": (functools.partial(nn.gelu, approximate=False), False),
    "gelu_tanh": (gelu_tanh, False),
    "silu": (nn.silu, False),
    "reglu": (nn.relu, True),
    "geglu": (gelu_tanh, True),
    "swiglu": (nn.silu, True),
}


def is_gated(activation: str) -> bool:
    return ACTIVATIONS[activation][1]


class Mlp(nn.Module):
    d_ff: int
    activation: str = "relu"
    dropout_rate: float = 0.0
    deterministic: bool = True
    int8: bool = False
    weight_quant: WeightQuant | None = None
    lora: Lora | None = None
    adapted: tuple[str, ...] = ()  # "mlp_in" (wi, or wi_0 and wi_1) and/or "mlp_out" (wo) get `lora`
    bias: bool = False  # on every projection (BitFit)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        fn, gated = ACTIVATIONS[self.activation]

        def dense(*args, name):
            role = "mlp_out" if name == "wo" else "mlp_in"
            return DenseGeneral(
                *args,
                int8=self.int8,
                weight_quant=self.weight_quant,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                lora=self.lora if role in self.adapted else None,
                use_bias=self.bias,
                name=name,
            )

        if gated:
            h = fn(dense((self.d_ff,), ("embed", "mlp"), name="wi_0")(x)) * dense(
                (self.d_ff,), ("embed", "mlp"), name="wi_1"
            )(x)
        else:
            h = fn(dense((self.d_ff,), ("embed", "mlp"), name="wi")(x))
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        h = nn.Dropout(self.dropout_rate)(h, deterministic=self.deterministic)
        return dense((x.shape[-1],), ("mlp", "embed"), name="wo")(h)
