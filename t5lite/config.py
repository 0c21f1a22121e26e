"""One frozen, validated dataclass describes every model t5lite builds.

The same fields cover T5-style encoder-decoders and causal / prefix-LM decoders; a
bad value raises `ValueError` naming the field and what it may be, when the config
is built, long before anything is initialised or written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import gin

ARCHITECTURES = ("encoder_decoder", "decoder")
MLP_ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "reglu", "geglu", "swiglu")
NORMS = ("rms", "layer")
RESIDUALS = ("pre", "post")
POSITION_ENCODINGS = ("relative", "rope", "alibi", "sinusoidal", "learned", "none")
ROPE_SCALINGS = ("none", "linear", "ntk")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("xla", "pallas", "cudnn", "auto")
INT8_DENSE_FAMILIES = ("attention", "mlp")
ACTIVATION_QUANTS = ("none", "int8", "llm_int8")
ROUTERS = ("tokens_choose", "experts_choose")
# Projections LoRA adapters can sit on: attention's query/key/value/out, the MLP's input(s) and output.
LORA_TARGETS = ("query", "key", "value", "out", "mlp_in", "mlp_out")


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """Switch-MoE (0 experts: dense). The MLP of every k-th layer (layers k-1, 2k-1, ...) of a stack is a
    mixture of experts, k = encoder_every / decoder_every (0: no experts in that stack)."""

    num_experts: int = 0
    encoder_every: int = 2
    decoder_every: int = 2
    experts_per_token: int = 1  # top-k of tokens-choose routing
    # "tokens_choose": each token picks its top-k experts (Switch, GShard); in the causal decoder, experts
    # fill their slots token by token, elsewhere all first choices go before any second choice.
    # "experts_choose": each expert picks its top tokens of a group (Zhou et al. 2022); it sees the
    # whole group, so it is not causal: encoder only (decoder_every=0).
    router: str = "tokens_choose"
    # Expert capacity per group: max(min_expert_capacity, ceil(capacity_factor * group * k / experts));
    # factor 0 makes it exactly min_expert_capacity (a fixed capacity).
    train_capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    min_expert_capacity: int = 4
    # Routes every token (no capacity): tokens sorted by expert through grouped matmuls (ragged_dot).
    dropless: bool = False
    # Tokens routed together: each sequence splits into groups of at most this many tokens.
    group_size: int = 4096
    router_jitter: float = 0.0  # inputs times U(1 - jitter, 1 + jitter) while training
    load_balance_loss: float = 0.01
    router_z_loss: float = 1e-3
    # Dropout inside the experts (Switch fine-tuning uses 0.4); None: ModelConfig.dropout_rate.
    expert_dropout_rate: float | None = None

    def __post_init__(self):
        if not isinstance(self.num_experts, int) or self.num_experts < 0:
            raise ValueError(f"num_experts={self.num_experts!r} must be 0 (dense) or a positive integer.")
        _check_choice("router", self.router, ROUTERS)
        for name in ("experts_per_token", "min_expert_capacity", "group_size"):
            _check_positive(name, getattr(self, name))
        if self.num_experts and self.experts_per_token > self.num_experts:
            raise ValueError(
                f"experts_per_token={self.experts_per_token} is larger than num_experts="
                f"{self.num_experts}: a token cannot pick more experts than there are."
            )
        if self.dropless and self.router != "tokens_choose":
            raise ValueError(
                "MoeConfig.dropless=True routes tokens to their top-k experts; set router='tokens_choose'."
            )
        if self.router == "experts_choose" and self.decoder_every:
            raise ValueError(
                "router='experts_choose' lets a token's routing depend on later tokens, which the causal "
                "decoder must not see; use it in the encoder only (decoder_every=0), or use "
                "router='tokens_choose'."
            )
        for name in ("train_capacity_factor", "eval_capacity_factor"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0 (0: exactly min_expert_capacity).")
        for name in ("router_jitter", "load_balance_loss", "router_z_loss"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0.")
        if self.expert_dropout_rate is not None and not 0.0 <= self.expert_dropout_rate < 1.0:
            raise ValueError(f"expert_dropout_rate={self.expert_dropout_rate} must be in [0, 1) or None.")
        for name in ("encoder_every", "decoder_every"):
            every = getattr(self, name)
            if not isinstance(every, int) or isinstance(every, bool) or every < 0:
                raise ValueError(f"MoeConfig.{name}={every!r} must be 0 (no experts) or a positive integer.")

    def replace(self, **changes: Any) -> MoeConfig:
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class WeightQuantConfig:
    """Inference: dense families whose kernels are stored quantised, made from a float model by
    `t5lite.quantization.weights` (`t5lite quantize`). By default int8 with a float32 scale per output
    feature, weight-only (activations and the matmul stay in `ModelConfig.dtype`)."""

    families: tuple[str, ...] = ()  # of INT8_DENSE_FAMILIES
    bits: int = 8  # or 4, two values per byte
    group_size: int | None = None  # a scale per this many inputs; None: per output feature
    zero_points: bool = False  # asymmetric ranges
    # "int" (the uniform grid) or "nf4": QLoRA's 4-bit NormalFloat, 16 levels at quantiles of N(0, 1)
    # scaled by each group's abs-max (bits=4, a group_size, no zero points).
    format: str = "int"
    # The per-group scales stored in int8 with one float32 per output feature (QLoRA's double quantisation).
    double_quant: bool = False
    input_scaling: bool = False  # a per-input-channel divisor of the inputs (AWQ, SmoothQuant)
    # "none" (weight-only), "int8" (per-token int8 activations: W8A8), "llm_int8" (int8 except input
    # features holding a value of magnitude >= outlier_threshold, which stay in `dtype`).
    activations: str = "none"
    outlier_threshold: float = 6.0

    def __post_init__(self):
        _check_families(self, "families", "WeightQuantConfig.families")
        _check_choice("activations", self.activations, ACTIVATION_QUANTS)
        if self.bits not in (8, 4):
            raise ValueError(f"WeightQuantConfig.bits={self.bits!r}: only 8 and 4 are supported.")
        group = self.group_size
        if group is not None and (not isinstance(group, int) or group < 1):
            raise ValueError(f"group_size={group!r} must be a positive int, or None for a scale per output.")
        _check_choice("format", self.format, ("int", "nf4"))
        if self.format == "nf4" and (self.bits != 4 or self.zero_points or group is None):
            raise ValueError(
                f"format='nf4' stores 4-bit indices of 16 levels scaled by each group's abs-max: set "
                f"bits=4, zero_points=False and a group_size (QLoRA uses 64), or format='int'; got "
                f"bits={self.bits}, zero_points={self.zero_points}, group_size={group}."
            )
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"double_quant={self.double_quant!r} must be True or False.")
        if self.double_quant and group is None:
            raise ValueError(
                "double_quant=True stores the scales of groups of inputs in int8; set group_size "
                "(with one scale per output feature there is nothing to save)."
            )
        simple = self.bits == 8 and group is None and not self.zero_points
        if self.activations != "none" and not simple:
            raise ValueError(
                f"activations={self.activations!r} runs int8 x int8 matmuls, which need 8-bit "
                f"symmetric weights with a scale per output: set bits=8, group_size=None, "
                f"zero_points=False, or activations='none'."
            )

    def replace(self, **changes: Any) -> WeightQuantConfig:
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """What parameter-efficient fine-tuning adds to a model, and a reward model's head.

    LoRA (Hu et al. 2021): adapters W + s·A·B of rank `lora_rank` (0: none) on `lora_targets`, B zero at
    initialisation; s = lora_alpha / rank, or lora_alpha / sqrt(rank) with rslora (Kalajdzievska 2023).
    `lora_dropout` drops the adapter's inputs while training. On a quantised base this is QLoRA-style.
    BitFit (Ben Zaken et al. 2022) trains biases only: our projections have none, so `bitfit` adds
    zero-initialised ones to every attention and MLP projection. Prompt tuning (Lester et al. 2021) trains
    `prompt_length` vectors prepended to the encoder's input embeddings (encoder-decoders, unpacked
    inputs); fine-tuned from a checkpoint they start as the embeddings of sampled vocabulary tokens.
    `reward_head`: a scalar head on the decoder's final hidden states (its value at a response's last
    token is the response's reward), trained with train.preference = @Preference(objective='reward')."""

    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("query", "value")
    lora_dropout: float = 0.0
    rslora: bool = False
    bitfit: bool = False
    prompt_length: int = 0
    reward_head: bool = False

    def __post_init__(self):
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"lora_rank={self.lora_rank!r} must be 0 (no adapters) or a positive integer.")
        targets = self.lora_targets
        if not isinstance(targets, (tuple, list)) or not targets or len(set(targets)) != len(targets):
            raise ValueError(
                f"lora_targets={targets!r} must be a non-empty tuple of distinct projections from: "
                f"{', '.join(LORA_TARGETS)}."
            )
        for target in targets:
            _check_choice("lora_targets", target, LORA_TARGETS)
        object.__setattr__(self, "lora_targets", tuple(targets))  # JSON and gin give lists
        if not isinstance(self.prompt_length, int) or self.prompt_length < 0:
            raise ValueError(f"prompt_length={self.prompt_length!r} must be 0 (no prompt) or a positive integer.")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha={self.lora_alpha} must be > 0.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout} must be in [0, 1).")

    @property
    def trains_added_params(self) -> bool:
        """Whether fine-tuning trains only what the adapters add (LoRA, BitFit, a soft prompt)."""
        return bool(self.lora_rank or self.bitfit or self.prompt_length)

    def replace(self, **changes: Any) -> AdapterConfig:
        return dataclasses.replace(self, **changes)


