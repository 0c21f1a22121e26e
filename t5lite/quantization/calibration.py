"""What the post-training methods need to know of each quantised layer's inputs.

The float model runs over a few batches of a seqio task; every call of a dense layer of the
chosen families records, per input feature, the largest magnitude (SmoothQuant), the Gram
matrix X^T X of its inputs (GPTQ's Hessian) and the first tokens themselves (AWQ's search, and
percentile ranges).
Padding tokens are inputs too, as they are at inference; they are few in packed batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from t5lite.config import ModelConfig
from t5lite.layers.dense import DenseGeneral
from t5lite.models.params import build, model_features, unstack_layers

FAMILY_MODULES = {"attention": ("attention", "self_attention", "cross_attention"), "mlp": ("mlp",)}


class LayerStats(NamedTuple):
    absmax: np.ndarray  # [K] largest |x_k|
    gram: np.ndarray  # [K, K] sum over tokens of x x^T, float32
    samples: np.ndarray  # [<= max_samples, K] the first tokens' inputs

    def input_range(self, percentile: float | None = None) -> np.ndarray:
        """[K] the abs-max of each input feature, or (robust to rare spikes) the `percentile` of its
        magnitudes over the sampled tokens."""
        if percentile is None:
            return self.absmax
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile={percentile!r} must be in (0, 100] (e.g. 99.9), or None for the abs-max.")
        return np.percentile(np.abs(self.samples), percentile, axis=0).astype(np.float32)


def family_of(path: Iterable[str]) -> str | None:
    """The dense family ("attention", "mlp") of a module or parameter path; None for the rest
    (embeddings, logits, experts)."""
    parts = set(path)
    return next((family for family, names in FAMILY_MODULES.items() if parts & set(names)), None)


def unrolled(config: ModelConfig, params):
    """(config, params) with the layers unrolled (`layers_{i}`), one path per layer."""
    if not config.scan_layers:
        return config, params
    flat = unstack_layers(traverse_util.flatten_dict(params, sep="/"), config)
    return config.replace(scan_layers=False), traverse_util.unflatten_dict(flat, sep="/")


def calibrate(
    config: ModelConfig, params, batches: Sequence[dict], families=("attention", "mlp"), max_samples: int = 512
) -> dict[str, LayerStats]:
    """Statistics of the inputs of each dense layer of `families`, keyed by the "/"-joined module
    path of the unrolled model (e.g. "decoder/layers_0/mlp/wi_0"). The samples are up to
    `max_samples` tokens spread evenly over each batch and shared out between the batches."""
    config, params = unrolled(config, params)
    config = config.replace(remat_policy="none")  # inputs recorded inside jax.checkpoint would escape it
    model = build(config)
    per_batch = -(-max_samples // max(1, len(batches)))

    def layer_inputs(params, batch):
        recorded = {}

        def record(next_fun, args, kwargs, context):
            module = context.module
            if (
                isinstance(module, DenseGeneral)
                and context.method_name == "__call__"
                and family_of(module.path) in families
            ):
                x = args[0]
                x = x.reshape(-1, math.prod(x.shape[x.ndim - module.in_axes :])).astype(jnp.float32)
                gram = jnp.dot(x.T, x, precision=jax.lax.Precision.HIGHEST)
                spread = x[:: max(1, x.shape[0] // per_batch)][:per_batch]
                recorded["/".join(module.path)] = (jnp.max(jnp.abs(x), axis=0), gram, spread)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(record):
            model.apply({"params": params}, **model_features(config, batch), enable_dropout=False, mutable=["moe"])
        return recorded

    step = jax.jit(layer_inputs)
    totals: dict[str, LayerStats] = {}
    for batch in batches:
        for path, (absmax, gram, samples) in jax.device_get(step(params, batch)).items():
            if path not in totals:
                totals[path] = LayerStats(absmax, gram, samples)
                continue
            old = totals[path]
            totals[path] = LayerStats(
                np.maximum(old.absmax, absmax), old.gram + gram, np.concatenate([old.samples, samples])
            )
    if not totals:
        raise ValueError(
            f"No dense layer of {tuple(families)} ran on the calibration batches; is the list of batches empty?"
        )
    return totals
