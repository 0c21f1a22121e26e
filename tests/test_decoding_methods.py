"""Speculative decoding, contrastive decoding and contrastive search against references built from
full (non-cached) forward passes, and speculative sampling against the target's exact distribution."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats
from test_decoding import (
    DECODER,
    ENCODER_DECODER,
    ENCODER_INPUTS,
    GREEDY,
    N,
    full_forward_log_probs,
    model_and_params,
    prompts,
)

from t5lite.decoding import DecodingOptions, generate
from t5lite.models import build

CONFIGS = [(DECODER, False), (DECODER, True), (ENCODER_DECODER, False)]


@functools.cache
def helper_params(config, scale=0.3):
    """The model's parameters plus noise: a second model that mostly, not always, agrees with it."""
    _, params = model_and_params(config)
    random = np.random.RandomState(1)
    return jax.tree.map(lambda x: x + scale * random.normal(size=x.shape).astype(x.dtype), params)


def decode(config, options, prefix_lm=False, seed=None, **helpers):
    model, params = model_and_params(config)
    return generate(
        model,
        params,
        encoder_input_tokens=ENCODER_INPUTS if config.is_encoder_decoder else None,
        prompt_tokens=prompts(config, prefix_lm),
        prefix_lm=prefix_lm,
        options=options,
        rng=None if seed is None else jax.random.PRNGKey(seed),
        **helpers,
    )


