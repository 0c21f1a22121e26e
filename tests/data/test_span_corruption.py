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
    dataset = tf.data.Dataset.from_generator(lambda: ({"targets": t} for t in token_lists),
                                             output_signature={"targets": tf.TensorSpec([None], tf.int32)})
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
    [ex] = corrupt([random_tokens(rng, 400)], lengths={"inputs": 512, "targets": 512}, noise_density=0.5,
                   mean_noise_span_length=10.0)
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