# The sub-configs, by the ModelConfig field that holds them.
SUBCONFIGS = {"moe": MoeConfig, "weight_quant": WeightQuantConfig, "adapters": AdapterConfig}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a Transformer; names follow T5X where T5X has one. The architecture is flat;
    mixture of experts, stored quantised weights and adapters are sub-configs."""

    architecture: str = "encoder_decoder"
    vocab_size: int = 32128
    # Token ids the model was trained with: the decoder's first input (T5's 0, which is also padding;
    # Llama's BOS 1) and the end of a sequence (T5 1, Llama 2). Data and decoding use them; padding is 0.
    start_id: int = 0
    eos_id: int = 1
    d_model: int = 512
    num_heads: int = 8
    # None means multi-head attention (as many key/value heads as query heads); 1 is MQA.
    num_kv_heads: int | None = None
    head_dim: int = 64
    d_ff: int = 2048
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    mlp_activation: str = "relu"
    norm: str = "rms"
    norm_epsilon: float = 1e-6
    residual: str = "pre"
    position_encoding: str = "relative"
    relative_num_buckets: int = 32
    relative_max_distance: int = 128
    rope_theta: float = 10_000.0
    rope_scaling: str = "none"
    rope_scaling_factor: float = 1.0
    # Longest sequence for learned absolute positions (and the NTK scaling reference).
    max_length: int = 2048
    # T5 scales queries at initialisation instead of dividing scores by sqrt(head_dim).
    scale_attention_by_head_dim: bool = False
    tie_embeddings: bool = True
    # T5 v1.0 multiplies the decoder output by d_model**-0.5 before the tied projection.
    rescale_tied_logits: bool = False
    # Local attention: a query sees keys at most `sliding_window - 1` positions away,
    # plus the first `attention_sinks` positions of its sequence (Λ-shaped mask).
    sliding_window: int | None = None
    attention_sinks: int = 0
    dropout_rate: float = 0.0
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    # On a mesh with a `stage` axis (pipeline parallelism, t5lite.models.pipeline): the batch splits
    # into this many microbatches (0: one per stage), and each stage runs this many chunks of its
    # stack's layers (1: GPipe; more: a circular schedule with a smaller bubble).
    pipeline_microbatches: int = 0
    pipeline_repeats: int = 1
    # "xla" materialises scores; "pallas" is the flash kernel (masks and biases computed per tile);
    # "cudnn" is jax.nn.dot_product_attention on a GPU; "auto" picks pallas on TPU/GPU, xla on CPU.
    attention_impl: str = "xla"
    # Dense families whose matmuls run in int8 (straight-through gradients): "attention" (q, k, v,
    # out projections), "mlp". Query-key products and the output logits stay in `dtype`.
    int8_dense: tuple[str, ...] = ()
    moe: MoeConfig = dataclasses.field(default_factory=MoeConfig)
    weight_quant: WeightQuantConfig = dataclasses.field(default_factory=WeightQuantConfig)
    adapters: AdapterConfig = dataclasses.field(default_factory=AdapterConfig)

    def __post_init__(self):
        _check_choice("architecture", self.architecture, ARCHITECTURES)
        _check_choice("mlp_activation", self.mlp_activation, MLP_ACTIVATIONS)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("residual", self.residual, RESIDUALS)
        _check_choice("position_encoding", self.position_encoding, POSITION_ENCODINGS)
        _check_choice("rope_scaling", self.rope_scaling, ROPE_SCALINGS)
        _check_choice("remat_policy", self.remat_policy, REMAT_POLICIES)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("param_dtype", self.param_dtype, DTYPES)
        _check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        _check_families(self, "int8_dense")
        for name, cls in SUBCONFIGS.items():
            if not isinstance(getattr(self, name), cls):
                raise ValueError(
                    f"ModelConfig.{name}={getattr(self, name)!r} must be a {cls.__name__} "
                    f"(gin: ModelConfig.{name} = @{cls.__name__}())."
                )
        both = set(self.int8_dense) & set(self.weight_quant.families)
        if both:
            raise ValueError(
                f"{sorted(both)} are in both int8_dense (int8 matmuls for training) and "
                f"WeightQuantConfig.families (stored quantised weights for inference); pick one per "
                f"family."
            )
        for name in (
            "vocab_size",
            "d_model",
            "num_heads",
            "head_dim",
            "d_ff",
            "num_decoder_layers",
            "relative_num_buckets",
            "relative_max_distance",
            "max_length",
            "pipeline_repeats",
        ):
            _check_positive(name, getattr(self, name))
        if not isinstance(self.pipeline_microbatches, int) or self.pipeline_microbatches < 0:
            raise ValueError(
                f"pipeline_microbatches={self.pipeline_microbatches!r} must be a positive integer, or 0 for "
                f"one microbatch per pipeline stage."
            )
        if not (0 <= self.start_id < self.vocab_size and 0 < self.eos_id < self.vocab_size):
            raise ValueError(
                f"start_id={self.start_id} and eos_id={self.eos_id} must be ids of the vocabulary "
                f"(vocab_size={self.vocab_size}); eos_id cannot be 0, which is padding."
            )
        if self.architecture == "encoder_decoder":
            _check_positive("num_encoder_layers", self.num_encoder_layers)
        if self.num_kv_heads is not None:
            _check_positive("num_kv_heads", self.num_kv_heads)
            if self.num_heads % self.num_kv_heads:
                raise ValueError(
                    f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}: each "
                    f"key/value head serves a whole group of query heads. Allowed values: "
                    f"{divisors(self.num_heads)}."
                )
        if self.position_encoding == "rope" and self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even with position_encoding='rope'.")
        if self.position_encoding == "sinusoidal" and self.d_model % 2:
            raise ValueError(f"d_model={self.d_model} must be even with position_encoding='sinusoidal'.")
        if self.rope_scaling_factor < 1.0:
            raise ValueError(f"rope_scaling_factor={self.rope_scaling_factor} must be >= 1.0 (1.0 is no scaling).")
        if self.sliding_window is not None:
            _check_positive("sliding_window", self.sliding_window)
        if self.attention_sinks < 0:
            raise ValueError(f"attention_sinks={self.attention_sinks} must be >= 0.")
        if self.attention_sinks and self.sliding_window is None:
            raise ValueError("attention_sinks only make sense with a sliding_window; set both or neither.")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate={self.dropout_rate} must be in [0, 1).")
        if self.norm_epsilon <= 0:
            raise ValueError(f"norm_epsilon={self.norm_epsilon} must be > 0.")
        if self.rescale_tied_logits and not self.tie_embeddings:
            raise ValueError("rescale_tied_logits=True needs tie_embeddings=True (it rescales the tied projection).")
        self._check_moe_stacks()
        _check_quantised_kernels(self)
        self._check_adapters()

    def _check_moe_stacks(self):
        if not self.moe.num_experts:
            return
        stacks = {"decoder": (self.moe.decoder_every, self.num_decoder_layers)}
        if self.is_encoder_decoder:
            stacks["encoder"] = (self.moe.encoder_every, self.num_encoder_layers)
        for stack, (every, layers) in stacks.items():
            if every and layers % every:
                raise ValueError(
                    f"MoeConfig.{stack}_every={every} must be 0 (no experts) or divide "
                    f"num_{stack}_layers={layers}; choose from {divisors(layers)}."
                )
        if not any(every for every, _ in stacks.values()):
            raise ValueError(
                f"num_experts={self.moe.num_experts} but no stack has MoE layers; set "
                f"{' or '.join(f'MoeConfig.{stack}_every' for stack in stacks)} to a positive integer."
            )

    def _check_adapters(self):
        adapters = self.adapters
        if adapters.prompt_length and not self.is_encoder_decoder:
            raise ValueError(
                f"prompt_length={adapters.prompt_length}: prompt tuning prepends to the encoder's "
                f"inputs, and architecture={self.architecture!r} has no encoder. Use LoRA (lora_rank) "
                f"or BitFit (bitfit=True) on a decoder."
            )
        if adapters.lora_rank and self.moe.num_experts and {"mlp_in", "mlp_out"} & set(adapters.lora_targets):
            raise ValueError(
                "LoRA on the MLPs of a mixture of experts is not supported; adapt attention projections "
                "only (lora_targets without mlp_in, mlp_out)."
            )

    @property
    def layer_stacks(self) -> dict[str, int]:
        """The model's layer stacks and their depths."""
        depths = {"decoder": self.num_decoder_layers}
        if self.is_encoder_decoder:
            depths["encoder"] = self.num_encoder_layers
        return depths

    def moe_every(self, stack: str) -> int:
        """k when every k-th layer of the stack ("encoder" or "decoder") is MoE, else 0."""
        if not self.moe.num_experts or (stack == "encoder" and not self.is_encoder_decoder):
            return 0
        return self.moe.encoder_every if stack == "encoder" else self.moe.decoder_every

    def num_moe_layers(self, stack: str) -> int:
        every = self.moe_every(stack)
        layers = self.num_encoder_layers if stack == "encoder" else self.num_decoder_layers
        return layers // every if every else 0

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def query_dim(self) -> int:
        """The width of all query heads together: the query projection's outputs, the output's inputs."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """The width of all key (or value) heads together."""
        return self.kv_heads * self.head_dim

    @property
    def is_encoder_decoder(self) -> bool:
        return self.architecture == "encoder_decoder"

    def differences(self, other: ModelConfig, ignore: Sequence[str] = ()) -> str:
        """The fields (but `ignore`: names, or a sub-config's "moe.router" / whole "adapters") where `self`
        (there) and `other` (here) differ, for error messages; empty when none."""
        mine, theirs = _flat_fields(self), _flat_fields(other)
        return ", ".join(
            f"{name}: {value!r} there, {theirs[name]!r} here"
            for name, value in mine.items()
            if name not in ignore and name.split(".")[0] not in ignore and value != theirs[name]
        )

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        """Reads `to_json`'s output, or a flat config of t5lite before the sub-configs (migrated)."""
        fields = nest_flat_fields(json.loads(text))
        unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
        for name, sub in SUBCONFIGS.items():
            unknown |= {
                f"{name}.{key}" for key in set(fields.get(name, {})) - {f.name for f in dataclasses.fields(sub)}
            }
        if unknown:
            raise ValueError(f"Unknown ModelConfig fields {sorted(unknown)}; was this written by a newer t5lite?")
        return cls(**{key: SUBCONFIGS[key](**value) if key in SUBCONFIGS else value for key, value in fields.items()})


# Flat ModelConfig fields of t5lite before the sub-configs: old name -> (sub-config field, its name).
FLAT_FIELDS = {
    **{
        old: ("moe", old.replace("moe_", ""))
        for old in (
            "num_experts",
            "encoder_moe_every",
            "decoder_moe_every",
            "experts_per_token",
            "router",
            "train_capacity_factor",
            "eval_capacity_factor",
            "min_expert_capacity",
            "moe_dropless",
            "moe_group_size",
            "router_jitter",
            "load_balance_loss",
            "router_z_loss",
            "expert_dropout_rate",
        )
    },
    "int8_weights": ("weight_quant", "families"),
    "weight_bits": ("weight_quant", "bits"),
    "weight_group_size": ("weight_quant", "group_size"),
    "weight_zero_points": ("weight_quant", "zero_points"),
    "weight_format": ("weight_quant", "format"),
    "weight_double_quant": ("weight_quant", "double_quant"),
    "input_scaling": ("weight_quant", "input_scaling"),
    "activation_quant": ("weight_quant", "activations"),
    "llm_int8_threshold": ("weight_quant", "outlier_threshold"),
    **{
        old: ("adapters", old)
        for old in (
            "lora_rank",
            "lora_alpha",
            "lora_targets",
            "lora_dropout",
            "rslora",
            "bitfit",
            "prompt_length",
            "reward_head",
        )
    },
}


def nest_flat_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """A flat field dict of the old layout moved into sub-config dicts (new layouts pass unchanged)."""
    nested = {key: dict(value) if key in SUBCONFIGS else value for key, value in fields.items()}
    for old, (sub, name) in FLAT_FIELDS.items():
        if old in nested:
            nested.setdefault(sub, {})[name] = nested.pop(old)
    return nested


def _flat_fields(config) -> dict[str, Any]:
    """A config's fields, sub-config fields as "moe.num_experts"."""
    flat = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            flat.update({f"{field.name}.{name}": sub for name, sub in _flat_fields(value).items()})
        else:
            flat[field.name] = value
    return flat


def _check_families(config, name: str, label: str | None = None) -> None:
    families = getattr(config, name)
    label = label or name
    if not isinstance(families, (tuple, list)) or len(set(families)) != len(families):
        raise ValueError(
            f"{label}={families!r} must be a tuple of distinct families from: "
            f"{', '.join(INT8_DENSE_FAMILIES)} (e.g. ('attention', 'mlp'))."
        )
    for family in families:
        _check_choice(label, family, INT8_DENSE_FAMILIES)
    object.__setattr__(config, name, tuple(families))  # JSON and gin give lists


def _check_quantised_kernels(config: ModelConfig) -> None:
    """Groups of inputs and packed 4-bit pairs must fit every quantised kernel of this model."""
    quant = config.weight_quant
    # Each quantised family's kernels: (inputs K, last input axis), e.g. `out` takes [heads, head_dim].
    kernels = {
        "attention": [(config.d_model, config.d_model), (config.query_dim, config.head_dim)],
        "mlp": [(config.d_model, config.d_model), (config.d_ff, config.d_ff)],
    }
    shapes = [shape for family in quant.families for shape in kernels[family]]
    if quant.group_size is not None and any(k % quant.group_size for k, _ in shapes):
        raise ValueError(
            f"WeightQuantConfig.group_size={quant.group_size} must divide the inputs of every quantised "
            f"kernel ({sorted({k for k, _ in shapes})}); pick a common divisor, or None for a scale per "
            f"output."
        )
    if quant.bits == 4 and any(last % 2 for _, last in shapes):
        raise ValueError(
            f"4-bit weights pack two values per byte along each kernel's last input axis "
            f"({sorted({last for _, last in shapes})}), which must be even; use bits=8."
        )


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported. Allowed values: {', '.join(allowed)}.")


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _check_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer.")


# Gin binds `ModelConfig.<field>` and `MoeConfig.<field>`, ...; the classes themselves stay free of gin so
# that configs built in Python (the registry, checkpoints) never pick up a user's gin bindings.
GinModelConfig = gin.external_configurable(ModelConfig, name="ModelConfig", module="t5lite")
GIN_SUBCONFIGS = {
    name: gin.external_configurable(cls, name=cls.__name__, module="t5lite") for name, cls in SUBCONFIGS.items()
}
# Parsed before any file, so that `MoeConfig.num_experts = 8` alone configures the model's experts.
SUBCONFIG_BINDINGS = [f"ModelConfig.{name} = @{cls.__name__}()" for name, cls in SUBCONFIGS.items()]

# The gin files of a source checkout; `include 'models/t5_1_1/base.gin'` resolves against it.
GIN_CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "gin_configs"


def parse_gin(files: Sequence[str], bindings: Sequence[str] = ()) -> None:
    """Replaces the gin state with these files (looked up as given, then under gin_configs/) and bindings.
    Flat bindings of the old layout (`ModelConfig.num_experts = 8`, as runs saved them) are migrated."""
    search = [pathlib.Path.cwd(), GIN_CONFIG_DIR]
    texts = []
    for name in files:
        found = [root / name for root in search if (root / name).is_file()]
        if not found:
            raise FileNotFoundError(
                f"Gin file {name!r} not found in {', '.join(map(str, search))}. Shipped configs: "
                f"runs/*.gin, models/<family>/<size>.gin and sharding/*.gin under "
                f"{GIN_CONFIG_DIR}."
            )
        texts.append(migrate_gin(found[0].read_text()))
    if GIN_CONFIG_DIR.is_dir():
        gin.add_config_file_search_path(str(GIN_CONFIG_DIR))
    gin.clear_config()
    with _quiet_gin_search():
        try:
            gin.parse_config(SUBCONFIG_BINDINGS + texts + [migrate_gin(binding) for binding in bindings])
            gin.finalize()
        except (ValueError, KeyError) as error:
            raise ValueError(f"Bad gin configuration: {error}{_moved_hint(str(error))}") from error
        except SyntaxError as error:
            raise ValueError(_syntax_message(error)) from None


def _syntax_message(error: SyntaxError) -> str:
    """Gin values are Python literals: an unquoted path or name is the usual mistake."""
    line = (error.text or "").strip()
    name, _, value = line.partition("=")
    message = f"Bad gin syntax ({error.msg}) in: {line}"
    if value.strip() and value.strip()[0] not in "'\"@%([{":
        message += (
            f". Values are Python literals: quote strings, e.g. "
            f"--gin.{name.strip()}=\"'{value.strip()}'\" (in a gin file: {name.strip()} = '{value.strip()}')."
        )
    return message


def gin_bindings(config: ModelConfig, relative_to: ModelConfig | None = None, always: Sequence[str] = ()) -> list[str]:
    """`config`'s fields as gin binding lines: all of them (a run's gin file pins the whole model), or
    those that differ from `relative_to`'s and those named in `always` ("d_model", "moe.router")."""
    lines = []
    for name, value in _flat_fields(config).items():
        if relative_to is None or name in always or value != _flat_fields(relative_to)[name]:
            sub, _, field = name.rpartition(".")
            lines.append(f"{SUBCONFIGS[sub].__name__ if sub else 'ModelConfig'}.{field} = {value!r}")
    return lines


def check_gin_is_t5lite(text: str, source: str) -> None:
    """Refuses gin text that would run code from outside t5lite when parsed: an `import` of another
    module (importing runs it), an `include`, or a reference to a configurable registered outside
    t5lite. A run's config.gin, as t5lite writes it, holds none of these; one from elsewhere might."""
    outside = []
    for line in text.splitlines():
        statement = re.match(r"^\s*(import|from|include)\s+(\S+)", line)
        if statement and statement[1] != "include" and _is_t5lite(statement[2]):
            importlib.import_module(statement[2])  # registers the configurables referenced below
        elif statement:
            outside.append(f"{statement[1]} {statement[2]}")
    for name in re.findall(r"@(?:[\w.]+/)*([\w.]+)", text):
        try:
            configurable = gin.config._REGISTRY.get_match(name)  # noqa: SLF001 (gin has no public lookup)
        except (KeyError, ValueError):
            configurable = None
        if configurable is None or not _is_t5lite(configurable.module):
            outside.append(f"@{name}")
    if outside:
        raise ValueError(
            f"{source} would run code from outside t5lite ({', '.join(dict.fromkeys(outside))}). Opening a run "
            f"parses its config.gin; pass --trust_run only for a run whose author you trust."
        )


def _is_t5lite(module: str) -> bool:
    return module == "t5lite" or module.startswith("t5lite.")


def binding_values(text: str) -> dict[str, str]:
    """The `name = value` bindings of gin text as t5lite writes it (a run's config.gin), flat ones of
    the old layout migrated, each value as written (continuation lines joined)."""
    values, name = {}, None
    for line in migrate_gin(text).splitlines():
        binding = re.match(r"^([\w./]+) = (.*)$", line)
        if binding:
            name, values[binding[1]] = binding[1], binding[2]
        elif name and line.startswith((" ", "\t", ")", "]", "}")):
            values[name] += " " + line.strip()
        else:
            name = None
    return values


def migrate_gin(text: str) -> str:
    """Gin text with each `ModelConfig.<old flat field> = ...` binding moved to its sub-config."""

    def move(match: re.Match) -> str:
        sub, name = FLAT_FIELDS[match.group(2)]
        return f"{match.group(1)}{SUBCONFIGS[sub].__name__}.{name}"

    return _FLAT_BINDING.sub(move, text)


_FLAT_BINDING = re.compile(
    r"^(\s*(?:[\w.]*/)?(?:t5lite\.)?)ModelConfig\.(" + "|".join(FLAT_FIELDS) + r")\b", re.MULTILINE
)


def _moved_hint(message: str) -> str:
    """Where an old flat field named in a gin error (say, from an included file) lives now."""
    moved = [
        f"{old} is now {SUBCONFIGS[sub].__name__}.{name}"
        for old, (sub, name) in FLAT_FIELDS.items()
        if re.search(rf"\b{old}\b", message)
    ]
    return f" ({'; '.join(moved)})" if moved and "ModelConfig" in message else ""


def model_config_from_gin(files: Sequence[str], bindings: Sequence[str] = ()) -> ModelConfig:
    """Parses gin files and bindings (replacing any gin state) and returns the ModelConfig they bind."""
    parse_gin(files, bindings)
    return GinModelConfig()


@contextlib.contextmanager
def _quiet_gin_search():
    """gin logs an error for every search path an `include` is not found on before it is found."""
    quiet = logging.Filter()
    quiet.filter = lambda record: not record.getMessage().startswith("Path not found")
    logging.getLogger().addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(quiet)
