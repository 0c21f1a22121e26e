"""LoRA adapters as parameters: folding them into their kernels for inference."""

from __future__ import annotations

import math
import re

import jax.numpy as jnp
from flax import traverse_util

from t5lite.config import ModelConfig
from t5lite.models.params import ADAPTERS
from t5lite.models.transformer import lora


def merge_lora(config: ModelConfig, params):
    """(config, params) of the plain model computing what the adapted one does: W + scale·A·B."""
    if not config.adapters.lora_rank:
        raise ValueError("This model has no LoRA adapters (lora_rank=0); there is nothing to merge.")
    if config.weight_quant.families:
        raise ValueError(
            f"Its kernels are stored quantised (WeightQuantConfig.families="
            f"{config.weight_quant.families}); adapters merge into float kernels only. Run the adapted "
            f"model as it is, or fine-tune a float base."
        )
    scale = lora(config, deterministic=True).scale
    flat = traverse_util.flatten_dict(params, sep="/")
    merged = {p: x for p, x in flat.items() if not re.search(ADAPTERS, p)}
    for path in (p for p in flat if p.endswith("/lora_a")):
        module = path.removesuffix("/lora_a")
        kernel, a, b = merged[f"{module}/kernel"], flat[path], flat[f"{module}/lora_b"]
        leading = a.ndim + b.ndim - 2 - kernel.ndim  # the stacked layer axis of scanned layers
        lead = a.shape[:leading]
        a = a.reshape(*lead, math.prod(a.shape[leading:-1]), a.shape[-1]).astype(jnp.float32)
        b = b.reshape(*lead, b.shape[leading], -1).astype(jnp.float32)
        delta = jnp.matmul(a, b, precision="highest").reshape(kernel.shape)
        merged[f"{module}/kernel"] = (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
    return config.replace(adapters=config.adapters.replace(lora_rank=0)), traverse_util.unflatten_dict(merged, sep="/")
