"""A float model's parameters to a quantised model's, by one of the post-training methods.

The quantised model is the same model with `ModelConfig.weight_quant` set
(see `quantized_config`): the chosen dense families keep int8 (or packed int4) kernels with
their scales; embeddings, the output logits, norms, position biases and the experts of MoE
layers stay in float. Each kernel is quantised as a matrix [K inputs, N outputs]:

  int8         round to nearest (RTN), weight-only, at `bits`.
  llm_int8     RTN int8 weights; at run time LLM.int8() (outlier features in float).
  gptq         GPTQ with the calibration Hessian, weight-only.
  awq          AWQ's activation-aware input scales, then RTN, weight-only.
  smoothquant  SmoothQuant's migration of activation outliers into the weights; W8A8.

Round to nearest also stores `format="nf4"` (QLoRA's NormalFloat levels, 4 bits in groups) and,
for grouped scales, `double_quant` (the scales in int8); see `t5lite.layers.quant`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from t5lite.config import INT8_DENSE_FAMILIES, ModelConfig, WeightQuantConfig
from t5lite.layers.quant import Scheme, fit, pack_int4, quantize, quantize_scales
from t5lite.models.params import abstract_params, stack_layers
from t5lite.quantization import awq, gptq, smoothquant
from t5lite.quantization.calibration import LayerStats, unrolled

METHODS = ("int8", "llm_int8", "gptq", "awq", "smoothquant")
CALIBRATED = ("gptq", "awq", "smoothquant")
COMPANIONS = ("kernel_scale", "kernel_zero", "input_scale", "kernel_scale_scale")  # of a quantised kernel
# Why a method cannot store NF4 levels or double-quantised scales (round to nearest, "int8", can).
_INT_GRID_ONLY = {
    "llm_int8": "multiplies int8 weights with one scale per output feature",
    "smoothquant": "multiplies int8 weights with one scale per output feature",
    "gptq": "measures its rounding errors on the uniform grid, fitting each group's scales as it goes",
    "awq": "searches its input scales by rounding on the uniform grid",
}


def quantized_config(
    config: ModelConfig,
    method: str = "int8",
    bits: int = 8,
    group_size: int | None = None,
    families=INT8_DENSE_FAMILIES,
    zero_points: bool = False,
    percentile: float | None = None,
    format: str = "int",
    double_quant: bool = False,
) -> ModelConfig:
    """The config of `config`'s model quantised by `method`; refuses a recipe that cannot be made."""
    if percentile is not None and method != "smoothquant":
        raise ValueError(
            f"percentile={percentile} only sets SmoothQuant's input ranges; method={method!r} does not use it."
        )
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported. Allowed values: {', '.join(METHODS)}.")
    if (format != "int" or double_quant) and method in _INT_GRID_ONLY:
        raise ValueError(
            f"format={format!r}, double_quant={double_quant}: method={method!r} "
            f"{_INT_GRID_ONLY[method]}; use method='int8' (round to nearest), or format='int' "
            f"without double_quant."
        )
    if config.weight_quant.families:
        raise ValueError(
            f"This model is already quantised (WeightQuantConfig.families="
            f"{config.weight_quant.families}); quantise the float checkpoint instead."
        )
    families = tuple(families)
    if not families:
        raise ValueError("Name at least one family to quantise: attention, mlp.")
    quant = WeightQuantConfig(
        families=families,
        bits=bits,
        group_size=group_size,
        zero_points=zero_points,
        format=format,
        double_quant=double_quant,
        input_scaling=method in ("awq", "smoothquant"),
        activations={"llm_int8": "llm_int8", "smoothquant": "int8"}.get(method, "none"),
    )
    return config.replace(weight_quant=quant, int8_dense=tuple(f for f in config.int8_dense if f not in families))


def quantize_weights(
    config: ModelConfig,
    params,
    families=INT8_DENSE_FAMILIES,
    method: str = "int8",
    bits: int = 8,
    group_size: int | None = None,
    zero_points: bool = False,
    stats: dict[str, LayerStats] | None = None,
    smoothquant_alpha: float = 0.5,
    percentile: float | None = None,
    format: str = "int",
    double_quant: bool = False,
):
    """(config, params) of the quantised model. `stats` (from `calibration.calibrate`) are needed by
    gptq, awq and smoothquant; SmoothQuant takes each input's abs-max, or its `percentile`.
    `format="nf4"` and `double_quant` are layouts of round to nearest (method "int8")."""
    target_config = quantized_config(
        config, method, bits, group_size, families, zero_points, percentile, format, double_quant
    )
    if method in CALIBRATED and stats is None:
        raise ValueError(f"method={method!r} needs calibration statistics (calibration.calibrate).")
    scheme = Scheme(bits, not zero_points, group_size, format=format, double_quant=double_quant)
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
        stored = _quantize_matrix(
            method, w, scheme, stats[module] if method in CALIBRATED else None, smoothquant_alpha, percentile
        )
        for key, value in stored.items():
            if f"{module}/{key}" in target:
                out[f"{module}/{key}"] = jnp.asarray(value).reshape(target[f"{module}/{key}"].shape)
    if target_config.scan_layers:
        out = stack_layers(out, target_config)
    return target_config, traverse_util.unflatten_dict(out, sep="/")


def _quantize_matrix(
    method: str, w, scheme: Scheme, stats: LayerStats | None, alpha: float, percentile: float | None
) -> dict:
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
        q, scale, zero = _round_to_nearest(w, scheme)
    return {"input_scale": input_scale, **_stored(q, scale, zero, scheme)}


@functools.partial(jax.jit, static_argnums=1)
def _round_to_nearest(w, scheme: Scheme):
    """(q, scale, zero) of w [K, N]; jitted, as op by op it compiles every small op for every shape."""
    scale, zero = fit(w, scheme)
    return quantize(w, scale, zero, scheme), scale, zero


@functools.partial(jax.jit, static_argnums=3)
def _stored(q, scale, zero, scheme: Scheme) -> dict:
    """The kernel (4-bit values packed), its scales (int8 codes and their steps with double
    quantisation) and zero points, as the quantised layer stores them."""
    stored = {"kernel": pack_int4(q) if scheme.bits == 4 else q, "kernel_scale": scale, "kernel_zero": zero}
    if scheme.double_quant:
        codes, step = quantize_scales(scale)
        stored.update(kernel_scale=codes, kernel_scale_scale=step)
    return stored
