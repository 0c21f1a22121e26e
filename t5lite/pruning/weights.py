"""A float model's attention and MLP kernels pruned by one of the one-shot methods.

  magnitude   per tensor (one layer's kernel), the smallest |w|.
  2:4         the 2 largest |w| of every 4 consecutive inputs of each output (sparsity 0.5).
  wanda       per output, the lowest |w|·‖X‖₂, X the layer's inputs on calibration batches.
  structured  whole attention heads (key/value groups under GQA) and MLP channels removed: a
              smaller ModelConfig (see `t5lite.pruning.structured`).

Unstructured methods keep the model (and its config) and write zeros; embeddings, the output
logits, norms, position biases, MoE experts and routers are never pruned. Scanned layers are
pruned layer by layer, as the unrolled model.
"""

from __future__ import annotations

import numpy as np
from flax import traverse_util

from t5lite.config import INT8_DENSE_FAMILIES, ModelConfig
from t5lite.models.params import stack_layers
from t5lite.pruning import criteria, structured
from t5lite.quantization.calibration import LayerStats, family_of, unrolled

METHODS = ("magnitude", "2:4", "wanda", "structured")
CALIBRATED = ("wanda", "structured")  # structured scores units by their output on calibration inputs


def check_recipe(config: ModelConfig, method: str, sparsity: float, families=INT8_DENSE_FAMILIES) -> None:
    """ValueError for a recipe that cannot be made, before anything is calibrated or written."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported. Allowed values: {', '.join(METHODS)}.")
    criteria.check_sparsity(sparsity)
    if method == "2:4" and sparsity != 0.5:
        raise ValueError(f"method='2:4' keeps 2 of every 4 weights: its sparsity is 0.5, not {sparsity}.")
    families = tuple(families)
    unknown = set(families) - set(INT8_DENSE_FAMILIES)
    if not families or unknown:
        raise ValueError(f"families={families!r}: name one or more of {', '.join(INT8_DENSE_FAMILIES)}.")
    if config.weight_quant.families:
        raise ValueError("This model is quantised; prune the float checkpoint (and quantise the pruned one).")
    if method == "structured":
        structured.check(config, families)


def input_axes(path: str) -> int:
    """How many leading axes of a kernel are its inputs: attention's `out` contracts [heads, kv]."""
    return 2 if path.endswith("/out/kernel") else 1


def prunable(path: str, families) -> bool:
    """An attention or MLP kernel of `families` (not embeddings, logits, experts or adapters)."""
    return path.endswith("/kernel") and family_of(path.split("/")) in families


def masks(
    config: ModelConfig,
    params,
    method: str,
    sparsity: float,
    families=INT8_DENSE_FAMILIES,
    stats: dict[str, LayerStats] | None = None,
) -> dict[str, np.ndarray]:
    """Masks (True: kept) of the unstructured methods, keyed by the "/"-joined kernel path of the
    unrolled model (e.g. "decoder/layers_0/mlp/wi_0/kernel"), each of its kernel's shape."""
    check_recipe(config, method, sparsity, families)
    if method == "structured":
        raise ValueError("structured pruning removes units instead of masking weights; use prune_weights.")
    if method == "wanda" and stats is None:
        raise ValueError("method='wanda' needs calibration statistics (quantization.calibration.calibrate).")
    _, params = unrolled(config, params)
    out = {}
    for path, kernel in traverse_util.flatten_dict(params, sep="/").items():
        if not prunable(path, families):
            continue
        w = np.asarray(kernel, np.float32)
        matrix = w.reshape(int(np.prod(w.shape[: input_axes(path)])), -1)
        if method == "magnitude":
            mask = criteria.magnitude_mask(matrix, sparsity)
        elif method == "2:4":
            mask = criteria.n_m_mask(np.abs(matrix), 2, 4)
        else:
            module = path.removesuffix("/kernel")
            if module not in stats:
                raise ValueError(f"No calibration statistics for {module}; calibrate the same model and families.")
            norms = np.sqrt(np.maximum(np.diag(stats[module].gram), 0))
            mask = criteria.wanda_mask(matrix, norms, sparsity)
        out[path] = mask.reshape(w.shape)
    return out


def prune_weights(
    config: ModelConfig,
    params,
    method: str,
    sparsity: float,
    families=INT8_DENSE_FAMILIES,
    stats: dict[str, LayerStats] | None = None,
):
    """(config, params) of the pruned model: the same config with zeros written (magnitude, 2:4,
    wanda), or a smaller one (structured). `stats` (from `calibration.calibrate`) are needed by
    wanda; structured uses them when given (else weight norms alone)."""
    if method == "structured":
        check_recipe(config, method, sparsity, families)
        return structured.prune(config, params, sparsity, families, stats)
    kept = masks(config, params, method, sparsity, families, stats)
    flat_config, flat_params = unrolled(config, params)
    flat = traverse_util.flatten_dict(flat_params, sep="/")
    flat = {path: value * kept[path].astype(value.dtype) if path in kept else value for path, value in flat.items()}
    if config.scan_layers:
        flat = stack_layers(flat, config)
    return config, traverse_util.unflatten_dict(flat, sep="/")


def sparsity_report(config: ModelConfig, params, families=INT8_DENSE_FAMILIES) -> dict[str, float]:
    """The share of zeros in the prunable kernels, and the model's parameters."""
    _, params = unrolled(config, params)
    kernels = [np.asarray(v) for p, v in traverse_util.flatten_dict(params, sep="/").items() if prunable(p, families)]
    zeros = sum(int((k == 0).sum()) for k in kernels)
    size = sum(k.size for k in kernels)
    return {"kernel_sparsity": zeros / max(1, size), "pruned_kernel_weights": size}
