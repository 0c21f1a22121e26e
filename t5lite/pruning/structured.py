"""Structured pruning: whole attention heads and MLP channels removed, so that the saved model is
a smaller `ModelConfig` (fewer `num_heads`, smaller `d_ff`) with fewer parameters and FLOPs.

Every layer keeps the same number of units, since the config has one `num_heads` and one `d_ff`;
which ones is decided layer by layer. A unit's score is the size of what it adds to the residual
stream: for MLP channel j, ‖X_j‖₂·‖wo_j‖₂, X_j the channel's activation on calibration inputs
(the input of `wo`); for a head, the root of the sum of ‖X_j‖²·‖out_j‖² over its rows of `out`.
Without calibration statistics ‖X_j‖ is taken as 1 (the output weights' norms alone).

Under grouped-query attention a unit is a key/value head with its group of query heads. With
T5's relative position bias (one table of a bias per head for a whole stack), a stack's
self-attention layers keep the same heads, scored summed over the layers, and the table keeps
their rows. Removing a unit is exact: the smaller model computes what the full model computes
with those units' output rows (`out`, `wo`) zeroed.
"""

from __future__ import annotations

import re

import numpy as np
from flax import traverse_util

from t5lite.config import ModelConfig
from t5lite.models.params import stack_layers
from t5lite.quantization.calibration import unrolled

SHARED_BIAS = {"encoder": "attention", "decoder": "self_attention"}  # attention that reads the relpos table


def check(config: ModelConfig, families) -> None:
    """ValueError for a model whose heads or channels cannot be removed."""
    if config.moe.num_experts:
        raise ValueError("structured pruning of a mixture-of-experts model is not supported (d_ff is shared).")
    adapters = config.adapters
    if adapters.lora_rank or adapters.bitfit:
        raise ValueError("The run has LoRA or BitFit parameters; merge or drop them before structured pruning.")
    if "attention" in families:
        if config.position_encoding == "alibi":
            raise ValueError("ALiBi's slopes depend on the head count; prune with families=mlp only.")
        if config.num_kv_heads == 1:
            raise ValueError("Multi-query attention has one key/value head to keep; prune with families=mlp only.")


def units(config: ModelConfig) -> tuple[int, int]:
    """(attention units, query heads per unit): key/value groups under GQA, else heads."""
    groups = config.num_kv_heads or config.num_heads
    return groups, config.num_heads // groups


def kept_count(total: int, sparsity: float) -> int:
    return max(1, round(total * (1 - sparsity)))


def pruned_config(config: ModelConfig, sparsity: float, families) -> ModelConfig:
    """The smaller config: `sparsity` of the heads (or key/value groups) and of d_ff removed."""
    changes = {}
    if "attention" in families:
        groups, per_group = units(config)
        kept = kept_count(groups, sparsity)
        changes.update(num_heads=kept * per_group, num_kv_heads=None if config.num_kv_heads is None else kept)
    if "mlp" in families:
        changes.update(d_ff=kept_count(config.d_ff, sparsity))
    return config.replace(**changes)


def _output_energy(kernel: np.ndarray, stats, module: str, rows: int) -> np.ndarray:
    """[rows] ‖X_j‖²·‖W_j‖² of each input row j of an output projection (X_j = 1 without stats)."""
    w = np.asarray(kernel, np.float32).reshape(rows, -1)
    energy = (w**2).sum(axis=1)
    if stats is not None:
        if module not in stats:
            raise ValueError(f"No calibration statistics for {module}; calibrate the same model and families.")
        energy = energy * np.maximum(np.diag(stats[module].gram), 0)
    return energy


def kept_units(config: ModelConfig, flat: dict, sparsity: float, families, stats=None) -> dict[str, np.ndarray]:
    """Sorted indices of the units each attention or MLP module keeps, by module path of the
    unrolled model: attention units (heads, or key/value groups), MLP channels."""
    groups, per_group = units(config)
    scores = {}
    for path, kernel in flat.items():
        module = path.removesuffix("/out/kernel").removesuffix("/mlp/wo/kernel")
        if path.endswith("/out/kernel") and "attention" in families:
            energy = _output_energy(kernel, stats, f"{module}/out", config.num_heads * config.head_dim)
            scores[module] = energy.reshape(groups, -1).sum(axis=1)
        elif path.endswith("/mlp/wo/kernel") and "mlp" in families:
            scores[f"{module}/mlp"] = _output_energy(kernel, stats, f"{module}/mlp/wo", config.d_ff)
    if config.position_encoding == "relative":  # one bias table per stack: its layers keep the same heads
        for stack, name in SHARED_BIAS.items():
            shared = [m for m in scores if re.fullmatch(rf"{stack}/layers_\d+/{name}", m)]
            total = sum(scores[m] for m in shared)
            scores.update({m: total for m in shared})
    kept = {}
    for module, score in scores.items():
        keep = kept_count(len(score), sparsity)
        kept[module] = np.sort(np.argsort(-score, kind="stable")[:keep])
    return kept


def _head_rows(units_kept: np.ndarray, per_group: int) -> np.ndarray:
    return (units_kept[:, None] * per_group + np.arange(per_group)).reshape(-1)


def prune(config: ModelConfig, params, sparsity: float, families, stats=None):
    """(smaller config, its params) with the lowest-scoring heads and channels of every layer removed."""
    check(config, families)
    flat_config, params = unrolled(config, params)
    flat = traverse_util.flatten_dict(params, sep="/")
    kept = kept_units(flat_config, flat, sparsity, families, stats)
    _, per_group = units(config)
    out = dict(flat)
    for module, index in kept.items():
        if module.endswith("/mlp"):
            for name in ("wi", "wi_0", "wi_1"):
                if f"{module}/{name}/kernel" in flat:
                    out[f"{module}/{name}/kernel"] = np.asarray(flat[f"{module}/{name}/kernel"])[:, index]
            out[f"{module}/wo/kernel"] = np.asarray(flat[f"{module}/wo/kernel"])[index]
            continue
        heads = _head_rows(index, per_group)
        out[f"{module}/query/kernel"] = np.asarray(flat[f"{module}/query/kernel"])[:, heads]
        for name in ("key", "value"):
            kv = index if config.num_kv_heads is not None else heads
            out[f"{module}/{name}/kernel"] = np.asarray(flat[f"{module}/{name}/kernel"])[:, kv]
        out[f"{module}/out/kernel"] = np.asarray(flat[f"{module}/out/kernel"])[heads]
        stack, _, rest = module.partition("/layers_")
        table = f"{stack}/positions/relpos_bias/rel_embedding"
        if config.position_encoding == "relative" and rest.endswith("/" + SHARED_BIAS.get(stack, "")):
            out[table] = np.asarray(flat[table])[heads]
    target = pruned_config(config, sparsity, families)
    if target.scan_layers:
        out = stack_layers(out, target)
    return target, traverse_util.unflatten_dict(out, sep="/")
