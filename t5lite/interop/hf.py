"""Hugging Face interop: T5 (v1.0, v1.1, mT5) and Llama, PyTorch models in and out; Switch
Transformers (T5 with mixture-of-experts MLPs) in.

Weights move through one table per family that names, for every Hugging Face tensor,
where it lives in t5lite, whether it is a vector or a matrix stored [out, in]
(`in` rows: the first t5lite axis is the input; `out`: the last t5lite axis is the
output), and for expert weights which expert of the stacked t5lite array it is. The same
table serves both directions, so import and export cannot drift.
Only local objects and directories are read: there is no hub access.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np
from flax import traverse_util

from t5lite.config import ModelConfig, MoeConfig
from t5lite.models import abstract_params, build
from t5lite.models.params import stack_layers, unstack_layers

# T5's feed_forward_proj <-> our mlp_activation.
_T5_ACTIVATIONS = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "silu": "silu",
    "gated-relu": "reglu",
    "gated-gelu": "geglu",
    "gated-gelu_new": "geglu",
    "gated-silu": "swiglu",
}
_T5_EXPORT_ACTIVATIONS = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_tanh": "gelu_new",
    "silu": "silu",
    "reglu": "gated-relu",
    "geglu": "gated-gelu",
    "swiglu": "gated-silu",
}
# Switch Transformers' dense_act_fn (never gated) <-> our mlp_activation.
_SWITCH_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "silu": "silu"}


def _t5_mlp_rules(prefix: str, config: ModelConfig, moe: bool):
    """T5's DenseReluDense, or Switch's `mlp` (dense) and `mlp.router` + `mlp.experts.expert_{e}` (sparse)."""
    names = ("wi_0", "wi_1", "wo") if config.mlp_activation in ("reglu", "geglu", "swiglu") else ("wi", "wo")
    norm = (f"{prefix}.layer_norm.weight", "pre_mlp_norm/scale", "vector")
    if moe:
        return [(f"{prefix}.mlp.router.classifier.weight", "moe/router/kernel", "in"), norm] + [
            (f"{prefix}.mlp.experts.expert_{e}.{name}.weight", f"moe/{name}", "in", e)
            for e in range(config.moe.num_experts)
            for name in names
        ]
    module = "mlp" if config.moe.num_experts else "DenseReluDense"
    return [(f"{prefix}.{module}.{name}.weight", f"mlp/{name}/kernel", "in") for name in names] + [norm]


def _t5_attention_rules(prefix: str, hf_name: str, ours: str):
    return [
        (f"{prefix}.{hf_name}.{p}.weight", f"{ours}/{name}/kernel", "out" if p == "o" else "in")
        for p, name in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out"))
    ]


def _is_moe_layer(config: ModelConfig, stack: str, index: int) -> bool:
    every = config.moe_every(stack)
    return bool(every) and (index + 1) % every == 0


def _t5_rules(config: ModelConfig):
    """(hf key, t5lite path, kind[, expert]) for every tensor of a T5 / Switch Transformers model."""
    rules = [
        ("shared.weight", "token_embedder/embedding", "vector"),
        (
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            "encoder/positions/relpos_bias/rel_embedding",
            "in",
        ),
        (
            "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            "decoder/positions/relpos_bias/rel_embedding",
            "in",
        ),
        ("encoder.final_layer_norm.weight", "encoder/final_norm/scale", "vector"),
        ("decoder.final_layer_norm.weight", "decoder/final_norm/scale", "vector"),
    ]
    if not config.tie_embeddings:
        rules.append(("lm_head.weight", "decoder/logits_dense/kernel", "in"))
    for i in range(config.num_encoder_layers):
        block, ours = f"encoder.block.{i}", f"encoder/layers_{i}"
        layer_rules = (
            _t5_attention_rules(f"{block}.layer.0", "SelfAttention", "attention")
            + [(f"{block}.layer.0.layer_norm.weight", "pre_attention_norm/scale", "vector")]
            + _t5_mlp_rules(f"{block}.layer.1", config, _is_moe_layer(config, "encoder", i))
        )
        rules += [(hf, f"{ours}/{path}", *rest) for hf, path, *rest in layer_rules]
    for i in range(config.num_decoder_layers):
        block, ours = f"decoder.block.{i}", f"decoder/layers_{i}"
        layer_rules = (
            _t5_attention_rules(f"{block}.layer.0", "SelfAttention", "self_attention")
            + [(f"{block}.layer.0.layer_norm.weight", "pre_self_attention_norm/scale", "vector")]
            + _t5_attention_rules(f"{block}.layer.1", "EncDecAttention", "cross_attention")
            + [(f"{block}.layer.1.layer_norm.weight", "pre_cross_attention_norm/scale", "vector")]
            + _t5_mlp_rules(f"{block}.layer.2", config, _is_moe_layer(config, "decoder", i))
        )
        rules += [(hf, f"{ours}/{path}", *rest) for hf, path, *rest in layer_rules]
    return rules


def _llama_rules(config: ModelConfig):
    rules = [
        ("model.embed_tokens.weight", "token_embedder/embedding", "vector"),
        ("model.norm.weight", "decoder/final_norm/scale", "vector"),
    ]
    if not config.tie_embeddings:
        rules.append(("lm_head.weight", "decoder/logits_dense/kernel", "in"))
    for i in range(config.num_decoder_layers):
        layer, ours = f"model.layers.{i}", f"decoder/layers_{i}"
        rules += [
            (f"{layer}.self_attn.{p}_proj.weight", f"{ours}/self_attention/{name}/kernel", "out" if p == "o" else "in")
            for p, name in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out"))
        ]
        rules += [
            (f"{layer}.input_layernorm.weight", f"{ours}/pre_self_attention_norm/scale", "vector"),
            (f"{layer}.post_attention_layernorm.weight", f"{ours}/pre_mlp_norm/scale", "vector"),
            (f"{layer}.mlp.gate_proj.weight", f"{ours}/mlp/wi_0/kernel", "in"),
            (f"{layer}.mlp.up_proj.weight", f"{ours}/mlp/wi_1/kernel", "in"),
            (f"{layer}.mlp.down_proj.weight", f"{ours}/mlp/wo/kernel", "in"),
        ]
    return rules


# ---------------------------------------------------------------------------------------------
# Configs


def config_from_hf(hf_config: Any, dtype: str = "float32") -> ModelConfig:
    """The t5lite config of a transformers T5Config / MT5Config / SwitchTransformersConfig / LlamaConfig."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type in ("t5", "mt5"):
        proj = hf_config.feed_forward_proj
        if proj not in _T5_ACTIVATIONS:
            raise ValueError(f"T5 feed_forward_proj={proj!r} is not supported; supported: {sorted(_T5_ACTIVATIONS)}.")
        return _t5_config(hf_config, dtype, _T5_ACTIVATIONS[proj])
    if model_type == "switch_transformers":
        return _switch_config(hf_config, dtype)
    if model_type == "llama":
        return _llama_config(hf_config, dtype)
    raise ValueError(
        f"Unsupported Hugging Face model_type {model_type!r}; t5lite imports t5, mt5, switch_transformers and llama."
    )


