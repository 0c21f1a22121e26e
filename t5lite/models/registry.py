"""Named model configs, the one source of their sizes. Python callers use `get_config`; gin users
include gin_configs/models/<name>.gin, which `write_gin_files()` writes from here (tests/test_registry.py
fails when a committed file differs from what it would write)."""

from __future__ import annotations

import pathlib

from t5lite.config import GIN_CONFIG_DIR, ModelConfig, MoeConfig, gin_bindings
from t5lite.models.params import active_param_count, param_count

T5_1_0 = ModelConfig(
    architecture="encoder_decoder",
    vocab_size=32128,
    head_dim=64,
    mlp_activation="relu",
    tie_embeddings=True,
    rescale_tied_logits=True,
    dropout_rate=0.1,
)
T5_1_1 = T5_1_0.replace(mlp_activation="geglu", tie_embeddings=False, rescale_tied_logits=False, dropout_rate=0.0)
MT5 = T5_1_1.replace(vocab_size=250112)
LLAMA = ModelConfig(
    architecture="decoder",
    vocab_size=32000,
    position_encoding="rope",
    mlp_activation="swiglu",
    scale_attention_by_head_dim=True,
    tie_embeddings=False,
    norm_epsilon=1e-5,
    num_encoder_layers=0,
)
PREFIX_LM = LLAMA.replace(vocab_size=32128)
# Switch Transformers (Fedus et al. 2021) as published: T5 v1.0 with a top-1 mixture of experts in
# every other MLP of both stacks.
SWITCH_MOE = MoeConfig(num_experts=8, encoder_every=2, decoder_every=2, experts_per_token=1)
SWITCH = T5_1_0.replace(moe=SWITCH_MOE)
SWITCH_DECODER = LLAMA.replace(moe=SWITCH_MOE)


def _size(d_model, d_ff, num_heads, layers, **rest):
    return dict(
        d_model=d_model,
        d_ff=d_ff,
        num_heads=num_heads,
        **rest,
        **(
            {"num_encoder_layers": layers, "num_decoder_layers": layers}
            if isinstance(layers, int)
            else {"num_encoder_layers": layers[0], "num_decoder_layers": layers[1]}
        ),
    )


def _decoder_size(d_model, d_ff, num_heads, layers, **rest):
    return dict(d_model=d_model, d_ff=d_ff, num_heads=num_heads, num_decoder_layers=layers, **rest)


_T5_1_1_SIZES = {
    "small": _size(512, 1024, 6, 8),
    "base": _size(768, 2048, 12, 12),
    "large": _size(1024, 2816, 16, 24),
    "xl": _size(2048, 5120, 32, 24),
    "xxl": _size(4096, 10240, 64, 24),
}

_NAMED = {
    **{
        f"t5_1_0/{name}": T5_1_0.replace(**size)
        for name, size in {
            "small": _size(512, 2048, 8, 6),
            "base": _size(768, 3072, 12, 12),
            "large": _size(1024, 4096, 16, 24),
        }.items()
    },
    **{f"t5_1_1/{name}": T5_1_1.replace(**size) for name, size in _T5_1_1_SIZES.items()},
    "t5_1_1/tiny": T5_1_1.replace(**_size(128, 256, 4, 2, head_dim=32)),
    **{f"mt5/{name}": MT5.replace(**size) for name, size in _T5_1_1_SIZES.items()},
    "llama/tiny": LLAMA.replace(**_decoder_size(128, 384, 4, 2, num_kv_heads=2, head_dim=32, vocab_size=32128)),
    # TinyLlama-1.1B's shape and Llama-2-7B's.
    "llama/1b": LLAMA.replace(**_decoder_size(2048, 5632, 32, 22, num_kv_heads=4, head_dim=64)),
    "llama/7b": LLAMA.replace(**_decoder_size(4096, 11008, 32, 32, head_dim=128, max_length=4096)),
    "prefix_lm/tiny": PREFIX_LM.replace(**_decoder_size(128, 384, 4, 2, head_dim=32)),
    "prefix_lm/base": PREFIX_LM.replace(**_decoder_size(768, 2048, 12, 12, head_dim=64)),
    **{
        f"switch/base_{experts}": SWITCH.replace(
            moe=SWITCH_MOE.replace(num_experts=experts), **_size(768, 3072, 12, 12)
        )
        for experts in (8, 16, 128)
    },
    "switch/tiny": SWITCH.replace(moe=SWITCH_MOE.replace(num_experts=4), **_size(128, 256, 4, 2, head_dim=32)),
    "switch_decoder/tiny": SWITCH_DECODER.replace(
        moe=SWITCH_MOE.replace(num_experts=4),
        **_decoder_size(128, 256, 4, 2, num_kv_heads=2, head_dim=32, vocab_size=32128),
    ),
}


