"""Named model configs. Each has a gin file under gin_configs/models/<name>.gin binding the
same fields (tests/test_registry.py keeps the two in step); Python callers use `get_config`."""

from __future__ import annotations

from t5lite.config import ModelConfig

T5_1_0 = ModelConfig(architecture="encoder_decoder", vocab_size=32128, head_dim=64, mlp_activation="relu",
                     tie_embeddings=True, rescale_tied_logits=True, dropout_rate=0.1)
T5_1_1 = T5_1_0.replace(mlp_activation="geglu", tie_embeddings=False, rescale_tied_logits=False, dropout_rate=0.0)
MT5 = T5_1_1.replace(vocab_size=250112)
LLAMA = ModelConfig(architecture="decoder", vocab_size=32000, position_encoding="rope", mlp_activation="swiglu",
                    scale_attention_by_head_dim=True, tie_embeddings=False, norm_epsilon=1e-5, num_encoder_layers=0)
PREFIX_LM = LLAMA.replace(vocab_size=32128)
# Switch Transformers (Fedus et al. 2021) as published: T5 v1.0 with a top-1 mixture of experts in
# every other MLP of both stacks.
SWITCH = T5_1_0.replace(num_experts=8, encoder_moe_every=2, decoder_moe_every=2, experts_per_token=1)
SWITCH_DECODER = LLAMA.replace(num_experts=8, decoder_moe_every=2, experts_per_token=1)


def _size(d_model, d_ff, num_heads, layers, **rest):
    return dict(d_model=d_model, d_ff=d_ff, num_heads=num_heads, **rest, **(
        {"num_encoder_layers": layers, "num_decoder_layers": layers} if isinstance(layers, int)
        else {"num_encoder_layers": layers[0], "num_decoder_layers": layers[1]}))


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
    **{f"t5_1_0/{name}": T5_1_0.replace(**size) for name, size in {
        "small": _size(512, 2048, 8, 6),
        "base": _size(768, 3072, 12, 12),
        "large": _size(1024, 4096, 16, 24),
    }.items()},
    **{f"t5_1_1/{name}": T5_1_1.replace(**size) for name, size in _T5_1_1_SIZES.items()},
    "t5_1_1/tiny": T5_1_1.replace(**_size(128, 256, 4, 2, head_dim=32)),
    **{f"mt5/{name}": MT5.replace(**size) for name, size in _T5_1_1_SIZES.items()},
    "llama/tiny": LLAMA.replace(**_decoder_size(128, 384, 4, 2, num_kv_heads=2, head_dim=32, vocab_size=32128)),
    # TinyLlama-1.1B's shape and Llama-2-7B's.
    "llama/1b": LLAMA.replace(**_decoder_size(2048, 5632, 32, 22, num_kv_heads=4, head_dim=64)),
    "llama/7b": LLAMA.replace(**_decoder_size(4096, 11008, 32, 32, head_dim=128, max_length=4096)),
    "prefix_lm/tiny": PREFIX_LM.replace(**_decoder_size(128, 384, 4, 2, head_dim=32)),
    "prefix_lm/base": PREFIX_LM.replace(**_decoder_size(768, 2048, 12, 12, head_dim=64)),
    **{f"switch/base_{experts}": SWITCH.replace(num_experts=experts, **_size(768, 3072, 12, 12))
       for experts in (8, 16, 128)},
    "switch/tiny": SWITCH.replace(num_experts=4, **_size(128, 256, 4, 2, head_dim=32)),
    "switch_decoder/tiny": SWITCH_DECODER.replace(
        num_experts=4, **_decoder_size(128, 256, 4, 2, num_kv_heads=2, head_dim=32, vocab_size=32128)),
}


def named_configs() -> dict[str, ModelConfig]:
    return dict(_NAMED)


def get_config(name: str) -> ModelConfig:
    if name not in _NAMED:
        raise ValueError(f"Unknown model config {name!r}. Named configs: {', '.join(sorted(_NAMED))}.")
    return _NAMED[name]