def _switch_config(hf: Any, dtype: str) -> ModelConfig:
    """Switch routes each whole sequence as one group with a fixed `expert_capacity`: capacity factors 0
    (capacity = min_expert_capacity = expert_capacity) and groups of up to 2^16 tokens do the same."""
    if hf.dense_act_fn not in _SWITCH_ACTIVATIONS:
        raise ValueError(
            f"Switch dense_act_fn={hf.dense_act_fn!r} is not supported; supported: {sorted(_SWITCH_ACTIVATIONS)}."
        )
    if hf.router_bias:
        raise ValueError("Switch checkpoints with router_bias=True are not supported (t5lite's router has no bias).")
    every = {}
    for stack in ("encoder", "decoder"):
        step = getattr(hf, f"{stack}_sparse_step")
        if step not in (1, 2) or not getattr(hf, f"num_sparse_{stack}_layers"):
            # HF makes layers i with i % step == 1 sparse; t5lite every k-th (i + 1) % k == 0: equal for 1 and 2.
            raise ValueError(
                f"Switch {stack}_sparse_step={step} (num_sparse_{stack}_layers="
                f"{getattr(hf, f'num_sparse_{stack}_layers')}) is not supported: t5lite imports "
                f"models with experts in every layer or every other layer (sparse step 1 or 2)."
            )
        every[f"{stack}_every"] = step
    return _t5_config(hf, dtype, _SWITCH_ACTIVATIONS[hf.dense_act_fn]).replace(
        moe=MoeConfig(
            num_experts=hf.num_experts,
            experts_per_token=1,
            router="tokens_choose",
            min_expert_capacity=hf.expert_capacity,
            train_capacity_factor=0.0,
            eval_capacity_factor=0.0,
            group_size=2**16,
            router_jitter=float(hf.router_jitter_noise),
            load_balance_loss=float(hf.router_aux_loss_coef),
            router_z_loss=float(hf.router_z_loss_coef),
            **every,
        )
    )


