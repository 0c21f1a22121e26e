"""Behaviour of the two model kinds: masks, packing, prefix-LM, cached decoding, parameter counts."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5lite.config import ModelConfig, MoeConfig
from t5lite.layers.masks import attention_mask
from t5lite.models import build, init_params, param_count

POSITION_ENCODINGS = ["relative", "rope", "alibi", "learned", "sinusoidal"]


def small(architecture="decoder", **changes):
    base = dict(
        architecture=architecture,
        vocab_size=64,
        d_model=32,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        d_ff=48,
        num_encoder_layers=2,
        num_decoder_layers=2,
        mlp_activation="swiglu",
        dtype="float32",
        max_length=64,
        tie_embeddings=False,
    )
    return ModelConfig(**{**base, **changes})


@functools.cache
def model_and_params(config):
    return build(config), init_params(config, jax.random.PRNGKey(0))


@functools.cache
def forward(config):
    """The jitted full forward pass (eager Flax is many times slower on these tiny models)."""
    model, params = model_and_params(config)
    return jax.jit(lambda *args, **features: model.apply({"params": params}, *args, enable_dropout=False, **features))


def tokens(shape, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randint(1, 64, shape), jnp.int32)


def decoder_logits(config, y, **features):
    if config.is_encoder_decoder:
        x = features.pop("encoder_input_tokens", tokens((y.shape[0], 5), seed=9))
        return forward(config)(x, y, **features)
    return forward(config)(y, **features)


@pytest.mark.parametrize(
    "architecture, position_encoding",
    [("decoder", p) for p in POSITION_ENCODINGS] + [("encoder_decoder", "relative"), ("encoder_decoder", "rope")],
)
def test_future_tokens_do_not_change_earlier_logits(architecture, position_encoding):
    config = small(architecture, position_encoding=position_encoding)
    y = tokens((2, 9))
    changed = y.at[:, 6].set((y[:, 6] + 1) % 63 + 1)
    before, after = decoder_logits(config, y), decoder_logits(config, changed)
    np.testing.assert_array_equal(before[:, :6], after[:, :6])
    assert not np.allclose(before[:, 6:], after[:, 6:])


@pytest.mark.parametrize("architecture", ["decoder", "encoder_decoder"])
def test_moe_decoder_stays_causal_when_capacity_drops_tokens(architecture):
    """Top-2 routing at half capacity: later tokens must not take slots from earlier ones."""
    config = small(
        architecture,
        moe=MoeConfig(
            num_experts=4, experts_per_token=2, decoder_every=1, eval_capacity_factor=0.5, min_expert_capacity=1
        ),
    )
    y = tokens((2, 12))
    changed = y.at[:, 5:].set(tokens((2, 7), seed=5))
    before, after = decoder_logits(config, y), decoder_logits(config, changed)
    np.testing.assert_array_equal(before[:, :5], after[:, :5])
    assert not np.allclose(before[:, 5:], after[:, 5:])


def test_prefix_lm_is_bidirectional_over_inputs_and_causal_over_targets():
    config = small(position_encoding="rope")
    y = tokens((2, 10))
    region = jnp.broadcast_to((jnp.arange(10) < 5).astype(jnp.int32), (2, 10))
    logits = decoder_logits(config, y, decoder_causal_attention=region)
    later_input = decoder_logits(config, y.at[:, 3].set(y[:, 3] % 63 + 1), decoder_causal_attention=region)
    assert not np.allclose(logits[:, :3], later_input[:, :3])  # earlier inputs see a later input
    later_target = decoder_logits(config, y.at[:, 7].set(y[:, 7] % 63 + 1), decoder_causal_attention=region)
    np.testing.assert_array_equal(logits[:, :7], later_target[:, :7])
    # A prefix of length 0 is the causal decoder.
    np.testing.assert_array_equal(
        decoder_logits(config, y, decoder_causal_attention=jnp.zeros_like(region)), decoder_logits(config, y)
    )


def _pack(sequences, length):
    """Packs 1-D arrays into one row: tokens, segment ids (1, 2, ...; 0 pads) and per-segment positions."""
    packed, segments, positions = np.zeros(length, np.int32), np.zeros(length, np.int32), np.zeros(length, np.int32)
    start = 0
    for i, seq in enumerate(sequences):
        packed[start : start + len(seq)] = seq
        segments[start : start + len(seq)] = i + 1
        positions[start : start + len(seq)] = np.arange(len(seq))
        start += len(seq)
    return jnp.asarray(packed)[None], jnp.asarray(segments)[None], jnp.asarray(positions)[None]


@pytest.mark.parametrize("position_encoding", POSITION_ENCODINGS)
def test_packed_decoder_equals_examples_one_by_one(position_encoding):
    config = small(position_encoding=position_encoding, sliding_window=3, attention_sinks=1)
    examples = [np.asarray(tokens((4,), seed=1)), np.asarray(tokens((5,), seed=2))]
    y, segments, positions = _pack(examples, 11)
    region = jnp.asarray([[1, 1, 0, 0, 1, 1, 1, 0, 0, 0, 0]])  # prefix-LM regions, one per example
    packed = forward(config)(
        y, decoder_segment_ids=segments, decoder_positions=positions, decoder_causal_attention=region
    )
    start = 0
    for example in examples:
        n = len(example)
        alone = forward(config)(jnp.asarray(example)[None], decoder_causal_attention=region[:, start : start + n])
        np.testing.assert_allclose(packed[:, start : start + n], alone, atol=1e-5, rtol=1e-5)
        start += n


@pytest.mark.parametrize("position_encoding", ["relative", "rope", "learned"])
def test_packed_encoder_decoder_equals_examples_one_by_one(position_encoding):
    config = small("encoder_decoder", position_encoding=position_encoding)
    inputs = [np.asarray(tokens((3,), seed=3)), np.asarray(tokens((6,), seed=4))]
    targets = [np.asarray(tokens((4,), seed=5)), np.asarray(tokens((2,), seed=6))]
    x, x_segments, x_positions = _pack(inputs, 10)
    y, y_segments, y_positions = _pack(targets, 7)
    packed = forward(config)(
        x,
        y,
        encoder_segment_ids=x_segments,
        decoder_segment_ids=y_segments,
        encoder_positions=x_positions,
        decoder_positions=y_positions,
    )
    start = 0
    for source, target in zip(inputs, targets):
        alone = forward(config)(jnp.asarray(source)[None], jnp.asarray(target)[None])
        np.testing.assert_allclose(packed[:, start : start + len(target)], alone, atol=1e-5, rtol=1e-5)
        start += len(target)


def test_encoder_padding_is_ignored():
    config = small("encoder_decoder")
    x, y = tokens((1, 5)), tokens((1, 4), seed=1)
    padded = jnp.concatenate([x, jnp.zeros((1, 3), jnp.int32)], axis=1)
    np.testing.assert_allclose(
        decoder_logits(config, y, encoder_input_tokens=padded),
        decoder_logits(config, y, encoder_input_tokens=x),
        atol=1e-5,
        rtol=1e-5,
    )


def cached_logits(config, y, chunks, encoder_tokens=None, causal_attention=None):
    """Logits from feeding `y` through the KV cache in the given chunk lengths."""
    model, params = model_and_params(config)
    method = model.decode if config.is_encoder_decoder else None
    run = jax.jit(functools.partial(model.apply, method=method, enable_dropout=False, decode=True, mutable=["cache"]))
    args = ()
    if config.is_encoder_decoder:
        args = (
            model.apply({"params": params}, encoder_tokens, enable_dropout=False, method=model.encode),
            encoder_tokens,
        )
    _, variables = run({"params": params}, *args, jnp.zeros_like(y))
    cache, outputs, start = variables["cache"], [], 0
    for n in chunks:
        extra = {} if causal_attention is None else {"decoder_causal_attention": causal_attention[:, start : start + n]}
        logits, variables = run({"params": params, "cache": cache}, *args, y[:, start : start + n], **extra)
        cache, start = variables["cache"], start + n
        outputs.append(logits)
    return jnp.concatenate(outputs, axis=1)


@pytest.mark.parametrize(
    "architecture, position_encoding, window",
    [
        ("decoder", "relative", None),
        ("decoder", "rope", 3),
        ("decoder", "alibi", None),
        ("decoder", "learned", None),
        ("decoder", "sinusoidal", None),
        ("encoder_decoder", "relative", None),
        ("encoder_decoder", "rope", 3),
    ],
)
def test_cached_decoding_reproduces_full_forward(architecture, position_encoding, window):
    config = small(architecture, position_encoding=position_encoding, sliding_window=window)
    y, x = tokens((2, 7)), tokens((2, 5), seed=1)
    full = (
        decoder_logits(config, y, encoder_input_tokens=x)
        if architecture == "encoder_decoder"
        else decoder_logits(config, y)
    )
    stepped = cached_logits(config, y, [1] * 7, encoder_tokens=x)
    np.testing.assert_allclose(stepped, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("architecture", ["decoder", "encoder_decoder"])
def test_moe_cached_decoding_reproduces_full_forward(architecture):
    """Token by token routes one token per group; equal to the full pass when no token is dropped."""
    config = small(
        architecture, moe=MoeConfig(num_experts=4, experts_per_token=2, decoder_every=1, eval_capacity_factor=4.0)
    )
    y, x = tokens((2, 7)), tokens((2, 5), seed=1)
    full = (
        decoder_logits(config, y, encoder_input_tokens=x)
        if architecture == "encoder_decoder"
        else decoder_logits(config, y)
    )
    np.testing.assert_allclose(cached_logits(config, y, [1] * 7, encoder_tokens=x), full, atol=1e-5, rtol=1e-5)


def test_cached_prefix_lm_prefill_then_steps():
    config = small(position_encoding="rope")
    y = tokens((2, 8))
    region = jnp.broadcast_to((jnp.arange(8) < 4).astype(jnp.int32), (2, 8))
    full = decoder_logits(config, y, decoder_causal_attention=region)
    stepped = cached_logits(config, y, [4, 1, 1, 1, 1], causal_attention=region)
    np.testing.assert_allclose(stepped, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "changes",
    [
        dict(architecture="encoder_decoder"),
        dict(architecture="encoder_decoder", tie_embeddings=True, mlp_activation="relu", num_kv_heads=None),
        dict(architecture="encoder_decoder", norm="layer", residual="post", position_encoding="learned"),
        dict(architecture="decoder", num_kv_heads=1, position_encoding="learned", mlp_activation="gelu"),
        dict(architecture="decoder", tie_embeddings=True, norm="layer", position_encoding="alibi", scan_layers=False),
        dict(architecture="encoder_decoder", moe=MoeConfig(num_experts=4, decoder_every=1)),
        dict(architecture="decoder", moe=MoeConfig(num_experts=3), mlp_activation="relu", scan_layers=False),
    ],
)
def test_param_count_equals_initialised_count(changes):
    config = small(**changes)
    params = init_params(config, jax.random.PRNGKey(0))
    assert param_count(config) == sum(leaf.size for leaf in jax.tree.leaves(params))


def test_scanned_params_carry_logical_axis_names():
    params = init_params(small("encoder_decoder"), jax.random.PRNGKey(0), boxed=True)
    query = params["encoder"]["layers"]["attention"]["query"]["kernel"]
    assert query.names == ("layers", "embed", "heads", "kv") and query.value.shape == (2, 32, 4, 8)
    assert params["token_embedder"]["embedding"].names == ("vocab", "embed")


@pytest.mark.parametrize("remat_policy, num_experts", [("full", 0), ("dots", 0), ("dots", 4)])
def test_remat_keeps_logits_and_gradients(remat_policy, num_experts):
    config = small("encoder_decoder", moe=MoeConfig(num_experts=num_experts))
    rematted = config.replace(remat_policy=remat_policy)
    _, params = model_and_params(config)
    x, y = tokens((2, 5)), tokens((2, 4), seed=1)

    def loss(cfg, p):
        return jnp.mean(build(cfg).apply({"params": p}, x, y, enable_dropout=False) ** 2)

    value_and_grad = lambda cfg: jax.jit(jax.value_and_grad(functools.partial(loss, cfg)))(params)
    (value, grads), (remat_value, remat_grads) = value_and_grad(config), value_and_grad(rematted)
    np.testing.assert_allclose(remat_value, value, rtol=1e-6)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), remat_grads, grads)


def test_dropout_only_when_enabled():
    config = small("encoder_decoder", dropout_rate=0.3)
    model, params = model_and_params(config)
    x, y = tokens((2, 5)), tokens((2, 4), seed=1)
    run = jax.jit(
        lambda seed: model.apply(
            {"params": params}, x, y, enable_dropout=True, rngs={"dropout": jax.random.PRNGKey(seed)}
        )
    )
    assert not np.allclose(run(0), run(1))
    np.testing.assert_array_equal(run(0), run(0))
    assert not np.allclose(run(0), forward(config)(x, y))


def test_sliding_window_with_sinks_mask():
    n, window, sinks = 9, 3, 2
    pos = jnp.arange(n)[None]
    causal = np.asarray(
        attention_mask(
            query_positions=pos, key_positions=pos, causal=True, sliding_window=window, attention_sinks=sinks
        )
    )[0, 0]
    bidirectional = np.asarray(attention_mask(query_positions=pos, key_positions=pos, sliding_window=window))[0, 0]
    for q in range(n):
        for k in range(n):
            assert causal[q, k] == (k <= q and (q - k < window or k < sinks)), (q, k)
            assert bidirectional[q, k] == (abs(q - k) < window), (q, k)
