"""Transformer layers and the encoder / decoder stacks that both model kinds are made of.

A stack embeds positions, builds its attention specs once (masks and position bias for the
configured attention implementation), then runs its layers (scanned with `nn.scan` by
default, optionally rematerialised).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5lite.config import ModelConfig
from t5lite.layers import positions as pos
from t5lite.layers.attention import Attention
from t5lite.layers.attention_spec import cross_attention_spec, resolve_impl, self_attention_spec
from t5lite.layers.dense import DENSE_OUTPUT, DenseGeneral, Lora, WeightQuant
from t5lite.layers.embedding import Embed, SoftPrompt
from t5lite.layers.mlp import Mlp
from t5lite.layers.moe import MoeMlp
from t5lite.layers.norm import NORMS
from t5lite.layers.quant import Scheme
from t5lite.models import pipeline

# "dots" keeps every matmul's output; dense layers' outputs are named (they have their own backward rule).
_DENSE = jax.checkpoint_policies.save_only_these_names(DENSE_OUTPUT)
REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.save_from_both_policies(jax.checkpoint_policies.checkpoint_dots, _DENSE),
    "dots_with_no_batch_dims": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims, _DENSE
    ),
}


def dtypes(config: ModelConfig) -> dict[str, Any]:
    return {"dtype": jnp.dtype(config.dtype), "param_dtype": jnp.dtype(config.param_dtype)}


def residual(config: ModelConfig, x, sublayer, norm_name: str, deterministic: bool):
    """Pre-norm: x + f(norm(x)). Post-norm: norm(x + f(x))."""
    norm = NORMS[config.norm](epsilon=config.norm_epsilon, name=norm_name, **dtypes(config))
    dropout = nn.Dropout(config.dropout_rate, broadcast_dims=(-2,))
    if config.residual == "pre":
        return x + dropout(sublayer(norm(x)), deterministic=deterministic)
    return norm(x + dropout(sublayer(x), deterministic=deterministic))


def weight_quant(config: ModelConfig, family: str) -> WeightQuant | None:
    """How `family`'s dense kernels are stored and run when quantised (`config.weight_quant`)."""
    quant = config.weight_quant
    if family not in quant.families:
        return None
    scheme = Scheme(
        quant.bits, not quant.zero_points, quant.group_size, format=quant.format, double_quant=quant.double_quant
    )
    return WeightQuant(scheme, quant.input_scaling, quant.activations, quant.outlier_threshold)


def lora(config: ModelConfig, deterministic: bool) -> Lora | None:
    """The adapter every adapted projection gets (`config.adapters.lora_rank` > 0)."""
    adapters = config.adapters
    if not adapters.lora_rank:
        return None
    scale = adapters.lora_alpha / (adapters.lora_rank**0.5 if adapters.rslora else adapters.lora_rank)
    return Lora(adapters.lora_rank, scale, adapters.lora_dropout, deterministic)


def _attention(config: ModelConfig, name: str, deterministic: bool, decode: bool, cross: bool = False):
    return Attention(
        num_heads=config.num_heads,
        num_kv_heads=config.kv_heads,
        head_dim=config.head_dim,
        scale_by_head_dim=config.scale_attention_by_head_dim,
        dropout_rate=config.dropout_rate,
        deterministic=deterministic,
        decode=decode,
        is_cross_attention=cross,
        int8="attention" in config.int8_dense,
        weight_quant=weight_quant(config, "attention"),
        lora=lora(config, deterministic),
        adapted=config.adapters.lora_targets,
        bias=config.adapters.bitfit,
        name=name,
        **dtypes(config),
    )


def _mlp(config: ModelConfig, deterministic: bool, moe: bool, causal: bool):
    if moe:
        experts = config.moe
        return MoeMlp(
            num_experts=experts.num_experts,
            d_ff=config.d_ff,
            activation=config.mlp_activation,
            experts_per_token=experts.experts_per_token,
            router=experts.router,
            causal=causal,
            capacity_factor=experts.eval_capacity_factor if deterministic else experts.train_capacity_factor,
            min_capacity=experts.min_expert_capacity,
            dropless=experts.dropless,
            group_size=experts.group_size,
            jitter=experts.router_jitter,
            deterministic=deterministic,
            name="moe",
            **dtypes(config),
            dropout_rate=config.dropout_rate if experts.expert_dropout_rate is None else experts.expert_dropout_rate,
        )
    return Mlp(
        d_ff=config.d_ff,
        activation=config.mlp_activation,
        dropout_rate=config.dropout_rate,
        deterministic=deterministic,
        int8="mlp" in config.int8_dense,
        weight_quant=weight_quant(config, "mlp"),
        lora=lora(config, deterministic),
        adapted=config.adapters.lora_targets,
        bias=config.adapters.bitfit,
        name="mlp",
        **dtypes(config),
    )


