"""Building a model from its config, initialising it, counting parameters (all, and active per
token for mixtures of experts) without initialising, and splitting them into trainable and frozen."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from t5lite.config import ModelConfig
from t5lite.layers.mlp import is_gated
from t5lite.models.decoder import Decoder
from t5lite.models.encoder_decoder import EncoderDecoder


def build(config: ModelConfig) -> nn.Module:
    return EncoderDecoder(config) if config.is_encoder_decoder else Decoder(config)


def dummy_inputs(config: ModelConfig, batch_size: int = 1, length: int = 8) -> dict[str, jax.Array]:
    tokens = jnp.ones((batch_size, length), jnp.int32)
    if config.is_encoder_decoder:
        return {"encoder_input_tokens": tokens, "decoder_input_tokens": tokens}
    return {"decoder_input_tokens": tokens}


# seqio's model feature names, as each kind of model takes them (loss weights go to the loss).
ENCODER_DECODER_FEATURES = (
    "encoder_input_tokens",
    "decoder_input_tokens",
    "decoder_target_tokens",
    "encoder_segment_ids",
    "decoder_segment_ids",
    "encoder_positions",
    "decoder_positions",
)
DECODER_FEATURES = (
    "decoder_input_tokens",
    "decoder_target_tokens",
    "decoder_segment_ids",
    "decoder_positions",
    "decoder_causal_attention",
)


def model_features(config: ModelConfig, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The features of a batch that `config`'s model takes."""
    names = ENCODER_DECODER_FEATURES if config.is_encoder_decoder else DECODER_FEATURES
    return {name: batch[name] for name in names if name in batch}


def init_params(config: ModelConfig, rng: jax.Array, boxed: bool = False):
    """Parameters as a pytree; `boxed=True` keeps the logical axis names (nn.LogicallyPartitioned)."""
    variables = jax.jit(lambda key: build(config).init(key, **dummy_inputs(config), enable_dropout=False))(rng)
    return variables["params"] if boxed else nn.unbox(variables["params"])


def abstract_params(config: ModelConfig):
    """Shapes and dtypes of the parameters (jax.ShapeDtypeStruct leaves), without computing anything."""
    return jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))


def param_axes(config: ModelConfig) -> dict[str, tuple[str | None, ...]]:
    """Each parameter's logical axis names, one per dimension, by "/"-joined path: what places it on
    a mesh and how Adafactor factors it."""
    boxed = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0), boxed=True))
    flat = traverse_util.flatten_dict(boxed, sep="/")
    return {
        path: tuple(leaf.names) if isinstance(leaf, nn.LogicallyPartitioned) else (None,) * leaf.ndim
        for path, leaf in flat.items()
    }


def mlp_param_count(config: ModelConfig) -> int:
    """One MLP's (or one expert's) parameters."""
    return (3 if is_gated(config.mlp_activation) else 2) * config.d_model * config.d_ff


def param_count(config: ModelConfig) -> int:
    """Total parameters, computed from the config alone (no initialisation)."""
    d = config.d_model
    norm = d * (2 if config.norm == "layer" else 1)
    attention = 2 * d * config.query_dim + 2 * d * config.kv_dim  # query and out; key and value
    mlp = mlp_param_count(config)
    per_stack = {"relative": config.num_heads * config.relative_num_buckets, "learned": config.max_length * d}.get(
        config.position_encoding, 0
    )
    final_norm = norm if config.residual == "pre" else 0
    total = config.vocab_size * d  # token embedding
    if not config.tie_embeddings:
        total += d * config.vocab_size
    decoder_layer = attention + mlp + 2 * norm
    if config.is_encoder_decoder:
        total += config.num_encoder_layers * (attention + mlp + 2 * norm) + per_stack + final_norm
        decoder_layer += attention + norm
    total += config.num_decoder_layers * decoder_layer + per_stack + final_norm
    # Each MoE layer holds num_experts MLPs and a router instead of one MLP.
    experts = config.moe.num_experts
    total += _moe_layers(config) * ((experts - 1) * mlp + d * experts)
    return total + added_param_count(config)


def _projections(config: ModelConfig) -> dict[str, tuple[list[tuple[int, int]], int]]:
    """Each projection (a LoRA target) -> (its matrices' (inputs, outputs), how many layers have it);
    MLPs in dense layers only."""
    d, q, kv, ff = config.d_model, config.query_dim, config.kv_dim, config.d_ff
    attention_layers = config.num_decoder_layers * (2 if config.is_encoder_decoder else 1)
    if config.is_encoder_decoder:
        attention_layers += config.num_encoder_layers
    mlp_layers = config.num_decoder_layers + (config.num_encoder_layers if config.is_encoder_decoder else 0)
    mlp_layers -= _moe_layers(config)
    return {
        "query": ([(d, q)], attention_layers),
        "key": ([(d, kv)], attention_layers),
        "value": ([(d, kv)], attention_layers),
        "out": ([(q, d)], attention_layers),
        "mlp_in": ([(d, ff)] * (2 if is_gated(config.mlp_activation) else 1), mlp_layers),
        "mlp_out": ([(ff, d)], mlp_layers),
    }


def adapter_param_count(config: ModelConfig) -> int:
    """LoRA parameters: rank · (inputs + outputs) per adapted matrix."""
    projections = _projections(config)
    return config.adapters.lora_rank * sum(
        sum(i + o for i, o in projections[t][0]) * projections[t][1] for t in config.adapters.lora_targets
    )


