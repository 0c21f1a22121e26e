"""Attention implementations and int8 dense layers as config choices.

`attention_impl="pallas"` (the flash kernel, interpreted on the CPU) must give the logits and
gradients of `attention_impl="xla"` for every mask and position bias the models use. Compiling
dominates the run time here (the Pallas interpreter unrolls into large programs), hence tiny
shapes, few relpos buckets, parameters that need no compiled initialiser, and XLA's cheap
compile options.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5lite.config import ModelConfig
from t5lite.layers.attention_spec import resolve_impl
from t5lite.models import build, init_params

LENGTH = 12
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


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
        relative_num_buckets=8,
        relative_max_distance=16,
    )
    return ModelConfig(**{**base, **changes})


def tokens(shape, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randint(1, 64, shape), jnp.int32)


def packed(lengths, prefixes=None):
    """One packed row: segment ids (0 pads), per-example positions and prefix-LM regions."""
    segments, positions, region = (np.zeros(LENGTH, np.int32) for _ in range(3))
    start = 0
    for i, n in enumerate(lengths):
        segments[start : start + n] = i + 1
        positions[start : start + n] = np.arange(n)
        region[start : start + (prefixes[i] if prefixes else 0)] = 1
        start += n
    return tuple(jnp.asarray(a)[None] for a in (segments, positions, region))


@functools.cache
def params_of(config):
    """Random parameters of the config's shapes and usual scales (initialisers would compile)."""
    rng = np.random.RandomState(0)

    def fill(path, leaf):
        name = path[-1].key
        scale = {"kernel": config.d_model**-0.5, "scale": 0.1}.get(name, 1.0)  # norm scales near 1
        return jnp.asarray((name == "scale") + scale * rng.normal(size=leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0))))


def logits_and_grads(config, features, weights):
    """Logits and d(loss)/d(params), the loss a random projection of the logits of real tokens."""
    params = params_of(config.replace(attention_impl="xla", int8_dense=()))  # the same for every choice
    model = build(config)
    probe = jax.random.normal(jax.random.PRNGKey(1), weights.shape + (config.vocab_size,))

    def loss(p):
        logits = model.apply({"params": p}, **features, enable_dropout=False)
        return jnp.sum(logits * probe * weights[..., None]), logits

    traced = jax.jit(jax.value_and_grad(loss, has_aux=True)).trace(params)
    jaxpr = str(traced.jaxpr)
    assert ("pallas_call" in jaxpr) == (config.attention_impl == "pallas")
    assert ("preferred_element_type=int32" in jaxpr) == bool(config.int8_dense)  # int8 products (XLA on a CPU)
    (_, logits), grads = traced.lower().compile(FAST_COMPILE)(params)
    return logits, grads


def decoder_case(lengths, prefixes=None):
    """A packed decoder batch, or (lengths None) two unpacked rows with padded targets."""
    y = tokens((1 if lengths else 2, LENGTH))
    if lengths is None:
        target = y.at[1, 9:].set(0)
        features = dict(decoder_input_tokens=y, decoder_target_tokens=target)
        if prefixes:
            features["decoder_causal_attention"] = jnp.broadcast_to(jnp.arange(LENGTH) < prefixes, y.shape).astype(
                jnp.int32
            )
        return features, target > 0
    segments, positions, region = packed(lengths, prefixes)
    features = dict(decoder_input_tokens=y * (segments > 0), decoder_segment_ids=segments, decoder_positions=positions)
    if prefixes:
        features["decoder_causal_attention"] = region
    return features, segments > 0


def encoder_decoder_case(packed_rows):
    if packed_rows:
        x_segments, x_positions, _ = packed([5, 6])
        y_segments, y_positions, _ = packed([4, 7])
        features = dict(
            encoder_input_tokens=tokens((1, LENGTH), 1) * (x_segments > 0),
            decoder_input_tokens=tokens((1, LENGTH), 2) * (y_segments > 0),
            encoder_segment_ids=x_segments,
            decoder_segment_ids=y_segments,
            encoder_positions=x_positions,
            decoder_positions=y_positions,
        )
        return features, y_segments > 0
    x = tokens((2, LENGTH), 1).at[1, 7:].set(0)  # encoder padding
    return dict(encoder_input_tokens=x, decoder_input_tokens=tokens((2, LENGTH), 2)), jnp.ones((2, LENGTH), bool)


CASES = {
    "decoder-relative-causal-padded": (small(), lambda: decoder_case(None)),
    "decoder-alibi-prefix-window-sinks-mqa-scaled": (
        small(
            position_encoding="alibi",
            sliding_window=4,
            attention_sinks=2,
            num_kv_heads=1,
            scale_attention_by_head_dim=True,
        ),
        lambda: decoder_case(None, prefixes=5),
    ),
    "decoder-rope-packed-prefix-window-remat": (
        small(position_encoding="rope", sliding_window=5, remat_policy="dots"),
        lambda: decoder_case([4, 5, 2], prefixes=[2, 3, 0]),
    ),
    "decoder-relative-packed-window-sinks": (small(sliding_window=3, attention_sinks=1), lambda: decoder_case([7, 4])),
    "encoder_decoder-relative-padded": (small("encoder_decoder"), lambda: encoder_decoder_case(False)),
    "encoder_decoder-rope-packed": (
        small("encoder_decoder", position_encoding="rope", num_kv_heads=None),
        lambda: encoder_decoder_case(True),
    ),
}


