"""Decoding: greedy, sampling, beam search and penalties against the full forward pass and
against small hand-made "models" (step functions over a table of logits)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5lite import decoding
from t5lite.decoding import DecodingOptions, generate, generation
from t5lite.decoding.steps import decoding_model
from t5lite.models import abstract_params, build, get_config

TINY = dict(dtype="float32", vocab_size=64, d_model=32, d_ff=48, num_heads=4, head_dim=8, max_length=64)
DECODER = get_config("llama/tiny").replace(num_kv_heads=2, **TINY)
ENCODER_DECODER = get_config("t5_1_1/tiny").replace(**TINY)
N = 6
GREEDY = DecodingOptions(max_new_tokens=N, eos_id=None)
# Ragged prompts: the shortest is prefilled, the rest force-fed; one row is empty.
PROMPTS = np.array([[5, 6, 7, 0], [8, 9, 0, 0], [3, 4, 5, 6], [0, 0, 0, 0]], np.int32)
# A prefix-LM batch is decoded in groups of equal prompt length: two groups here.
PREFIX_PROMPTS = np.array([[5, 6, 7], [8, 9, 0], [3, 4, 5]], np.int32)
ENCODER_INPUTS = np.array([[5, 6, 7, 8, 0], [9, 10, 0, 0, 0], [11, 12, 13, 14, 15]], np.int32)
# The encoder-decoder's prompts are forced starts of its outputs.
OUTPUT_STARTS = np.array([[7, 0], [0, 0], [9, 10]], np.int32)


@functools.cache
def model_and_params(config):
    """The model and random parameters. Filling in the abstract shapes takes well under a second;
    compiling the initialiser (init_params) takes several on a 2-core CPU, and decoding cares
    about the shapes, not the initialisation scheme."""
    random = np.random.RandomState(0)
    params = jax.tree.map(lambda leaf: random.normal(0, 0.5, leaf.shape).astype(leaf.dtype), abstract_params(config))
    return build(config), params


@functools.cache
def forward(config):
    """The jitted full (non-cached) forward pass."""
    model, params = model_and_params(config)
    return jax.jit(lambda *args, **features: model.apply({"params": params}, *args, enable_dropout=False, **features))


def prompts(config, prefix_lm=False):
    if config.is_encoder_decoder:
        return OUTPUT_STARTS
    return PREFIX_PROMPTS if prefix_lm else PROMPTS


@functools.cache
def run(config, options, prefix_lm=False, seed=None):
    """generate() on the shared inputs, cached: each options value compiles once per test session."""
    model, params = model_and_params(config)
    encoder_inputs = ENCODER_INPUTS if config.is_encoder_decoder else None
    rng = None if seed is None else jax.random.PRNGKey(seed)
    return generate(
        model,
        params,
        encoder_input_tokens=encoder_inputs,
        prompt_tokens=prompts(config, prefix_lm),
        prefix_lm=prefix_lm,
        options=options,
        rng=rng,
    )


def full_forward_log_probs(config, tokens, prefix_lm=False, params=None):
    """log p(token | everything before it) for each generated token, [B, N, V], from one
    non-cached forward pass over start token + prompt + generated tokens (of `params`, if given)."""
    prompts_ = prompts(config, prefix_lm)
    lengths = 1 + np.count_nonzero(prompts_, axis=1)
    y = np.zeros((len(tokens), lengths.max() + tokens.shape[1]), np.int32)
    for row, (n, prompt) in enumerate(zip(lengths, prompts_)):
        y[row, 1:n] = prompt[: n - 1]
        y[row, n : n + tokens.shape[1]] = tokens[row]
    features = {}
    if prefix_lm:
        features["decoder_causal_attention"] = (np.arange(y.shape[1]) < lengths[:, None]).astype(np.int32)
    apply = forward(config)
    if params is not None:
        apply = functools.partial(build(config).apply, {"params": params}, enable_dropout=False)
    logits = apply(*((ENCODER_INPUTS, y) if config.is_encoder_decoder else (y,)), **features)
    predicting = lengths[:, None] - 1 + np.arange(tokens.shape[1])
    return np.asarray(jax.nn.log_softmax(np.take_along_axis(np.asarray(logits), predicting[..., None], axis=1)))


def up_to_eos(tokens, eos_id):
    """True up to and including each row's first `eos_id`."""
    is_eos = np.asarray(tokens) == eos_id
    return np.cumsum(is_eos, axis=1) - is_eos == 0


