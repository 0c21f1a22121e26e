"""Weight-only int8 models from float ones, for inference.

The quantised model is the same model with `ModelConfig.int8_weights` set: the chosen dense
families keep their kernels in int8 with one float32 scale per output feature (symmetric
abs-max, see `DenseGeneral`). Embeddings, the output logits, norms, position biases and the
experts of MoE layers stay in float.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from pallas_kernels.int8_matmul import quantize_over
from t5lite.config import INT8_DENSE_FAMILIES, ModelConfig
from t5lite.models.params import abstract_params


def quantize_weights(config: ModelConfig, params, families=INT8_DENSE_FAMILIES):
    """(config, params) of the model with `families` ("attention", "mlp") stored in int8."""
    if config.int8_weights:
        raise ValueError(f"These parameters are already quantised (int8_weights={config.int8_weights}); "
                         f"quantize the float checkpoint instead.")
    families = tuple(families)
    int8_config = config.replace(int8_weights=families,
                                 int8_dense=tuple(f for f in config.int8_dense if f not in families))
    target = traverse_util.flatten_dict(abstract_params(int8_config))
    source = traverse_util.flatten_dict(params)
    quantized = {}
    for path, leaf in target.items():
        if path[-1] == "kernel_scale":
            continue
        if path not in source:
            raise ValueError(f"The parameters have no {'/'.join(path)}; are they of this config's model?")
        value = source[path]
        if leaf.dtype == np.int8:
            scale_shape = target[path[:-1] + ("kernel_scale",)].shape
            value, quantized[path[:-1] + ("kernel_scale",)] = quantize_over(
                value, [axis for axis, size in enumerate(scale_shape) if size == 1])
        if value.shape != leaf.shape:
            raise ValueError(f"{'/'.join(path)} has shape {value.shape}, the config's model {leaf.shape}.")
        quantized[path] = jnp.asarray(value, leaf.dtype)
    return int8_config, traverse_util.unflatten_dict(quantized)