def assert_close(actual, desired, tolerance=1e-5):
    """Equal up to float32 round-off: within `tolerance` of the array's largest magnitude."""
    desired = np.asarray(desired)
    np.testing.assert_allclose(actual, desired, rtol=tolerance, atol=tolerance * np.abs(desired).max())


@pytest.mark.parametrize("case", CASES)
def test_pallas_matches_xla_logits_and_gradients(case):
    config, make = CASES[case]
    features, weights = make()
    xla_logits, xla_grads = logits_and_grads(config, features, weights)
    pallas_logits, pallas_grads = logits_and_grads(config.replace(attention_impl="pallas"), features, weights)
    real = np.asarray(weights)  # padding queries see no key: XLA averages all values, the kernel gives 0
    assert_close(pallas_logits[real], xla_logits[real])
    jax.tree.map(assert_close, pallas_grads, xla_grads)
    if config.position_encoding == "relative":  # the table's gradient comes back through the kernel
        assert np.abs(pallas_grads["decoder"]["positions"]["relpos_bias"]["rel_embedding"]).max() > 0


def test_int8_dense_forward_close_to_float_and_gradients_flow():
    config = small(num_decoder_layers=1)
    features, weights = decoder_case(None)
    float_logits, float_grads = logits_and_grads(config, features, weights)
    int8_logits, int8_grads = logits_and_grads(config.replace(int8_dense=("attention", "mlp")), features, weights)
    # Per-row (activations) and per-column (weights) abs-max int8 through one layer: the largest
    # logit error is 2.5% of the largest logit here (0.9% with int8 MLPs only).
    error = np.abs(int8_logits - float_logits).max() / np.abs(float_logits).max()
    assert 0 < error < 0.05, error
    for path, grad in jax.tree_util.tree_flatten_with_path(int8_grads)[0]:
        reference = float_grads
        for key in path:
            reference = reference[key.key]
        cosine = np.sum(grad * reference) / (np.linalg.norm(grad) * np.linalg.norm(reference))
        assert cosine > 0.99, (jax.tree_util.keystr(path), cosine)


def test_auto_picks_xla_on_cpu_and_while_attention_dropout_is_on():
    assert jax.default_backend() == "cpu"
    assert resolve_impl("auto", attention_dropout=False) == "xla"
    assert resolve_impl("auto", attention_dropout=True) == "xla"


def shapes(config, features, enable_dropout=False):
    model = build(config)
    params = jax.eval_shape(lambda: init_params(config.replace(attention_impl="xla"), jax.random.PRNGKey(0)))
    return jax.eval_shape(
        lambda p: model.apply(
            {"params": p}, **features, enable_dropout=enable_dropout, rngs={"dropout": jax.random.PRNGKey(0)}
        ),
        params,
    )


@pytest.mark.parametrize(
    "config, features, enable_dropout, match",
    [
        (small(attention_impl="cudnn"), decoder_case(None)[0], False, "cudnn.*needs a CUDA GPU.*'cpu'"),
        (
            small(attention_impl="pallas", dropout_rate=0.1),
            decoder_case(None)[0],
            True,
            "no dropout on attention probabilities",
        ),
        (
            small(attention_impl="pallas", sliding_window=3, attention_sinks=1),
            decoder_case([4, 5], [2, 2])[0],
            False,
            "attention_sinks with packed prefix-LM",
        ),
    ],
)
def test_unsupported_combinations_fail_clearly_at_trace_time(config, features, enable_dropout, match):
    with pytest.raises(ValueError, match=match):
        shapes(config, features, enable_dropout)


@pytest.mark.parametrize(
    "changes, allowed",
    [
        ({"attention_impl": "flash"}, "xla, pallas, cudnn, auto"),
        ({"int8_dense": ("attention", "embedding")}, "attention, mlp"),
        ({"int8_dense": "mlp"}, "attention, mlp"),
        ({"int8_dense": ("mlp", "mlp")}, "attention, mlp"),
    ],
)
def test_bad_choices_name_field_and_allowed_values(changes, allowed):
    with pytest.raises(ValueError) as error:
        ModelConfig(**changes)
    assert next(iter(changes)) in str(error.value) and allowed in str(error.value)


def test_new_fields_survive_json():
    config = ModelConfig(attention_impl="pallas", int8_dense=("mlp",))
    assert ModelConfig.from_json(config.to_json()) == config
    assert ModelConfig.from_json(config.to_json()).int8_dense == ("mlp",)