def until_eos(tokens, eos_id):
    """Each row's tokens up to and including the first `eos_id`, then 0s."""
    return np.where(up_to_eos(tokens, eos_id), tokens, 0)


def sequence_log_probs(log_probs, tokens, eos_id=None):
    chosen = np.take_along_axis(log_probs, np.asarray(tokens)[..., None], axis=-1)[..., 0]
    return np.where(up_to_eos(tokens, eos_id), chosen, 0.0).sum(axis=1)


@pytest.mark.parametrize(
    "config, prefix_lm",
    [
        (DECODER, False),
        (DECODER, True),
        (ENCODER_DECODER, False),
        # The flash kernel (interpreted) over the cache: causal by positions, the unwritten cache skipped.
        (DECODER.replace(attention_impl="pallas"), False),
        (DECODER.replace(attention_impl="pallas"), True),
        (ENCODER_DECODER.replace(attention_impl="pallas"), False),
    ],
)
def test_greedy_equals_argmax_of_full_forward(config, prefix_lm):
    out = run(config, GREEDY, prefix_lm)
    log_probs = full_forward_log_probs(config.replace(attention_impl="xla"), np.asarray(out.tokens), prefix_lm)
    np.testing.assert_array_equal(out.tokens, log_probs.argmax(-1))
    np.testing.assert_allclose(out.scores, log_probs.max(-1).sum(-1), rtol=1e-5)


def test_eos_stops_rows_and_pads():
    free = np.asarray(run(DECODER, GREEDY).tokens)
    eos_id = int(free[0, 2])
    out = run(DECODER, DecodingOptions(max_new_tokens=N, eos_id=eos_id))
    expected = until_eos(free, eos_id)
    assert (expected == 0).any() and (expected[:, -1] != 0).any()  # some rows stop early, some do not
    np.testing.assert_array_equal(out.tokens, expected)
    np.testing.assert_allclose(
        out.scores, sequence_log_probs(full_forward_log_probs(DECODER, expected), expected, eos_id), rtol=1e-5
    )


def test_seeded_sampler_is_deterministic_and_seeds_differ():
    options = DecodingOptions(max_new_tokens=N, eos_id=None, temperature=1.0, top_p=0.95)
    model, params = model_and_params(DECODER)
    first = run(DECODER, options, seed=0).tokens
    again = generate(model, params, prompt_tokens=PROMPTS, options=options, rng=jax.random.PRNGKey(0)).tokens
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, run(DECODER, options, seed=1).tokens)
    assert not np.array_equal(first, run(DECODER, GREEDY).tokens)


def test_beam_width_one_is_greedy():
    eos_id = int(run(DECODER, GREEDY).tokens[0, 2])
    beam = run(DECODER, DecodingOptions(max_new_tokens=N, eos_id=eos_id, num_beams=1, length_penalty=0.0))
    greedy = until_eos(np.asarray(run(DECODER, GREEDY).tokens), eos_id)
    np.testing.assert_array_equal(beam.tokens, greedy)
    np.testing.assert_allclose(
        beam.scores, sequence_log_probs(full_forward_log_probs(DECODER, greedy), greedy, eos_id), rtol=1e-5
    )