def attention_impl(config: ModelConfig, deterministic: bool, decode: bool = False) -> str:
    """The stack's attention implementation; attention dropout is on only when dropout is enabled.
    Cached decoding uses XLA instead of cuDNN (a few queries over a masked cache is not a shape it is
    tested on)."""
    impl = resolve_impl(config.attention_impl, not deterministic and config.dropout_rate > 0.0)
    return "xla" if decode and impl == "cudnn" else impl


class EncoderLayer(nn.Module):
    config: ModelConfig
    deterministic: bool = True
    moe: bool = False  # a mixture of experts instead of the MLP

    @nn.compact
    def __call__(self, x, spec, rope):
        cfg, det = self.config, self.deterministic
        attention = _attention(cfg, "attention", det, decode=False)
        x = residual(cfg, x, lambda h: attention(h, h, spec, rope), "pre_attention_norm", det)
        x = residual(cfg, x, _mlp(cfg, det, self.moe, causal=False), "pre_mlp_norm", det)
        self.sow("intermediates", "hidden", x)  # kept only when "intermediates" is mutable
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


class DecoderLayer(nn.Module):
    """Self-attention, cross-attention (encoder-decoder only) and MLP."""

    config: ModelConfig
    deterministic: bool = True
    decode: bool = False
    moe: bool = False

    @nn.compact
    def __call__(self, x, spec, rope, cache_position, encoded, cross_spec):
        cfg, det = self.config, self.deterministic
        self_attention = _attention(cfg, "self_attention", det, self.decode)
        x = residual(cfg, x, lambda h: self_attention(h, h, spec, rope, cache_position), "pre_self_attention_norm", det)
        if cfg.is_encoder_decoder:
            cross_attention = _attention(cfg, "cross_attention", det, self.decode, cross=True)
            x = residual(cfg, x, lambda h: cross_attention(h, encoded, cross_spec), "pre_cross_attention_norm", det)
        x = residual(cfg, x, _mlp(cfg, det, self.moe, causal=True), "pre_mlp_norm", det)
        self.sow("intermediates", "hidden", x)
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


class LayerBlock(nn.Module):
    """`size` consecutive layers, the last with experts: what a stack with MoE every `size`-th layer scans."""

    config: ModelConfig
    layer_cls: Any
    size: int
    layer_kwargs: Any

    @nn.compact
    def __call__(self, x, *args):
        for j in range(self.size):
            x, _ = self.layer_cls(config=self.config, moe=j == self.size - 1, name=f"layer_{j}", **self.layer_kwargs)(
                x, *args
            )
        return x, None


def run_layers(config: ModelConfig, layer_cls, num_layers: int, moe_every: int, x, *args, **layer_kwargs):
    """Applies `num_layers` copies of `layer_cls`, with experts in every `moe_every`-th (0: none):
    scanned (params stacked on a leading "layers" axis; with experts, blocks `layers/layer_{j}` of
    `moe_every` layers are scanned), through the stages of a pipeline on a mesh with a `stage` axis,
    or unrolled (`layers_0`, `layers_1`, ...). Must be called inside a compact method."""
    if config.remat_policy != "none":
        layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[config.remat_policy], prevent_cse=not config.scan_layers)
    if config.scan_layers:
        body, length, kwargs = layer_cls, num_layers, layer_kwargs
        if moe_every:
            body, length = LayerBlock, num_layers // moe_every
            kwargs = dict(layer_cls=layer_cls, size=moe_every, layer_kwargs=layer_kwargs)
        layers = _scanned(body, length, len(args))(config=config, name="layers", **kwargs)
        if pipeline.mesh_stages() > 1 and not layer_kwargs.get("decode") and not layers.is_initializing():
            return _pipelined(config, layers, body, length, x, args, kwargs)
        x, _ = layers(x, *args)
        return x
    for i in range(num_layers):
        moe = bool(moe_every) and (i + 1) % moe_every == 0
        x, _ = layer_cls(config=config, moe=moe, name=f"layers_{i}", **layer_kwargs)(x, *args)
    return x


