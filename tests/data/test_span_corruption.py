import functools
import importlib.util
import pathlib

import gin
import numpy as np
import pytest
import seqio
import tensorflow as tf

from t5lite.data import span_corruption as sc

VOCAB = seqio.ByteVocabulary(extra_ids=100)  # ids 3..258 are bytes, 259..358 sentinels
FEATURES = {key: seqio.Feature(VOCAB) for key in ("inputs", "targets")}
LENGTHS = {"inputs": 512, "targets": 114}


def corrupt(token_lists, lengths=LENGTHS, seed=0, **kwargs):
    dataset = tf.data.Dataset.from_generator(
        lambda: ({"targets": t} for t in token_lists), output_signature={"targets": tf.TensorSpec([None], tf.int32)}
    )
    with seqio.utils.map_seed_manager(seed):
        dataset = sc.span_corruption(dataset, lengths, FEATURES, **kwargs)
    return list(dataset.as_numpy_iterator())


def random_tokens(rng, length):
    return rng.integers(3, 259, size=length).astype(np.int32)


def reconstruct(inputs, targets):
    """Puts each span of the targets back in place of its sentinel in the inputs."""
    is_sentinel = lambda t: t >= VOCAB.vocab_size - VOCAB.extra_ids
    spans, current = {}, None
    for token in targets:
        if is_sentinel(token):
            current = spans.setdefault(int(token), [])
        else:
            current.append(int(token))
    return [t for token in inputs for t in (spans[int(token)] if is_sentinel(token) else [int(token)])]


def test_lengths_match_t5():
    assert sc.raw_length(512) == 568 and sc.targets_length_for(512) == 114
    assert sc.corrupted_lengths(568) == (512, 114)
    assert sc.noise_counts(568) == (85, 28)
    assert sc.noise_counts(2) == (1, 1)
    # With a short targets length the chunk shrinks until the targets fit too.
    n = sc.raw_length(512, 50)
    assert sc.corrupted_lengths(n)[1] <= 50 < sc.corrupted_lengths(n + 1)[1]


def test_structure_sentinels_and_reconstruction():
    rng = np.random.default_rng(0)
    originals = [random_tokens(rng, 568) for _ in range(50)]
    examples = corrupt(originals)
    assert len(examples) == 50
    top = VOCAB.vocab_size - 1
    first_noise = set()
    for original, ex in zip(originals, examples):
        inputs, targets = ex["inputs"], ex["targets"]
        assert len(inputs) == 511 and len(targets) == 113  # EOS is appended later
        sentinels_in = inputs[inputs > 258]
        np.testing.assert_array_equal(sentinels_in, np.arange(top, top - 28, -1))  # <extra_id_0>, 1, ...
        np.testing.assert_array_equal(targets[targets > 258], sentinels_in)
        assert inputs[0] <= 258 and targets[0] == top  # text starts clean; targets start with a sentinel
        assert not np.any((targets[1:] > 258) & (targets[:-1] > 258))  # no empty span
        assert reconstruct(inputs, targets) == original.tolist()
        first_noise.add(int(np.argmax(inputs > 258)))
    assert len(first_noise) > 10  # span positions are random


def test_noise_density_and_mean_span_length():
    rng = np.random.default_rng(1)
    examples = corrupt([random_tokens(rng, n) for n in rng.integers(20, 568, size=200)])
    noise = spans = total = 0
    span_lengths = []
    for ex in examples:
        targets = ex["targets"]
        starts = np.flatnonzero(targets > 258)
        span_lengths += np.diff(np.append(starts, len(targets))).tolist()
        spans += len(starts)
        noise += len(targets) - len(starts)
        total += len(ex["inputs"]) - len(starts) + len(targets) - len(starts)
    assert abs(noise / total - 0.15) < 0.005
    assert abs(noise / spans - 3.0) < 0.15
    span_lengths = np.array(span_lengths) - 1  # minus the sentinel
    assert span_lengths.min() >= 1 and span_lengths.max() >= 8  # random lengths, not all 3


def test_seeded_and_long_texts_are_split_not_truncated():
    rng = np.random.default_rng(2)
    text = random_tokens(rng, 1500)
    examples = corrupt([text])
    assert [len(reconstruct(e["inputs"], e["targets"])) for e in examples] == [568, 568, 364]
    assert sum((reconstruct(e["inputs"], e["targets"]) for e in examples), []) == text.tolist()
    same, other = corrupt([text]), corrupt([text], seed=7)
    assert all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(examples, same))
    assert not all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(examples, other))


def test_other_noise_settings():
    rng = np.random.default_rng(3)
    [ex] = corrupt(
        [random_tokens(rng, 400)],
        lengths={"inputs": 512, "targets": 512},
        noise_density=0.5,
        mean_noise_span_length=10.0,
    )
    assert len(ex["targets"]) - np.sum(ex["targets"] > 258) == 200
    assert np.sum(ex["targets"] > 258) == 20 and len(ex["inputs"]) == 220
    # The targets length limits the chunk too: 114 targets fit about 100 noise tokens.
    examples = corrupt([random_tokens(rng, 400)], noise_density=0.5, mean_noise_span_length=10.0)
    assert len(examples) == 2 and max(len(e["targets"]) for e in examples) <= 113