def test_beam_search_with_every_beam_is_exhaustive():
    """With as many beams as tokens, two steps keep every prefix: the best of all 64 * 64 sequences."""
    model, params = model_and_params(DECODER)
    prompt = np.array([[5, 6, 7]], np.int32)
    options = DecodingOptions(max_new_tokens=2, eos_id=None, num_beams=64, length_penalty=0.0)
    beam = generate(model, params, prompt_tokens=prompt, options=options)
    firsts = np.arange(64)[:, None]
    inputs = np.concatenate([np.zeros((64, 1), np.int32), np.repeat(prompt, 64, axis=0), firsts], axis=1)
    log_probs = np.asarray(jax.nn.log_softmax(forward(DECODER)(inputs)))
    totals = log_probs[0, -2][:, None] + log_probs[:, -1]  # [first token, second token]
    best = np.unravel_index(totals.argmax(), totals.shape)
    np.testing.assert_array_equal(beam.tokens, [best])
    np.testing.assert_allclose(beam.scores, [totals.max()], rtol=1e-5)


def test_beam_search_on_encoder_decoder_scores_what_it_returns():
    eos_id = int(run(ENCODER_DECODER, GREEDY).tokens[0, 2])
    alpha = 0.6
    beam = run(ENCODER_DECODER, DecodingOptions(max_new_tokens=N, eos_id=eos_id, num_beams=3, length_penalty=alpha))
    greedy = until_eos(np.asarray(run(ENCODER_DECODER, GREEDY).tokens), eos_id)

    def penalised(tokens):
        log_probs = sequence_log_probs(full_forward_log_probs(ENCODER_DECODER, np.asarray(tokens)), tokens, eos_id)
        return log_probs / decoding.length_penalty(up_to_eos(tokens, eos_id).sum(axis=1), alpha)

    np.testing.assert_allclose(beam.scores, penalised(beam.tokens), rtol=1e-5)
    assert np.all(beam.scores >= penalised(greedy) - 1e-6) and np.any(beam.scores > penalised(greedy) + 1e-3)


def bigram(rows, vocab=6):
    """A log-probability table: row `previous token` is {next token: probability}; rows not given
    always go to EOS (1). Unlisted next tokens get a tiny probability."""
    probs = np.full((vocab, vocab), 1e-6)
    probs[:, 1] = 1.0
    for previous, following in rows.items():
        probs[previous, 1] = 1e-6
        for token, p in following.items():
            probs[previous, token] = p
    return jnp.log(probs / probs.sum(-1, keepdims=True))


@functools.partial(jax.jit, static_argnames="options")
def search_table(table, options, prompt=jnp.zeros((1, 1), jnp.int32), rng=jax.random.PRNGKey(0)):
    """Decodes from a bigram table (a "model" whose next logits depend on the last token only),
    force-feeding `prompt` [B, P] after the start token 0 that it begins with; its EOS is 1."""
    if options.eos_id == "model":
        options = dataclasses.replace(options, eos_id=1)
    batch = prompt.shape[0]
    step = lambda cache, token: (table[token], cache)
    lengths, logits = jnp.full(batch, prompt.shape[1]), jnp.broadcast_to(table[0], (batch, table.shape[1]))
    if options.num_beams is None:
        return decoding.sample(step, (), logits, prompt, lengths, 1, options, jax.random.split(rng, batch))
    return decoding.beam_search(step, (), logits, prompt, lengths, 1, options, lambda cache, index: cache)


@pytest.mark.parametrize(
    "options",
    [
        DecodingOptions(max_new_tokens=8, temperature=1.0, top_k=1),
        DecodingOptions(max_new_tokens=8, temperature=1e-4),
    ],
    ids=["top_k=1", "temperature=1e-4"],
)
def test_sampling_that_can_only_pick_the_top_token_is_greedy(options):
    table = jax.random.normal(jax.random.PRNGKey(0), (32, 32))
    prompt = jnp.stack([jnp.zeros(16, jnp.int32), jnp.arange(16)], axis=1)  # 16 different rows
    greedy = search_table(table, DecodingOptions(max_new_tokens=8), prompt)
    sampled = search_table(table, options, prompt, jax.random.PRNGKey(1))
    np.testing.assert_array_equal(sampled.tokens, greedy.tokens)
    np.testing.assert_allclose(sampled.scores, greedy.scores, rtol=1e-6)
    # The same table at temperature 1 does sample something else.
    assert not np.array_equal(
        search_table(table, DecodingOptions(max_new_tokens=8, temperature=1.0), prompt).tokens, greedy.tokens
    )


