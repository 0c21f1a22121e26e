"""Where a fine-tuning run starts: a pretrained model's parameters, checked against the run's model.

`train.init_from` names a t5lite checkpoint (`t5lite convert` writes one from a Hugging Face
model) or a training run's directory (its latest checkpoint). The run's model may add LoRA
adapters and BitFit biases (initialised fresh) or a soft prompt (started, as Lester et al. found
best, from the embeddings of sampled common tokens), and may store its dense kernels quantised:
a float base is then rounded to the run's layout (int8, or int4 or NF4 in groups), QLoRA-style.
"""

from __future__ import annotations

import re

import numpy as np
from flax import traverse_util

from t5lite.config import ModelConfig
from t5lite.models import abstract_params
from t5lite.models.params import PROMPT_PATH, added_pattern, stack_layers, unstack_layers
from t5lite.quantization.weights import quantize_weights
from t5lite.train import checkpoint

# Fields a fine-tuning run may set differently from its pretrained model.
FINETUNE_FIELDS = (
    "dtype",
    "dropout_rate",
    "remat_policy",
    "pipeline_microbatches",
    "pipeline_repeats",
    "scan_layers",
    "attention_impl",
    "int8_dense",
    "adapters",
    "moe.expert_dropout_rate",
)
PROMPT_FROM_TOKENS = 5000  # the soft prompt starts as embeddings of tokens sampled from the first ids


def pretrained_params(config: ModelConfig, path: str) -> dict[str, np.ndarray]:
    """The parameters of `config`'s model found at `path` ("/"-joined paths to host arrays), a soft
    prompt included; only what LoRA and BitFit add may be missing. Raises ValueError naming what differs."""
    source_config, params = checkpoint.load_pretrained(path)
    quant = config.weight_quant
    if quant.families and not source_config.weight_quant.families:
        source_config, params = quantize_weights(
            source_config,
            params,
            families=quant.families,
            bits=quant.bits,
            group_size=quant.group_size,
            zero_points=quant.zero_points,
            format=quant.format,
            double_quant=quant.double_quant,
        )
    details = source_config.differences(config, FINETUNE_FIELDS)
    if details:
        raise ValueError(
            f"train.init_from={path} holds a different model ({details}). Fine-tune with the "
            f"pretrained model's ModelConfig; only {', '.join(FINETUNE_FIELDS)} and the "
            f"quantisation of its weights may change."
        )
    flat = traverse_util.flatten_dict(params, sep="/")
    if source_config.scan_layers != config.scan_layers:
        flat = stack_layers(flat, config) if config.scan_layers else unstack_layers(flat, source_config)
    expected = traverse_util.flatten_dict(abstract_params(config), sep="/")
    added = added_pattern(config)
    missing = [p for p in expected if p not in flat and not (added and re.search(added, p))]
    if missing:
        raise ValueError(f"train.init_from={path} lacks parameters of this model: {', '.join(missing[:5])}.")
    if config.adapters.prompt_length and PROMPT_PATH not in flat:
        flat[PROMPT_PATH] = sampled_token_embeddings(flat["token_embedder/embedding"], config.adapters.prompt_length)
    return {p: np.asarray(flat[p], leaf.dtype) for p, leaf in expected.items() if p in flat}


def sampled_token_embeddings(table, count: int, seed: int = 0) -> np.ndarray:
    """`count` distinct rows of the embedding table among its first PROMPT_FROM_TOKENS (after the
    special ids 0-2); SentencePiece numbers pieces roughly by frequency, so these are common tokens."""
    table = np.asarray(table)
    candidates = np.arange(3, min(len(table), PROMPT_FROM_TOKENS))
    if count > len(candidates):
        raise ValueError(f"prompt_length={count} is more than the {len(candidates)} tokens its start is sampled from.")
    return table[np.random.default_rng(seed).choice(candidates, count, replace=False)]
