"""A float model's parameters to a quantised model's, by one of the post-training methods.

The quantised model is the same model with `ModelConfig.int8_weights` and its companions set
(see `quantized_config`): the chosen dense families keep int8 (or packed int4) kernels with
their scales; embeddings, the output logits, norms, position biases and the experts of MoE
layers stay in float. Each kernel is quantised as a matrix [K inputs, N outputs]:

  int8         round to nearest (RTN), weight-only, at `bits`.
  llm_int8     RTN int8 weights; at run time LLM.int8() (outlier features in float).
  gptq         GPTQ with the calibration Hessian, weight-only.
  awq          AWQ's activation-aware input scales, then RTN, weight-only.
  smoothquant  SmoothQuant's migration of activation outliers into the weights; W8A8.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from t5lite.config import INT8_DENSE_FAMILIES, ModelConfig
from t5lite.models.params import abstract_params, stack_layers
from t5lite.quantization import awq, gptq, smoothquant
from t5lite.quantization.calibration import LayerStats, unrolled
from t5lite.quantization.core import Scheme, fit, pack_int4, quantize

METHODS = ("int8", "llm_int8", "gptq", "awq", "smoothquant")
CALIBRATED = ("gptq", "awq", "smoothquant")
COMPANIONS = ("kernel_scale", "kernel_zero", "input_scale")  # of a quantised kernel


def quantized_config(config: ModelConfig, method: str = "int8", bits: int = 8, group_size: int | None = None,
                     families=INT8_DENSE_FAMILIES, zero_points: bool = False,
                     percentile: float | None = None) -> ModelConfig:
    """The config of `config`'s model quantised by `method`; refuses a recipe that cannot be made."""
    if percentile is not None and method != "smoothquant":
        raise ValueError(f"percentile={percentile} only sets SmoothQuant's input ranges; method={method!r} does not "
                         f"use it.")
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported. Allowed values: {', '.join(METHODS)}.")
    if config.int8_weights:
        raise ValueError(f"This model is already quantised (int8_weights={config.int8_weights}); quantise the "
                         f"float checkpoint instead.")
    families = tuple(families)
    if not families:
        raise ValueError("Name at least one family to quantise: attention, mlp.")
    return config.replace(
        int8_weights=families, int8_dense=tuple(f for f in config.int8_dense if f not in families),
        weight_bits=bits, weight_group_size=group_size, weight_zero_points=zero_points,
        input_scaling=method in ("awq", "smoothquant"),
        activation_quant={"llm_int8": "llm_int8", "smoothquant": "int8"}.get(method, "none"))


def quantize_weights(config: ModelConfig, params, families=INT8_DENSE_FAMILIES, method: str = "int8",
                     bits: int = 8, group_size: int | None = None, zero_points: bool = False,
                     stats: dict[str, LayerStats] | None = None, smoothquant_alpha: float = 0.5,
                     percentile: float | None = None):
    """(config, params) of the quantised model. `stats` (from `calibration.calibrate`) are needed by
    gptq, awq and smoothquant; SmoothQuant takes each input's abs-max, or its `percentile`."""
    target_config = quantized_config(config, method, bits, group_size, families, zero_points, percentile)
    if method in CALIBRATED and stats is None:
        raise ValueError(f"method={method!r} needs calibration statistics (calibration.calibrate).")
    scheme = Scheme(bits, not zero_points, group_size)
    _, float_params = unrolled(config, params)
    source = traverse_util.flatten_dict(float_params, sep="/")
    target = traverse_util.flatten_dict(abstract_params(target_config.replace(scan_layers=False)), sep="/")
    out = {}
    for path, leaf in target.items():
        module, name = path.rsplit("/", 1)
        if name in COMPANIONS:
            continue  # written with their kernel
        if path not in source:
            raise ValueError(f"The parameters have no {path}; are they of this config's model?")
        if name != "kernel" or leaf.dtype != np.int8:
            if source[path].shape != leaf.shape:
                raise ValueError(f"{path} has shape {source[path].shape}, the config's model {leaf.shape}.")
            out[path] = jnp.asarray(source[path], leaf.dtype)
            continue
        if method in CALIBRATED and module not in stats:
            raise ValueError(f"No calibration statistics for {module}; calibrate the same model and families.")
        features = target[f"{module}/kernel_scale"].shape[1:]
        w = np.asarray(source[path], np.float32).reshape(-1, int(np.prod(features)))
        stored = _quantize_matrix(method, w, scheme, stats[module] if method in CALIBRATED else None,
                                  smoothquant_alpha, percentile)
        for key, value in stored.items():
            if f"{module}/{key}" in target:
                out[f"{module}/{key}"] = jnp.asarray(value).reshape(target[f"{module}/{key}"].shape)
    if target_config.scan_layers:
        out = stack_layers(out, target_config)
    return target_config, traverse_util.unflatten_dict(out, sep="/")


def _quantize_matrix(method: str, w, scheme: Scheme, stats: LayerStats | None, alpha: float,
                     percentile: float | None) -> dict:
    """The stored parameters of one kernel w [K, N]."""
    input_scale = np.ones(w.shape[0], np.float32)
    if method == "gptq":
        q, scale, zero = gptq.gptq(w, stats.gram, scheme)
    elif method == "awq":
        q, scale, zero, input_scale = awq.awq(w, stats.samples, scheme)
    elif method == "smoothquant":
        input_scale = smoothquant.smoothing_factors(stats.input_range(percentile), w, alpha)
        q, scale = smoothquant.smoothquant_weights(w, input_scale)
        zero = np.zeros_like(scale, np.int32)
    else:
        scale, zero = fit(w, scheme)
        q = quantize(w, scale, zero, scheme)
    return {"kernel": pack_int4(q) if scheme.bits == 4 else q, "kernel_scale": scale, "kernel_zero": zero,
            "input_scale": input_scale}