START, EOS, A, B, C, D = range(6)


def test_beam_search_beats_greedy_when_the_likely_first_token_leads_nowhere():
    table = bigram({START: {A: 0.6, B: 0.4}, A: {C: 0.55, D: 0.45}, B: {C: 0.9, D: 0.1}})
    greedy = search_table(table, DecodingOptions(max_new_tokens=4))
    np.testing.assert_array_equal(greedy.tokens, [[A, C, EOS, 0]])
    np.testing.assert_allclose(greedy.scores, [np.log(0.6 * 0.55)], rtol=1e-4)
    beam = search_table(table, DecodingOptions(max_new_tokens=4, num_beams=2, length_penalty=0.6))
    np.testing.assert_array_equal(beam.tokens, [[B, C, EOS, 0]])
    np.testing.assert_allclose(beam.scores, [np.log(0.4 * 0.9) / (8 / 6) ** 0.6], rtol=1e-4)


@pytest.mark.parametrize("alpha, expected", [(0.0, [EOS, 0, 0]), (2.0, [A, EOS, 0])])
def test_length_penalty_decides_between_short_and_long(alpha, expected):
    # log p: [EOS] -0.65; [A, EOS] -0.84, which beats -0.65 once divided by ((5 + 2) / 6) ** 2.
    table = bigram({START: {EOS: 0.52, A: 0.48}, A: {EOS: 0.9, B: 0.1}})
    beam = search_table(table, DecodingOptions(max_new_tokens=3, num_beams=2, length_penalty=alpha))
    np.testing.assert_array_equal(beam.tokens, [expected])


def test_penalties_follow_the_formula_and_count_only_generated_tokens():
    logits = jnp.array([2.0, 1.5, 1.0, 0.2, 0.0, -1.0])
    counts = jnp.array([3, 1, 0, 0, 2, 0])
    np.testing.assert_allclose(
        decoding.apply_penalties(logits, counts, presence_penalty=0.5, frequency_penalty=0.25),
        logits - 0.25 * counts - 0.5 * (counts > 0),
    )
    table = jnp.broadcast_to(logits, (6, 6))
    options = DecodingOptions(max_new_tokens=8, eos_id=None, presence_penalty=0.3, frequency_penalty=0.4)
    # The prompt holds the top token (0) twice, force-fed after the start token; it must not be penalised.
    out = search_table(table, options, jnp.array([[START, 0, 0]]))
    counts, expected, score = np.zeros(6), [], 0.0
    for _ in range(8):
        penalised = np.asarray(logits) - 0.4 * counts - 0.3 * (counts > 0)
        token = int(penalised.argmax())
        score += penalised[token] - np.log(np.exp(penalised).sum())
        expected.append(token)
        counts[token] += 1
    assert expected[0] == 0 and len(set(expected)) > 2
    np.testing.assert_array_equal(out.tokens, [expected])
    np.testing.assert_allclose(out.scores, [score], rtol=1e-5)


def test_top_k_and_top_p_filters():
    probs = np.array([0.35, 0.25, 0.2, 0.1, 0.05, 0.03, 0.01, 0.01])
    logits = jnp.log(probs)
    kept = lambda **kwargs: np.flatnonzero(np.asarray(decoding.filter_logits(logits, **kwargs)) > -1e8).tolist()
    assert kept(top_k=3) == [0, 1, 2]
    assert kept(top_p=0.3) == [0]
    assert kept(top_p=0.55) == [0, 1]  # the nucleus is the fewest tokens reaching top_p
    assert kept(top_p=0.7) == [0, 1, 2]
    assert kept(top_p=1.0) == list(range(8))
    assert kept(top_k=2, top_p=0.9) == [0, 1]


