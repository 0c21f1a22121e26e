"""One frozen, validated dataclass describes every model t5lite builds.

The same fields cover T5-style encoder-decoders and causal / prefix-LM decoders; a
bad value raises `ValueError` naming the field and what it may be, when the config
is built, long before anything is initialised or written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import pathlib
from typing import Any, Sequence

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
class ModelConfig:
    """Hyperparameters of a Transformer; names follow T5X where T5X has one."""

    architecture: str = "encoder_decoder"
    vocab_size: int = 32128
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
    # "xla" materialises scores; "pallas" is the flash kernel (masks and biases computed per tile);
    # "cudnn" is jax.nn.dot_product_attention on a GPU; "auto" picks pallas on TPU/GPU, xla on CPU.
    attention_impl: str = "xla"
    # Dense families whose matmuls run in int8 (straight-through gradients): "attention" (q, k, v,
    # out projections), "mlp". Query-key products and the output logits stay in `dtype`.
    int8_dense: tuple[str, ...] = ()
    # Inference: dense families whose kernels are stored quantised (int8 bytes), made from a float
    # model by `t5lite.quantization.weights` (`t5lite quantize`). By default int8 with a float32
    # scale per output feature, weight-only (activations and the matmul stay in `dtype`).
    int8_weights: tuple[str, ...] = ()
    weight_bits: int = 8  # or 4, two values per byte
    weight_group_size: int | None = None  # a scale per this many inputs; None: per output feature
    weight_zero_points: bool = False  # asymmetric ranges
    # "int" (the uniform grid) or "nf4": QLoRA's 4-bit NormalFloat, 16 levels at quantiles of N(0, 1)
    # scaled by each group's abs-max (weight_bits=4, a weight_group_size, no zero points).
    weight_format: str = "int"
    # The per-group scales stored in int8 with one float32 per output feature (QLoRA's double quantisation).
    weight_double_quant: bool = False
    input_scaling: bool = False  # a per-input-channel divisor of the inputs (AWQ, SmoothQuant)
    # "none" (weight-only), "int8" (per-token int8 activations: W8A8), "llm_int8" (int8 except
    # input features holding a value of magnitude >= llm_int8_threshold, which stay in `dtype`).
    activation_quant: str = "none"
    llm_int8_threshold: float = 6.0
    # LoRA (Hu et al. 2021): adapters W + s·A·B of rank `lora_rank` (0: none) on `lora_targets`, B zero at
    # initialisation; s = lora_alpha / rank, or lora_alpha / sqrt(rank) with rslora (Kalajdzievska 2023).
    # `lora_dropout` drops the adapter's inputs while training. On an int8_weights base this is QLoRA-style.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("query", "value")
    lora_dropout: float = 0.0
    rslora: bool = False
    # Cheaper parameter-efficient fine-tuning. BitFit (Ben Zaken et al. 2022) trains biases only: our
    # projections have none, so `bitfit` adds zero-initialised ones to every attention and MLP projection.
    # Prompt tuning (Lester et al. 2021) trains `prompt_length` vectors prepended to the encoder's
    # input embeddings (encoder-decoders, unpacked inputs); fine-tuned from a checkpoint they start as
    # the embeddings of sampled vocabulary tokens.
    bitfit: bool = False
    prompt_length: int = 0
    # A reward model: a scalar head on the decoder's final hidden states (its value at a response's
    # last token is the response's reward), trained with train.preference = @Preference(objective='reward').
    reward_head: bool = False
    # Switch-MoE (0 experts: dense). The MLP of every k-th layer (layers k-1, 2k-1, ...) of a stack
    # is a mixture of experts, k = encoder_moe_every / decoder_moe_every (0: no experts in that stack).
    num_experts: int = 0
    encoder_moe_every: int = 2
    decoder_moe_every: int = 2
    experts_per_token: int = 1  # top-k of tokens-choose routing
    # "tokens_choose": each token picks its top-k experts (Switch, GShard); in the causal decoder, experts
    # fill their slots token by token, elsewhere all first choices go before any second choice.
    # "experts_choose": each expert picks its top tokens of a group (Zhou et al. 2022); it sees the
    # whole group, so it is not causal: encoder only (decoder_moe_every=0).
    router: str = "tokens_choose"
    # Expert capacity per group: max(min_expert_capacity, ceil(capacity_factor * group * k / experts));
    # factor 0 makes it exactly min_expert_capacity (a fixed capacity).
    train_capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    min_expert_capacity: int = 4
    # Routes every token (no capacity): tokens sorted by expert through grouped matmuls (ragged_dot).
    moe_dropless: bool = False
    # Tokens routed together: each sequence splits into groups of at most this many tokens.
    moe_group_size: int = 4096
    router_jitter: float = 0.0  # inputs times U(1 - jitter, 1 + jitter) while training
    load_balance_loss: float = 0.01
    router_z_loss: float = 1e-3
    # Dropout inside the experts (Switch fine-tuning uses 0.4); None: dropout_rate.
    expert_dropout_rate: float | None = None

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
        for name in ("int8_dense", "int8_weights"):
            _check_families(self, name)
        both = set(self.int8_dense) & set(self.int8_weights)
        if both:
            raise ValueError(f"{sorted(both)} are in both int8_dense (int8 matmuls for training) and int8_weights "
                             f"(stored int8 weights for inference); pick one per family.")
        _check_weight_quant(self)
        _check_adapters(self)
        for name in ("vocab_size", "d_model", "num_heads", "head_dim", "d_ff", "num_decoder_layers",
                     "relative_num_buckets", "relative_max_distance", "max_length"):
            _check_positive(name, getattr(self, name))
        if self.architecture == "encoder_decoder":
            _check_positive("num_encoder_layers", self.num_encoder_layers)
        if self.num_kv_heads is not None:
            _check_positive("num_kv_heads", self.num_kv_heads)
            if self.num_heads % self.num_kv_heads:
                raise ValueError(
                    f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}: each "
                    f"key/value head serves a whole group of query heads. Allowed values: "
                    f"{divisors(self.num_heads)}.")
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
        self._check_moe()

    def _check_moe(self):
        if not isinstance(self.num_experts, int) or self.num_experts < 0:
            raise ValueError(f"num_experts={self.num_experts!r} must be 0 (dense) or a positive integer.")
        if not self.num_experts:
            return
        _check_choice("router", self.router, ROUTERS)
        for name in ("experts_per_token", "min_expert_capacity", "moe_group_size"):
            _check_positive(name, getattr(self, name))
        if self.experts_per_token > self.num_experts:
            raise ValueError(f"experts_per_token={self.experts_per_token} is larger than num_experts="
                             f"{self.num_experts}: a token cannot pick more experts than there are.")
        if self.moe_dropless and self.router != "tokens_choose":
            raise ValueError("moe_dropless=True routes tokens to their top-k experts; set router='tokens_choose'.")
        if self.router == "experts_choose" and self.decoder_moe_every:
            raise ValueError("router='experts_choose' lets a token's routing depend on later tokens, which the causal "
                             "decoder must not see; use it in the encoder only (decoder_moe_every=0), or use "
                             "router='tokens_choose'.")
        for name in ("train_capacity_factor", "eval_capacity_factor"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0 (0: exactly min_expert_capacity).")
        for name in ("router_jitter", "load_balance_loss", "router_z_loss"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0.")
        if self.expert_dropout_rate is not None and not 0.0 <= self.expert_dropout_rate < 1.0:
            raise ValueError(f"expert_dropout_rate={self.expert_dropout_rate} must be in [0, 1) or None.")
        stacks = {"decoder": (self.decoder_moe_every, self.num_decoder_layers)}
        if self.is_encoder_decoder:
            stacks["encoder"] = (self.encoder_moe_every, self.num_encoder_layers)
        for stack, (every, layers) in stacks.items():
            if not isinstance(every, int) or every < 0 or (every and layers % every):
                raise ValueError(f"{stack}_moe_every={every!r} must be 0 (no experts) or a positive integer "
                                 f"dividing num_{stack}_layers={layers}; choose from {divisors(layers)}.")
        if not any(every for every, _ in stacks.values()):
            raise ValueError(f"num_experts={self.num_experts} but no stack has MoE layers; set "
                             f"{' or '.join(f'{stack}_moe_every' for stack in stacks)} to a positive integer.")

    def moe_every(self, stack: str) -> int:
        """k when every k-th layer of the stack ("encoder" or "decoder") is MoE, else 0."""
        if not self.num_experts or (stack == "encoder" and not self.is_encoder_decoder):
            return 0
        return self.encoder_moe_every if stack == "encoder" else self.decoder_moe_every

    def num_moe_layers(self, stack: str) -> int:
        every = self.moe_every(stack)
        layers = self.num_encoder_layers if stack == "encoder" else self.num_decoder_layers
        return layers // every if every else 0

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def is_encoder_decoder(self) -> bool:
        return self.architecture == "encoder_decoder"

    def differences(self, other: "ModelConfig", ignore: Sequence[str] = ()) -> str:
        """The fields (but `ignore`) where `self` (there) and `other` (here) differ, for error messages;
        empty when none."""
        return ", ".join(f"{f.name}: {getattr(self, f.name)!r} there, {getattr(other, f.name)!r} here"
                         for f in dataclasses.fields(self)
                         if f.name not in ignore and getattr(self, f.name) != getattr(other, f.name))

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        fields = json.loads(text)
        unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"Unknown ModelConfig fields {sorted(unknown)}; was this written by a newer t5lite?")
        return cls(**fields)


def _check_families(config: ModelConfig, name: str) -> None:
    families = getattr(config, name)
    if not isinstance(families, (tuple, list)) or len(set(families)) != len(families):
        raise ValueError(f"{name}={families!r} must be a tuple of distinct families from: "
                         f"{', '.join(INT8_DENSE_FAMILIES)} (e.g. ('attention', 'mlp')).")
    for family in families:
        _check_choice(name, family, INT8_DENSE_FAMILIES)
    object.__setattr__(config, name, tuple(families))  # JSON and gin give lists


def _check_weight_quant(config: ModelConfig) -> None:
    _check_choice("activation_quant", config.activation_quant, ACTIVATION_QUANTS)
    if config.weight_bits not in (8, 4):
        raise ValueError(f"weight_bits={config.weight_bits!r}: only 8 and 4 are supported.")
    group = config.weight_group_size
    if group is not None and (not isinstance(group, int) or group < 1):
        raise ValueError(f"weight_group_size={group!r} must be a positive int, or None for a scale per output.")
    # Each quantised family's kernels: (inputs K, last input axis), e.g. `out` takes [heads, head_dim].
    kernels = {"attention": [(config.d_model, config.d_model), (config.num_heads * config.head_dim, config.head_dim)],
               "mlp": [(config.d_model, config.d_model), (config.d_ff, config.d_ff)]}
    shapes = [shape for family in config.int8_weights for shape in kernels[family]]
    if group is not None and any(k % group for k, _ in shapes):
        raise ValueError(f"weight_group_size={group} must divide the inputs of every quantised kernel "
                         f"({sorted({k for k, _ in shapes})}); pick a common divisor, or None for a scale per output.")
    _check_choice("weight_format", config.weight_format, ("int", "nf4"))
    if config.weight_format == "nf4" and (config.weight_bits != 4 or config.weight_zero_points or group is None):
        raise ValueError(f"weight_format='nf4' stores 4-bit indices of 16 levels scaled by each group's abs-max: set "
                         f"weight_bits=4, weight_zero_points=False and a weight_group_size (QLoRA uses 64), or "
                         f"weight_format='int'; got weight_bits={config.weight_bits}, weight_zero_points="
                         f"{config.weight_zero_points}, weight_group_size={group}.")
    if not isinstance(config.weight_double_quant, bool):
        raise ValueError(f"weight_double_quant={config.weight_double_quant!r} must be True or False.")
    if config.weight_double_quant and group is None:
        raise ValueError("weight_double_quant=True stores the scales of groups of inputs in int8; set "
                         "weight_group_size (with one scale per output feature there is nothing to save).")
    if config.weight_bits == 4 and any(last % 2 for _, last in shapes):
        raise ValueError(f"4-bit weights pack two values per byte along each kernel's last input axis "
                         f"({sorted({last for _, last in shapes})}), which must be even; use weight_bits=8.")
    simple = config.weight_bits == 8 and group is None and not config.weight_zero_points
    if config.activation_quant != "none" and not simple:
        raise ValueError(f"activation_quant={config.activation_quant!r} runs int8 x int8 matmuls, which need 8-bit "
                         f"symmetric weights with a scale per output: set weight_bits=8, weight_group_size=None, "
                         f"weight_zero_points=False, or activation_quant='none'.")


def _check_adapters(config: ModelConfig) -> None:
    if not isinstance(config.lora_rank, int) or config.lora_rank < 0:
        raise ValueError(f"lora_rank={config.lora_rank!r} must be 0 (no adapters) or a positive integer.")
    targets = config.lora_targets
    if not isinstance(targets, (tuple, list)) or not targets or len(set(targets)) != len(targets):
        raise ValueError(f"lora_targets={targets!r} must be a non-empty tuple of distinct projections from: "
                         f"{', '.join(LORA_TARGETS)}.")
    for target in targets:
        _check_choice("lora_targets", target, LORA_TARGETS)
    object.__setattr__(config, "lora_targets", tuple(targets))  # JSON and gin give lists
    if not isinstance(config.prompt_length, int) or config.prompt_length < 0:
        raise ValueError(f"prompt_length={config.prompt_length!r} must be 0 (no prompt) or a positive integer.")
    if config.prompt_length and not config.is_encoder_decoder:
        raise ValueError(f"prompt_length={config.prompt_length}: prompt tuning prepends to the encoder's inputs, "
                         f"and architecture={config.architecture!r} has no encoder. Use LoRA (lora_rank) or "
                         f"BitFit (bitfit=True) on a decoder.")
    if not config.lora_rank:
        return
    if not config.lora_alpha > 0:
        raise ValueError(f"lora_alpha={config.lora_alpha} must be > 0.")
    if not 0.0 <= config.lora_dropout < 1.0:
        raise ValueError(f"lora_dropout={config.lora_dropout} must be in [0, 1).")
    if config.num_experts and {"mlp_in", "mlp_out"} & set(targets):
        raise ValueError("LoRA on the MLPs of a mixture of experts is not supported; adapt attention projections "
                         "only (lora_targets without mlp_in, mlp_out).")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported. Allowed values: {', '.join(allowed)}.")


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _check_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer.")


# Gin binds `ModelConfig.<field>`; the class itself stays free of gin so that configs
# built in Python (the registry, checkpoints) never pick up a user's gin bindings.
GinModelConfig = gin.external_configurable(ModelConfig, name="ModelConfig", module="t5lite")

# The gin files of a source checkout; `include 'models/t5_1_1/base.gin'` resolves against it.
GIN_CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "gin_configs"


def parse_gin(files: Sequence[str], bindings: Sequence[str] = ()) -> None:
    """Replaces the gin state with these files (looked up as given, then under gin_configs/) and bindings."""
    search = [pathlib.Path.cwd(), GIN_CONFIG_DIR]
    paths = []
    for name in files:
        found = [root / name for root in search if (root / name).is_file()]
        if not found:
            raise FileNotFoundError(f"Gin file {name!r} not found in {', '.join(map(str, search))}. Shipped configs: "
                                    f"runs/*.gin, models/<family>/<size>.gin and sharding/*.gin under "
                                    f"{GIN_CONFIG_DIR}.")
        # Absolute: gin would otherwise try `runs/x.gin` as a resource of a Python package named `runs`.
        paths.append(str(found[0]))
    if GIN_CONFIG_DIR.is_dir():
        gin.add_config_file_search_path(str(GIN_CONFIG_DIR))
    gin.clear_config()
    with _quiet_gin_search():
        try:
            gin.parse_config_files_and_bindings(paths, list(bindings))
        except (ValueError, KeyError) as error:
            raise ValueError(f"Bad gin configuration: {error}") from error


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