# What each family's architecture file binds even where it equals ModelConfig's default, so that the file
# reads as the architecture it is.
ARCHITECTURE_FIELDS = (
    "architecture",
    "vocab_size",
    "head_dim",
    "mlp_activation",
    "norm",
    "norm_epsilon",
    "residual",
    "position_encoding",
    "scale_attention_by_head_dim",
    "tie_embeddings",
    "rescale_tied_logits",
    "dropout_rate",
)
MOE_FIELDS = (
    "moe.num_experts",
    "moe.encoder_every",
    "moe.decoder_every",
    "moe.experts_per_token",
    "moe.router",
    "moe.train_capacity_factor",
    "moe.eval_capacity_factor",
    "moe.load_balance_loss",
    "moe.router_z_loss",
)
# Each family's architecture (gin_configs/models/<family>/architecture.gin) and what it is.
FAMILIES = {
    "t5_1_0": (
        T5_1_0,
        "T5 v1.0 (Raffel et al. 2020): ReLU MLP, tied embeddings with logits rescaled by d_model**-0.5.",
    ),
    "t5_1_1": (T5_1_1, "T5 v1.1: gated-GELU MLP, untied embeddings, no dropout in pre-training."),
    "mt5": (MT5, "mT5 (Xue et al. 2021): the T5 v1.1 architecture with a 250k multilingual vocabulary."),
    "llama": (LLAMA, "Llama-style decoder: RoPE, SwiGLU, RMSNorm (eps 1e-5), untied output projection."),
    "prefix_lm": (
        PREFIX_LM,
        "Prefix-LM decoder (Llama-style layers); bidirectional over the inputs region\n"
        "that seqio's PrefixLMFeatureConverter marks in decoder_causal_attention.",
    ),
    "switch": (
        SWITCH,
        "Switch Transformers (Fedus et al. 2021): T5 v1.0 with a top-1 mixture of experts in every "
        "other\nMLP of the encoder and the decoder; capacity 1.25 (train) / 2.0 (eval), load balancing "
        "0.01,\nrouter z-loss 1e-3 (ST-MoE).",
    ),
    "switch_decoder": (
        SWITCH_DECODER,
        "A Llama-style decoder with a top-1 (Switch) mixture of experts in every other MLP.",
    ),
}


def named_configs() -> dict[str, ModelConfig]:
    return dict(_NAMED)


def get_config(name: str) -> ModelConfig:
    if name not in _NAMED:
        raise ValueError(f"Unknown model config {name!r}. Named configs: {', '.join(sorted(_NAMED))}.")
    return _NAMED[name]


def gin_files() -> dict[str, str]:
    """The text of every file under gin_configs/models/, by its path there: each family's architecture
    (what differs from ModelConfig's defaults) and each size (what differs from its family, under a
    header with its parameter count)."""
    files = {}
    for family, (base, description) in FAMILIES.items():
        pinned = ARCHITECTURE_FIELDS + (MOE_FIELDS if base.moe.num_experts else ())
        bindings = gin_bindings(base, relative_to=ModelConfig(), always=pinned)
        files[f"{family}/architecture.gin"] = _gin_text(description, "import t5lite.config", bindings)
    for name, config in _NAMED.items():
        family = name.split("/")[0]
        count = f"{param_count(config) / 1e6:,.1f}M parameters"
        if config.moe.num_experts:
            count += f", {active_param_count(config) / 1e6:,.1f}M active per token"
        include = f"include 'models/{family}/architecture.gin'"
        files[f"{name}.gin"] = _gin_text(f"{name}: {count}.", include, gin_bindings(config, FAMILIES[family][0]))
    return files


def _gin_text(comment: str, header: str, bindings: list[str]) -> str:
    comment = "\n".join(f"# {line}" for line in comment.splitlines())
    return "\n".join([comment, header, "", *bindings]) + "\n"


def write_gin_files(directory: pathlib.Path = GIN_CONFIG_DIR / "models") -> None:
    for path, text in gin_files().items():
        (directory / path).parent.mkdir(parents=True, exist_ok=True)
        (directory / path).write_text(text)