def _scanned(body, length: int, num_args: int):
    return nn.scan(
        body,
        variable_axes={"params": 0, "cache": 0, "moe": 0, "intermediates": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,) * num_args,
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


def _pipelined(config: ModelConfig, layers: nn.Module, body, length: int, x, args, kwargs):
    """The scanned `layers` run as pipeline stages: each stage applies chunks of them (a scan of
    the same body over fewer layers) to the microbatches passing through."""
    chunk = _scanned(body, length // (pipeline.mesh_stages() * config.pipeline_repeats), len(args))(
        config=config, **kwargs
    )

    def block(variables, inputs, block_args, rngs):
        return chunk.apply(variables, inputs, *block_args, rngs=rngs)[0]

    # Any dropout (the layers', LoRA's) draws from this key, per stage chunk and microbatch.
    dropout_key = None if kwargs.get("deterministic", True) else layers.make_rng("dropout")
    return pipeline.run(block, layers.variables, x, args, config=config, dropout_key=dropout_key)


class PositionEncoder(nn.Module):
    """Turns positions into what the layers consume: an additive embedding, an attention bias
    (by its parameters, for the attention spec) or rotary cos/sin, per `config.position_encoding`."""

    config: ModelConfig
    bidirectional: bool = True

    @nn.compact
    def __call__(self, positions):
        """Returns (embedding to add to the inputs or None, bias arguments of `self_attention_spec`,
        rope or None)."""
        cfg = self.config
        kind = cfg.position_encoding
        if kind == "relative":
            table = pos.RelativePositionBias(
                num_heads=cfg.num_heads,
                num_buckets=cfg.relative_num_buckets,
                name="relpos_bias",
                param_dtype=jnp.dtype(cfg.param_dtype),
            )()
            return (
                None,
                dict(
                    relpos_table=table,
                    relpos_bidirectional=self.bidirectional,
                    relpos_max_distance=cfg.relative_max_distance,
                ),
                None,
            )
        if kind == "alibi":
            return None, dict(alibi_slopes=jnp.asarray(pos.alibi_slopes(cfg.num_heads), jnp.float32)), None
        if kind == "rope":
            inv_freq = pos.rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.rope_scaling_factor)
            return None, {}, pos.rope_cos_sin(positions, inv_freq)
        if kind == "sinusoidal":
            return pos.sinusoidal_embedding(positions, cfg.d_model).astype(cfg.dtype), {}, None
        if kind == "learned":
            embedding = pos.LearnedPositionEmbedding(
                cfg.max_length, cfg.d_model, name="position_embedder", **dtypes(cfg)
            )(positions)
            return embedding, {}, None
        return None, {}, None


def default_positions(tokens, positions):
    if positions is not None:
        return positions
    return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


def final_norm(config: ModelConfig, x, deterministic: bool):
    if config.residual == "pre":
        x = NORMS[config.norm](epsilon=config.norm_epsilon, name="final_norm", **dtypes(config))(x)
    return nn.Dropout(config.dropout_rate)(x, deterministic=deterministic)


class EncoderStack(nn.Module):
    config: ModelConfig
    embedder: Embed

    @nn.compact
    def __call__(self, tokens, segment_ids=None, positions=None, deterministic=True):
        cfg = self.config
        positions = default_positions(tokens, positions)
        valid = tokens > 0 if segment_ids is None else segment_ids > 0
        x = self.embedder(tokens)
        if cfg.adapters.prompt_length:
            if segment_ids is not None:
                raise ValueError(
                    f"prompt_length={cfg.adapters.prompt_length}: prompt tuning needs unpacked encoder "
                    f"inputs (one sequence per row); set train.pack=False."
                )
            prompt = SoftPrompt(cfg.adapters.prompt_length, cfg.d_model, name="prompt", **dtypes(cfg))
            x, positions, valid = prompt(x, positions, valid)
        added, bias_args, rope = PositionEncoder(cfg, bidirectional=True, name="positions")(positions)
        spec = self_attention_spec(
            attention_impl(cfg, deterministic),
            positions=positions,
            valid=valid,
            segments=segment_ids,
            sliding_window=cfg.sliding_window,
            attention_sinks=cfg.attention_sinks,
            **bias_args,
        )
        if added is not None:
            x = x + added
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        x = run_layers(
            cfg,
            EncoderLayer,
            cfg.num_encoder_layers,
            cfg.moe_every("encoder"),
            x,
            spec,
            rope,
            deterministic=deterministic,
        )
        return final_norm(cfg, x, deterministic)