def _t5_config(hf: Any, dtype: str, activation: str) -> ModelConfig:
    tied = bool(hf.tie_word_embeddings)
    rescale = bool(getattr(hf, "scale_decoder_outputs", tied))
    if rescale and not tied:
        raise ValueError(
            "This T5 config scales decoder outputs by d_model**-0.5 but has an untied lm_head, "
            "which no published T5 does. Build it with T5Config(tie_word_embeddings=False) and "
            "then set config.tie_word_embeddings = False for a v1.1-style untied model."
        )
    return ModelConfig(
        architecture="encoder_decoder",
        vocab_size=hf.vocab_size,
        start_id=_token_id(hf, "decoder_start_token_id", 0),
        eos_id=_token_id(hf, "eos_token_id", 1),
        d_model=hf.d_model,
        num_heads=hf.num_heads,
        head_dim=hf.d_kv,
        d_ff=hf.d_ff,
        num_encoder_layers=hf.num_layers,
        num_decoder_layers=hf.num_decoder_layers,
        mlp_activation=activation,
        norm="rms",
        norm_epsilon=hf.layer_norm_epsilon,
        residual="pre",
        position_encoding="relative",
        relative_num_buckets=hf.relative_attention_num_buckets,
        relative_max_distance=hf.relative_attention_max_distance,
        scale_attention_by_head_dim=False,
        tie_embeddings=tied,
        rescale_tied_logits=rescale,
        dropout_rate=float(hf.dropout_rate),
        dtype=dtype,
    )


def _llama_config(hf: Any, dtype: str) -> ModelConfig:
    if hf.hidden_act != "silu":
        raise ValueError(f"Llama hidden_act={hf.hidden_act!r} is not supported; t5lite imports SwiGLU (silu).")
    if getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False):
        raise ValueError("Llama checkpoints with attention_bias or mlp_bias are not supported (t5lite has no biases).")
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "linear"):
        raise ValueError(f"Llama rope_type={rope_type!r} is not supported; supported: default, linear.")
    return ModelConfig(
        architecture="decoder",
        vocab_size=hf.vocab_size,
        start_id=_token_id(hf, "bos_token_id", 1),
        eos_id=_token_id(hf, "eos_token_id", 2),
        d_model=hf.hidden_size,
        num_heads=hf.num_attention_heads,
        num_kv_heads=hf.num_key_value_heads,
        head_dim=hf.head_dim,
        d_ff=hf.intermediate_size,
        num_encoder_layers=0,
        num_decoder_layers=hf.num_hidden_layers,
        mlp_activation="swiglu",
        norm="rms",
        norm_epsilon=hf.rms_norm_eps,
        residual="pre",
        position_encoding="rope",
        rope_theta=float(rope.get("rope_theta", 10_000.0)),
        rope_scaling="linear" if rope_type == "linear" else "none",
        rope_scaling_factor=float(rope.get("factor", 1.0)) if rope_type == "linear" else 1.0,
        max_length=hf.max_position_embeddings,
        scale_attention_by_head_dim=True,
        tie_embeddings=bool(hf.tie_word_embeddings),
        dtype=dtype,
    )


def _token_id(hf: Any, name: str, default: int) -> int:
    """A special token id of an HF config; a list of EOS ids (Llama 3) is refused, t5lite stops at one."""
    value = getattr(hf, name, None)
    value = default if value is None else value
    if not isinstance(value, int):
        raise ValueError(f"The Hugging Face config's {name}={value!r} is not one token id; t5lite needs one.")
    return value