def test_noise_settings_from_gin():
    rng = np.random.default_rng(4)
    with gin.unlock_config():
        gin.parse_config("t5lite.data.span_corruption.noise_density = 0.3")
    try:
        [ex] = corrupt([random_tokens(rng, 100)], lengths={"inputs": 512, "targets": 512})
    finally:
        gin.clear_config()
    assert len(ex["targets"]) - np.sum(ex["targets"] > 258) == 30 and np.sum(ex["targets"] > 258) == 10


def test_bad_settings():
    with pytest.raises(ValueError, match="needs task_feature_lengths"):
        corrupt([np.arange(3, 20, dtype=np.int32)], lengths={"targets": 20})
    with pytest.raises(ValueError, match="too short"):
        corrupt([np.arange(3, 20, dtype=np.int32)], lengths={"inputs": 2, "targets": 2})
    with pytest.raises(ValueError, match="noise_density"):
        corrupt([np.arange(3, 20, dtype=np.int32)], noise_density=1.5)
    few = {key: seqio.Feature(seqio.ByteVocabulary(extra_ids=5)) for key in ("inputs", "targets")}
    with pytest.raises(ValueError, match="only 5 extra ids"):
        sc.span_corruption(tf.data.Dataset.range(1), LENGTHS, few)


@functools.cache
def t5_preprocessors():
    """T5's own preprocessors (the `t5` package, installed without its dependencies by `make test`):
    its package __init__ pulls in T5's evaluation stack, so the one file is loaded alone."""
    spec = importlib.util.find_spec("t5")
    if spec is None:
        pytest.skip("the t5 package is not installed: `pip install --no-deps t5==0.9.4 babel` (make test does)")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "data" / "preprocessors.py"
    module_spec = importlib.util.spec_from_file_location("t5_reference_preprocessors", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def documents(token_lists):
    return tf.data.Dataset.from_generator(
        lambda: ({"targets": t} for t in token_lists), output_signature={"targets": tf.TensorSpec([None], tf.int32)}
    )


def t5_span_corruption(token_lists, seed=0):
    with seqio.utils.map_seed_manager(seed):
        dataset = t5_preprocessors().span_corruption(documents(token_lists), LENGTHS, FEATURES)
    return list(dataset.as_numpy_iterator())


def statistics(examples):
    """Example count, mean inputs / targets length, noise density and spans per example."""
    spans = [int(np.sum(e["targets"] > 258)) for e in examples]
    noise = sum(len(e["targets"]) for e in examples) - sum(spans)
    raw = sum(len(e["inputs"]) + len(e["targets"]) - 2 * s for e, s in zip(examples, spans))
    lengths = [(len(e["inputs"]), len(e["targets"])) for e in examples]
    return (len(examples), *np.mean(lengths, axis=0), noise / raw, np.mean(spans))


def test_documents_are_concatenated_and_chunked_as_t5_does():
    """Same documents through T5's span_corruption and ours: the same pieces of the same
    concatenated text, each with T5's noise density and number of spans; only where the spans
    fall differs (another random stream)."""
    rng = np.random.default_rng(5)
    texts = [random_tokens(rng, n) for n in np.minimum(rng.lognormal(5.0, 1.2, size=300).astype(int) + 1, 6000)]
    ours, theirs = corrupt(texts), t5_span_corruption(texts)
    theirs = [e for e in theirs if len(e["inputs"]) > 1]  # T5 keeps 1-token tails (no noise); we drop them
    assert len(ours) == len(theirs) > 50
    assert [reconstruct(e["inputs"], e["targets"]) for e in ours] == [
        reconstruct(e["inputs"], e["targets"]) for e in theirs
    ]
    np.testing.assert_allclose(statistics(ours), statistics(theirs), rtol=1e-12)
    assert np.mean([len(e["inputs"]) == 511 for e in ours]) > 0.9  # nearly all full length
    assert not all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(ours, theirs))


def test_long_documents_give_one_random_chunk_as_t5_does():
    rng = np.random.default_rng(6)
    texts = [random_tokens(rng, n) for n in rng.integers(250, 1000, size=300)]
    t5 = t5_preprocessors()

    def chunk_lengths(select):
        with seqio.utils.map_seed_manager(0):
            return [len(e["targets"]) for e in select(documents(texts)).as_numpy_iterator()]

    ours = chunk_lengths(lambda ds: sc.select_random_chunk(ds, 100))
    theirs = chunk_lengths(lambda ds: t5.select_random_chunk(ds, FEATURES, max_length=100))
    assert len(ours) == len(theirs) == 300
    # A document of n tokens gives its last chunk (n mod 100 tokens) with probability 1 / ceil(n / 100).
    expected = np.mean([1 - 1 / np.ceil(len(t) / 100) for t in texts])
    for lengths in (ours, theirs):
        assert abs(np.mean(np.array(lengths) == 100) - expected) < 0.08
    chunks = [e["targets"] for e in sc.select_random_chunk(documents(texts), 100).as_numpy_iterator()]
    for text, chunk in zip(texts, chunks):  # aligned chunks of the document
        assert any(np.array_equal(text[i : i + 100], chunk) for i in range(0, len(text), 100))


def test_documents_can_be_corrupted_one_by_one():
    rng = np.random.default_rng(7)
    texts = [random_tokens(rng, 100) for _ in range(10)]
    pieces = corrupt(texts, concatenate=False)
    assert [len(reconstruct(e["inputs"], e["targets"])) for e in pieces] == [100] * 10
    assert [len(reconstruct(e["inputs"], e["targets"])) for e in corrupt(texts)] == [568, 432]