class DecoderStack(nn.Module):
    """Causal (or prefix-LM) decoder stack ending in vocabulary logits.

    In decode mode the first call sizes the cache from its inputs' length; each later call
    consumes the next tokens, continuing from the position kept in the cache.
    """

    config: ModelConfig
    embedder: Embed

    @nn.compact
    def __call__(
        self,
        tokens,
        encoded=None,
        encoder_valid=None,
        encoder_segment_ids=None,
        segment_ids=None,
        positions=None,
        target_tokens=None,
        causal_attention=None,
        deterministic=True,
        decode=False,
    ):
        cfg = self.config
        stepping = decode and self.has_variable("cache", "position")
        if stepping:
            index = self.variable("cache", "position", jnp.zeros, (), jnp.int32)
            key_positions = self.get_variable("cache", "key_positions")
            start = index.value
            index.value = start + tokens.shape[1]
            positions = jnp.broadcast_to(start + jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
            query_region, key_region = _cached_prefix_regions(causal_attention, start, key_positions.shape[1])
            query_valid = None
        else:
            positions = default_positions(tokens, positions)
            if decode:
                self.variable("cache", "position", jnp.zeros, (), jnp.int32)
                self.variable("cache", "key_positions", lambda: positions[:1])
            key_positions = key_region = None
            query_region = causal_attention
            query_valid = (
                target_tokens > 0 if target_tokens is not None else (None if segment_ids is None else segment_ids > 0)
            )
        segments = None if stepping else segment_ids
        impl = attention_impl(cfg, deterministic, decode)
        added, bias_args, rope = PositionEncoder(cfg, bidirectional=False, name="positions")(positions)
        spec = self_attention_spec(
            impl,
            positions=positions,
            valid=query_valid,
            segments=segments,
            causal=True,
            region=query_region,
            sliding_window=cfg.sliding_window,
            attention_sinks=cfg.attention_sinks,
            key_positions=key_positions,
            key_region=key_region,
            **bias_args,
        )
        cross_spec = None
        if cfg.is_encoder_decoder:
            query_ok = jnp.ones(tokens.shape, bool) if query_valid is None else query_valid
            cross_spec = cross_attention_spec(
                impl, query_ok, encoder_valid, segments, None if segments is None else encoder_segment_ids
            )
        x = self.embedder(tokens)
        if added is not None:
            x = x + added
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        cache_position = positions[0, 0]
        x = run_layers(
            cfg,
            DecoderLayer,
            cfg.num_decoder_layers,
            cfg.moe_every("decoder"),
            x,
            spec,
            rope,
            cache_position,
            encoded,
            cross_spec,
            deterministic=deterministic,
            decode=decode,
        )
        return output_logits(self, final_norm(cfg, x, deterministic))


def output_logits(stack: DecoderStack, x):
    """Vocabulary logits [batch, length, vocab] in float32 of the stack's final hidden states. Sown, and
    kept only when "intermediates" is mutable: those hidden states (contrastive search compares them)
    and a reward model's scalar per position (t5lite.train.preference)."""
    cfg = stack.config
    stack.sow("intermediates", "final_hidden", x)
    if cfg.adapters.reward_head:
        reward = DenseGeneral((1,), ("embed", None), name="reward_head", **dtypes(cfg))(x)[..., 0]
        stack.sow("intermediates", "reward", reward.astype(jnp.float32))
    if cfg.tie_embeddings:
        if cfg.rescale_tied_logits:
            x = x * cfg.d_model**-0.5
        logits = stack.embedder.attend(x)
    else:
        logits = DenseGeneral((cfg.vocab_size,), ("embed", "vocab"), name="logits_dense", **dtypes(cfg))(x)
    return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))


def _cached_prefix_regions(causal_attention, start, cache_length):
    """While stepping, only the current chunk's own prefix region can be bidirectional; earlier
    chunks are already in the cache, where the causal rule covers them."""
    if causal_attention is None:
        return None, None
    key_region = jnp.zeros((causal_attention.shape[0], cache_length), causal_attention.dtype)
    key_region = jax.lax.dynamic_update_slice(key_region, causal_attention, (0, start))
    return causal_attention, key_region


def make_embedder(config: ModelConfig, name: str = "token_embedder") -> Embed:
    return Embed(config.vocab_size, config.d_model, name=name, **dtypes(config))