@pytest.mark.parametrize("config, prefix_lm", CONFIGS)
@pytest.mark.parametrize("draft_tokens", [1, 3])
def test_greedy_speculative_decoding_is_the_targets_greedy_decoding(config, prefix_lm, draft_tokens):
    """With a draft that disagrees now and then (some proposals rejected, rows accepting different
    counts in one round), and with the target as its own draft (everything accepted)."""
    model, params = model_and_params(config)
    options = DecodingOptions(max_new_tokens=N, eos_id=None, draft_tokens=draft_tokens)
    greedy = decode(config, GREEDY, prefix_lm)
    noisy = decode(config, options, prefix_lm, draft=(model, helper_params(config)))
    itself = decode(config, options, prefix_lm, draft=(model, params))
    np.testing.assert_array_equal(noisy.tokens, greedy.tokens)
    np.testing.assert_array_equal(itself.tokens, greedy.tokens)
    np.testing.assert_allclose(noisy.scores, greedy.scores, rtol=1e-5)
    # A draft that is always right: draft_tokens + 1 tokens per target pass (the prefill gave the first).
    prompt_lengths = np.count_nonzero(prompts(config, prefix_lm), axis=1)
    fed_in_loop = prompt_lengths - prompt_lengths.min() + N - 1
    np.testing.assert_array_equal(itself.rounds, -(-fed_in_loop // (draft_tokens + 1)))
    assert np.all(noisy.rounds >= itself.rounds)


def test_a_smaller_draft_model_gives_the_targets_greedy_output():
    draft = DECODER.replace(num_decoder_layers=1, d_model=16, num_heads=2, num_kv_heads=1, head_dim=8, d_ff=24)
    draft_params = model_and_params(draft)[1]
    out = decode(DECODER, DecodingOptions(max_new_tokens=N, eos_id=None), draft=(build(draft), draft_params))
    np.testing.assert_array_equal(out.tokens, decode(DECODER, GREEDY).tokens)


VOCAB = 6
SMALL = DECODER.replace(vocab_size=VOCAB, num_decoder_layers=1)


def exact_distribution(params, first_tokens: int):
    """P(first `first_tokens` tokens) after the prompt [start, 1], by enumeration over full forward passes."""
    model = build(SMALL)
    sequences = np.array(list(itertools.product(range(VOCAB), repeat=first_tokens)), np.int32)
    inputs = np.concatenate([np.full((len(sequences), 1), SMALL.start_id), np.ones((len(sequences), 1)), sequences], 1)
    logits = model.apply({"params": params}, inputs.astype(np.int32), enable_dropout=False)
    log_probs = special.log_softmax(np.asarray(logits, np.float64), axis=-1)[:, 1:-1]
    chosen = np.take_along_axis(log_probs, sequences[..., None], axis=-1)[..., 0]
    probs = np.exp(chosen.sum(axis=1))
    return probs / probs.sum()  # sums to 1 up to float32 logits' rounding


@pytest.mark.slow
def test_speculative_sampling_keeps_the_targets_distribution():
    """The first three sampled tokens over 12,000 rows (each its own key) against the target's exact
    joint distribution: a chi-square test. The draft is a much noisier model, so that its own
    distribution (which a wrong acceptance rule would leak) is far from the target's; rows of a
    batch accept different numbers of proposals, so batches of 4 exercise every branch of a round."""
    model, params = model_and_params(SMALL)
    draft_params = helper_params(SMALL, scale=1.0)
    first = 3
    options = DecodingOptions(max_new_tokens=first, eos_id=None, temperature=1.0, draft_tokens=2)
    prompt = np.ones((4, 1), np.int32)
    samples = np.concatenate(
        [
            np.asarray(
                generate(
                    model,
                    params,
                    prompt_tokens=prompt,
                    options=options,
                    rng=jax.random.PRNGKey(seed),
                    draft=(model, draft_params),
                ).tokens
            )
            for seed in range(3000)
        ]
    )
    counts = np.bincount(np.ravel_multi_index(samples.T, (VOCAB,) * first), minlength=VOCAB**first)
    expected = exact_distribution(params, first) * len(samples)
    draft_expected = exact_distribution(draft_params, first) * len(samples)
    assert stats.chisquare(counts, expected).pvalue > 1e-3
    assert stats.chisquare(counts, draft_expected).pvalue < 1e-12  # the test can tell the two apart


@pytest.mark.parametrize("config, prefix_lm", CONFIGS)
def test_greedy_contrastive_decoding_picks_the_plausible_token_the_amateur_likes_least(config, prefix_lm):
    model, _ = model_and_params(config)
    amateur_params = helper_params(config, scale=1.0)
    options = DecodingOptions(max_new_tokens=N, eos_id=None, plausibility_alpha=0.1)
    out = decode(config, options, prefix_lm, amateur=(model, amateur_params))
    tokens = np.asarray(out.tokens)
    expert = full_forward_log_probs(config, tokens, prefix_lm)
    amateur = full_forward_log_probs(config, tokens, prefix_lm, params=amateur_params)
    plausible = expert >= np.log(0.1) + expert.max(-1, keepdims=True)
    expected = np.where(plausible, expert - amateur, -np.inf).argmax(-1)
    np.testing.assert_array_equal(tokens, expected)
    assert not np.array_equal(tokens, decode(config, GREEDY, prefix_lm).tokens)


def search_reference(config, alpha, k, prefix_lm=False):
    """Contrastive search with full forward passes over whole sequences, end-padded (causal attention
    keeps padding out of earlier positions): the context's hidden states from a pass over each row's
    sequence, each candidate's from a pass over the sequence extended by it."""
    model, params = model_and_params(config)
    prompts_ = prompts(config, prefix_lm)
    rows, lengths = len(prompts_), 1 + np.count_nonzero(prompts_, axis=1)
    sequences = np.zeros((rows, lengths.max() + N), np.int32)
    sequences[:, 0] = config.start_id
    sequences[:, 1 : prompts_.shape[1] + 1] = prompts_
    prefix = (np.arange(sequences.shape[1]) < lengths[:, None]).astype(np.int32)

    @functools.partial(jax.jit, static_argnums=0)
    def forward(copies, sequences):
        args = (np.repeat(ENCODER_INPUTS, copies, 0), sequences) if config.is_encoder_decoder else (sequences,)
        features = {"decoder_causal_attention": np.repeat(prefix, copies, 0)} if prefix_lm else {}
        logits, state = model.apply(
            {"params": params}, *args, enable_dropout=False, mutable=["intermediates"], **features
        )
        hidden = state["intermediates"]["decoder"]["final_hidden"][0]
        return jax.nn.softmax(logits), hidden / jnp.linalg.norm(hidden, axis=-1, keepdims=True)

    ends = lengths.copy()  # tokens in each row's sequence
    for _ in range(N):
        probs, context = map(np.asarray, forward(1, sequences))
        candidates = np.argsort(-probs[np.arange(rows), ends - 1], axis=-1, kind="stable")[:, :k]  # [R, k]
        extended = np.repeat(sequences, k, axis=0)
        extended[np.arange(rows * k), np.repeat(ends, k)] = candidates.reshape(-1)
        hidden = np.asarray(forward(k, extended)[1])[np.arange(rows * k), np.repeat(ends, k)].reshape(rows, k, -1)
        similarity = np.einsum("rkd,rld->rkl", hidden, context)
        degeneration = np.where(np.arange(context.shape[1]) < ends[:, None, None], similarity, -np.inf).max(-1)
        top = np.take_along_axis(probs[np.arange(rows), ends - 1], candidates, axis=-1)
        sequences[np.arange(rows), ends] = candidates[
            np.arange(rows), np.argmax((1 - alpha) * top - alpha * degeneration, -1)
        ]
        ends += 1
    return np.stack([sequences[r, lengths[r] : lengths[r] + N] for r in range(rows)])


@pytest.mark.parametrize("config, prefix_lm", CONFIGS)
def test_contrastive_search_matches_a_search_over_full_forward_passes(config, prefix_lm):
    options = DecodingOptions(max_new_tokens=N, eos_id=None, top_k=4, degeneration_penalty=0.6)
    out = decode(config, options, prefix_lm)
    np.testing.assert_array_equal(out.tokens, search_reference(config, 0.6, 4, prefix_lm))
    assert not np.array_equal(out.tokens, decode(config, GREEDY, prefix_lm).tokens)


@pytest.mark.parametrize(
    "options, helper, message",
    [
        (dict(degeneration_penalty=0.5), None, "set top_k"),
        (dict(degeneration_penalty=0.5, top_k=4, temperature=0.7), None, "without sampling"),
        (dict(degeneration_penalty=1.5, top_k=4), None, "degeneration_penalty=1.5 must be in"),
        (dict(plausibility_alpha=0.0), None, "plausibility_alpha=0.0 must be"),
        (dict(draft_tokens=0), None, "draft_tokens=0 must be"),
        (dict(num_beams=2), "draft", "leave num_beams=None"),
        (dict(frequency_penalty=0.5), "draft", "keeps the target's distribution"),
        (dict(), "other_vocab", "same kind of model on the same vocabulary"),
    ],
)
def test_bad_method_options_are_refused_clearly(options, helper, message):
    model, params = model_and_params(DECODER)
    with pytest.raises(ValueError, match=message):
        helpers = {}
        if helper == "draft":
            helpers["draft"] = (model, params)
        elif helper == "other_vocab":
            other = DECODER.replace(vocab_size=32)
            helpers["amateur"] = (build(other), model_and_params(other)[1])
        generate(model, params, prompt_tokens=prompts(DECODER), options=DecodingOptions(**options), **helpers)