def test_nucleus_sampling_draws_from_the_renormalised_nucleus():
    probs = np.array([0.35, 0.25, 0.2, 0.1, 0.05, 0.03, 0.01, 0.01])
    table = jnp.broadcast_to(jnp.log(probs), (8, 8))
    options = DecodingOptions(max_new_tokens=1, eos_id=None, temperature=1.0, top_p=0.7)
    draws = np.asarray(search_table(table, options, jnp.zeros((4000, 1), jnp.int32)).tokens[:, 0])
    frequencies = np.bincount(draws, minlength=8) / len(draws)
    np.testing.assert_array_equal(frequencies[3:], 0)
    np.testing.assert_allclose(frequencies[:3], probs[:3] / probs[:3].sum(), atol=0.03)


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(num_beams=0), "num_beams"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(length_penalty=-1.0), "length_penalty"),
        (dict(presence_penalty=float("nan")), "presence_penalty"),
        (dict(eos_id=0), "eos_id"),
        (dict(num_beams=4, temperature=0.7), "num_beams"),
    ],
)
def test_bad_options_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        DecodingOptions(**changes)


@pytest.mark.parametrize(
    "config, inputs, options, message",
    [
        (ENCODER_DECODER, dict(prompt_tokens=PROMPTS), GREEDY, "needs encoder_input_tokens"),
        (DECODER, dict(), GREEDY, "needs prompt_tokens"),
        (DECODER, dict(prompt_tokens=[[0, 5]]), GREEDY, "right-padded"),
        (DECODER, dict(prompt_tokens=[[70]]), GREEDY, "outside"),
        (DECODER, dict(prompt_tokens=PROMPTS), DecodingOptions(temperature=1.0), "needs rng"),
        (DECODER, dict(prompt_tokens=PROMPTS), DecodingOptions(eos_id=64), "eos_id"),
        (DECODER.replace(position_encoding="learned", max_length=8), dict(prompt_tokens=PROMPTS), GREEDY, "max_length"),
        (ENCODER_DECODER, dict(encoder_input_tokens=ENCODER_INPUTS, prefix_lm=True), GREEDY, "prefix_lm"),
    ],
)
def test_bad_inputs_fail_before_compiling(config, inputs, options, message):
    with pytest.raises(ValueError, match=message):
        generate(build(config), None, **inputs, options=options)


@pytest.mark.parametrize("config", [DECODER, ENCODER_DECODER])
@pytest.mark.parametrize("options", [GREEDY, DecodingOptions(max_new_tokens=N, num_beams=3, eos_id=None)])
def test_stacked_layers_decode_as_the_unrolled_ones_the_cpu_runs(config, options, monkeypatch):
    """On the CPU a scanned model decodes with its layers unrolled; TPU and GPU keep the stacked
    parameters and cache in the loop (beam search reorders the stacked cache): both give the same."""
    model, params = model_and_params(config)
    unrolled, unstack = decoding_model(model)
    assert unstack and config.scan_layers and not unrolled.config.scan_layers
    unrolled_result = run(config, options)
    monkeypatch.setattr(generation, "decoding_model", lambda model: (model, False))
    stacked_result = generate(
        model,
        params,
        encoder_input_tokens=ENCODER_INPUTS if config.is_encoder_decoder else None,
        prompt_tokens=prompts(config),
        options=options,
    )
    np.testing.assert_array_equal(np.asarray(stacked_result.tokens), np.asarray(unrolled_result.tokens))
    np.testing.assert_allclose(np.asarray(stacked_result.scores), np.asarray(unrolled_result.scores), rtol=1e-5)


def test_suppressed_tokens_are_never_chosen():
    greedy = np.asarray(run(DECODER, GREEDY).tokens)
    banned = tuple(int(t) for t in np.unique(greedy)[:3])  # tokens greedy decoding picks
    model, params = model_and_params(DECODER)
    options = dataclasses.replace(GREEDY, suppress_tokens=banned)
    tokens = np.asarray(generate(model, params, prompt_tokens=PROMPTS, options=options).tokens)
    assert not np.isin(tokens, banned).any() and tokens.all()
    with pytest.raises(ValueError, match="suppress_tokens"):
        DecodingOptions(num_beams=2, suppress_tokens=(0,))
    with pytest.raises(ValueError, match="vocab_size=64"):
        generate(model, params, prompt_tokens=PROMPTS, options=dataclasses.replace(GREEDY, suppress_tokens=(64,)))
