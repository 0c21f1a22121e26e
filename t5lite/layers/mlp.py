"""Position-wise feed-forward blocks: plain (ReLU, GELU) and gated (GeGLU, SwiGLU, ReGLU)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from t5lite.layers.dense import DenseGeneral, Lora, WeightQuant

# name -> (activation, gated). "gelu" is the exact erf form; T5 v1.1's "gated-gelu"
# (Hugging Face's gelu_new) is the tanh approximation, hence geglu uses it.
ACTIVATIONS = {
    "relu": (nn.relu, False),
    "gelu": (functools.partial(nn.gelu, approximate=False), False),
    "gelu_tanh": (functools.partial(nn.gelu, approximate=True), False),
    "silu": (nn.silu, False),
    "reglu": (nn.relu, True),
    "geglu": (functools.partial(nn.gelu, approximate=True), True),
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