def added_param_count(config: ModelConfig) -> int:
    """What LoRA, BitFit (a bias per projection output), the soft prompt and a reward head add."""
    biases = sum(sum(o for _, o in shapes) * layers for shapes, layers in _projections(config).values())
    adapters = config.adapters
    return (
        adapter_param_count(config)
        + adapters.bitfit * biases
        + adapters.prompt_length * config.d_model
        + adapters.reward_head * config.d_model
    )


def active_param_count(config: ModelConfig) -> int:
    """Parameters one token passes through: MoE layers count `experts_per_token` experts, not all."""
    experts = config.moe
    idle = (experts.num_experts - experts.experts_per_token) * mlp_param_count(config) if experts.num_experts else 0
    return param_count(config) - _moe_layers(config) * idle


def _moe_layers(config: ModelConfig) -> int:
    return config.num_moe_layers("encoder") + config.num_moe_layers("decoder")


def _scanned_path(config: ModelConfig, stack: str, index: int, leaf: str) -> tuple[str, int]:
    """Where layer `index` of a stack lives when scanned: (path, position on the stacked axis).
    Stacks with experts every k-th layer scan blocks of k layers (`layers/layer_{j}`)."""
    every = config.moe_every(stack)
    if every:
        return f"{stack}/layers/layer_{index % every}/{leaf}", index // every
    return f"{stack}/layers/{leaf}", index


def stack_layers(flat: dict[str, np.ndarray], config: ModelConfig) -> dict[str, np.ndarray]:
    """layers_{i}/x -> layers/x stacked on a leading axis, as nn.scan stores them. `flat` maps
    "/"-joined paths to arrays (flax.traverse_util.flatten_dict(params, sep="/"))."""
    out, stacked = {}, {}
    for key, value in flat.items():
        stack, sep, rest = key.partition("/layers_")
        if not sep:
            out[key] = value
            continue
        index, _, leaf = rest.partition("/")
        path, position = _scanned_path(config, stack, int(index), leaf)
        stacked.setdefault(path, {})[position] = value
    for key, by_index in stacked.items():
        out[key] = np.stack([by_index[i] for i in range(len(by_index))])
    return out


def unstack_layers(flat: dict[str, np.ndarray], config: ModelConfig) -> dict[str, np.ndarray]:
    """Inverse of `stack_layers`: the parameters of `config.replace(scan_layers=False)`."""
    out = {}
    for key, value in flat.items():
        stack, sep, leaf = key.partition("/layers/")
        if not sep:
            out[key] = value
            continue
        every = config.moe_every(stack)
        block = 0
        if every:
            block_name, _, leaf = leaf.partition("/")
            block = int(block_name.removeprefix("layer_"))
        out.update({f"{stack}/layers_{i * (every or 1) + block}/{leaf}": layer for i, layer in enumerate(value)})
    return out


# Parameter paths ("/"-joined) that fine-tuning adds to a pretrained model.
ADAPTERS = r"/lora_[ab]$"  # LoRA
BIASES = r"/bias$"  # BitFit (LayerNorm's biases too, where the model has them)
PROMPT_PATH = "encoder/prompt/embedding"
PROMPT = f"^{PROMPT_PATH}$"  # prompt tuning
REWARD_HEAD = r"^decoder/reward_head/"  # a reward model's scalar head


def added_pattern(config: ModelConfig) -> str | None:
    """The regex of the parameters that `config`'s LoRA, BitFit, prompt and reward head add; None
    without them."""
    adapters = config.adapters
    parts = [
        pattern
        for pattern, on in (
            (ADAPTERS, adapters.lora_rank),
            (BIASES, adapters.bitfit),
            (PROMPT, adapters.prompt_length),
            (REWARD_HEAD, adapters.reward_head),
        )
        if on
    ]
    return "|".join(parts) or None


def added_params(config: ModelConfig, params) -> dict:
    """Those parameters alone ("/"-joined paths to arrays)."""
    pattern = added_pattern(config)
    flat = traverse_util.flatten_dict(params, sep="/")
    return {p: x for p, x in flat.items() if pattern and re.search(pattern, p)}


def trainable_pattern(config: ModelConfig, pattern: str | None) -> str | None:
    """The regex of trainable parameter paths: `pattern`; else, with LoRA, BitFit or a prompt, what
    they (and a reward head) add; else None (everything trains)."""
    if pattern is None:
        return added_pattern(config) if config.adapters.trains_added_params else None
    try:
        re.compile(pattern)
    except re.error as error:
        raise ValueError(f"train.trainable={pattern!r} is not a regular expression: {error}.") from error
    paths = traverse_util.flatten_dict(abstract_params(config), sep="/")
    if not any(re.search(pattern, path) for path in paths):
        raise ValueError(
            f"train.trainable={pattern!r} matches no parameter; paths look like {', '.join(sorted(paths)[:4])}, ..."
        )
    return pattern


def split_params(params, pattern: str | None):
    """(trainable, frozen) subtrees: the leaves whose "/"-joined path matches `pattern` (all when None),
    and the rest. `merge_params` puts them back together."""
    if pattern is None:
        return params, {}
    flat = traverse_util.flatten_dict(params, sep="/")
    chosen = {path: leaf for path, leaf in flat.items() if re.search(pattern, path)}
    rest = {path: leaf for path, leaf in flat.items() if path not in chosen}
    return traverse_util.unflatten_dict(chosen, sep="/"), traverse_util.unflatten_dict(rest, sep="/")


def merge_params(trainable, frozen):
    if not frozen:
        return trainable
    flat = traverse_util.flatten_dict(frozen, sep="/")
    flat.update(traverse_util.flatten_dict(trainable, sep="/"))
    return traverse_util.unflatten_dict(flat, sep="/")