def hf_config_from(config: ModelConfig):
    """The transformers config for a t5lite config, or ValueError naming what HF cannot express."""
    import transformers

    _check_exportable(config)
    if config.is_encoder_decoder:
        _require(
            config,
            "T5",
            position_encoding="relative",
            norm="rms",
            residual="pre",
            scale_attention_by_head_dim=False,
            sliding_window=None,
            num_kv_heads=(None, config.num_heads),
        )
        hf = transformers.T5Config(
            vocab_size=config.vocab_size,
            d_model=config.d_model,
            d_kv=config.head_dim,
            d_ff=config.d_ff,
            num_layers=config.num_encoder_layers,
            num_decoder_layers=config.num_decoder_layers,
            num_heads=config.num_heads,
            relative_attention_num_buckets=config.relative_num_buckets,
            relative_attention_max_distance=config.relative_max_distance,
            dropout_rate=config.dropout_rate,
            layer_norm_epsilon=config.norm_epsilon,
            feed_forward_proj=_T5_EXPORT_ACTIVATIONS[config.mlp_activation],
            tie_word_embeddings=config.rescale_tied_logits,
            decoder_start_token_id=config.start_id,
            eos_token_id=config.eos_id,
            pad_token_id=0,
        )
        hf.tie_word_embeddings = config.tie_embeddings  # transformers 5 forces True in __init__
        return hf
    _require(
        config,
        "Llama",
        position_encoding="rope",
        norm="rms",
        residual="pre",
        mlp_activation="swiglu",
        scale_attention_by_head_dim=True,
        sliding_window=None,
        rope_scaling=("none", "linear"),
    )
    rope = {"rope_type": "default" if config.rope_scaling == "none" else "linear", "rope_theta": config.rope_theta}
    if config.rope_scaling == "linear":
        rope["factor"] = config.rope_scaling_factor
    return transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.d_ff,
        num_hidden_layers=config.num_decoder_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.norm_epsilon,
        max_position_embeddings=config.max_length,
        rope_parameters=rope,
        tie_word_embeddings=config.tie_embeddings,
        bos_token_id=config.start_id,
        eos_token_id=config.eos_id,
        pad_token_id=0,
    )


def _check_exportable(config: ModelConfig) -> None:
    """What no Hugging Face T5 or Llama can hold."""
    if config.weight_quant.families:
        raise ValueError(
            f"This model's {', '.join(config.weight_quant.families)} kernels are stored quantised "
            f"({config.weight_quant.bits}-bit); Hugging Face T5 and Llama hold float weights. Export the "
            f"float run it was quantised from."
        )
    if config.adapters.trains_added_params or config.adapters.reward_head:
        raise ValueError(
            "Hugging Face T5 and Llama have no place for adapters (BitFit biases, a soft prompt, a reward "
            "head, unmerged LoRA); merge LoRA first (t5lite.models.lora.merge_lora) or export the base model."
        )
    if config.moe.num_experts:
        raise ValueError(
            "Exporting mixture-of-experts models to Hugging Face is not supported; t5lite imports "
            "Switch Transformers but writes only dense T5 and Llama models."
        )


def _require(config: ModelConfig, family: str, **expected) -> None:
    for field, allowed in expected.items():
        allowed = allowed if isinstance(allowed, tuple) else (allowed,)
        if getattr(config, field) not in allowed:
            raise ValueError(
                f"Cannot export to Hugging Face {family}: {field}={getattr(config, field)!r}, "
                f"but {family} needs {' or '.join(map(repr, allowed))}."
            )


# ---------------------------------------------------------------------------------------------
# Weights


def _rules(config: ModelConfig):
    return _t5_rules(config) if config.is_encoder_decoder else _llama_rules(config)


def _unscanned_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    shapes = abstract_params(config.replace(scan_layers=False))
    return {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(shapes).items()}


def params_from_state_dict(state_dict: dict[str, np.ndarray], config: ModelConfig):
    """t5lite params from a Hugging Face state dict (numpy arrays), checking every tensor is used."""
    shapes = _unscanned_shapes(config)
    flat, experts, used = {}, {}, set()
    for hf_key, path, kind, *expert in _rules(config):
        if hf_key not in state_dict:
            raise ValueError(
                f"The Hugging Face weights lack {hf_key!r}; is the checkpoint complete and of the "
                f"architecture its config names?"
            )
        weight = np.asarray(state_dict[hf_key], np.float32)
        shape = shapes[path][1:] if expert else shapes[path]
        value = weight if kind == "vector" else weight.T.reshape(shape)
        if value.shape != shape:
            raise ValueError(f"{hf_key} has shape {weight.shape}, which does not fit t5lite's {path} {shape}.")
        if expert:
            experts.setdefault(path, {})[expert[0]] = value
        else:
            flat[path] = value
        used.add(hf_key)
    flat.update({path: np.stack([by_expert[e] for e in range(len(by_expert))]) for path, by_expert in experts.items()})
    assert set(flat) == set(shapes), set(shapes) ^ set(flat)
    _check_aliases(state_dict, config)
    unused = set(state_dict) - used - set(_tied_aliases(config))
    if unused:
        raise ValueError(
            f"Hugging Face weights {sorted(unused)[:8]} have no place in t5lite's {config.architecture} "
            f"model; the config does not describe this checkpoint."
        )
    if config.scan_layers:
        flat = stack_layers(flat, config)
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def state_dict_from_params(params, config: ModelConfig) -> dict[str, np.ndarray]:
    flat = {"/".join(k): np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(params).items()}
    if config.scan_layers:
        flat = unstack_layers(flat, config)
    out = {}
    for hf_key, path, kind, *expert in _rules(config):
        value = flat[path][expert[0]] if expert else flat[path]
        if kind == "vector":
            out[hf_key] = value
        elif kind == "in":
            out[hf_key] = value.reshape(value.shape[0], -1).T
        else:
            out[hf_key] = value.reshape(-1, value.shape[-1]).T
    return out


def _tied_aliases(config: ModelConfig) -> dict[str, str]:
    """State-dict keys that must hold the same tensor as another key the rules read."""
    embedding = "shared.weight" if config.is_encoder_decoder else "model.embed_tokens.weight"
    aliases = {"lm_head.weight": embedding} if config.tie_embeddings else {}
    if config.is_encoder_decoder:
        aliases.update({"encoder.embed_tokens.weight": embedding, "decoder.embed_tokens.weight": embedding})
    return aliases


def _check_aliases(state_dict, config: ModelConfig) -> None:
    for alias, source in _tied_aliases(config).items():
        if alias in state_dict and not np.array_equal(state_dict[alias], state_dict[source]):
            raise ValueError(
                f"{alias} differs from {source}, but t5lite's model uses one table for both. transformers 5 "
                f"leaves T5's input embeddings untied when tie_word_embeddings=False; published T5 checkpoints "
                f"share them: call hf_model.set_input_embeddings(hf_model.shared) before importing."
            )


# ---------------------------------------------------------------------------------------------
# Public API


def from_torch(hf_model, dtype: str = "float32", scan_layers: bool = True):
    """(t5lite module, params) computing what `hf_model` computes. Compute dtype defaults to float32."""
    config = config_from_hf(hf_model.config, dtype).replace(scan_layers=scan_layers)
    state_dict = {k: v.detach().cpu().float().numpy() for k, v in hf_model.state_dict().items()}
    return build(config), params_from_state_dict(state_dict, config)


def to_torch(model, params):
    """A transformers PyTorch model (float32) holding `params`."""
    import torch
    import transformers

    config = model.config
    hf_config = hf_config_from(config)
    cls = transformers.T5ForConditionalGeneration if config.is_encoder_decoder else transformers.LlamaForCausalLM
    hf_model = cls(hf_config)
    state = {k: torch.from_numpy(np.array(v)) for k, v in state_dict_from_params(params, config).items()}
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    assert not set(missing) - set(_tied_aliases(config)) and not unexpected, (missing, unexpected)
    if config.is_encoder_decoder:
        hf_model.set_input_embeddings(hf_model.shared)  # one table, whatever tie_word_embeddings says
    return hf_model.eval()


def load_pretrained(directory: str | pathlib.Path, dtype: str = "float32", scan_layers: bool = True):
    """Reads a `save_pretrained` directory (config.json + weights) without touching the network."""
    import transformers

    directory = pathlib.Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory} has no config.json; pass a directory written by save_pretrained.")
    raw = json.loads(config_file.read_text())
    hf_config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    if "tie_word_embeddings" in raw:  # transformers 5 forces T5 to tied on load; restore what was saved
        hf_config.tie_word_embeddings = raw["tie_word_embeddings"]
    config_from_hf(hf_config)  # fail early, with the reason, on unsupported architectures
    seq2seq = hf_config.model_type in ("t5", "mt5", "switch_transformers")
    auto = transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModelForCausalLM
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # T5's embed_tokens aliases of `shared` are reported missing
    try:
        hf_model = auto.from_pretrained(directory, config=hf_config, local_files_only=True)
    finally:
        transformers.logging.set_verbosity(verbosity)
    if seq2seq:
        hf_model.set_input_embeddings(hf_model.shared)  # saved once under shared.weight
    return from_torch(hf_model, dtype, scan_layers)


def save_pretrained(model, params, directory: str | pathlib.Path) -> None:
    to_torch(model, params).save_pretrained(directory)
