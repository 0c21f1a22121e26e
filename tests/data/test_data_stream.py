import numpy as np
import pytest

from t5lite import data

ENC_DEC = {"inputs": 64, "targets": 16}
FEATURES = {
    "encoder_decoder": {
        "encoder_input_tokens",
        "decoder_input_tokens",
        "decoder_target_tokens",
        "decoder_loss_weights",
        "encoder_segment_ids",
        "decoder_segment_ids",
        "encoder_positions",
        "decoder_positions",
    },
    "decoder": {
        "decoder_input_tokens",
        "decoder_target_tokens",
        "decoder_loss_weights",
        "decoder_segment_ids",
        "decoder_positions",
    },
    "prefix_lm": {
        "decoder_input_tokens",
        "decoder_target_tokens",
        "decoder_loss_weights",
        "decoder_segment_ids",
        "decoder_positions",
        "decoder_causal_attention",
    },
}


def stream(name="t5lite_corpus_span_corruption", **kwargs):
    kwargs = {
        "split": "train",
        "task_feature_lengths": ENC_DEC,
        "batch_size": 4,
        "model_kind": "encoder_decoder",
        **kwargs,
    }
    return data.DataStream(name, **kwargs)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize(
    "name, model_kind, lengths",
    [
        ("t5lite_corpus_span_corruption", "encoder_decoder", ENC_DEC),
        ("t5lite_corpus_lm", "decoder", {"targets": 64}),
        ("t5lite_corpus_prefix_lm", "prefix_lm", {"inputs": 32, "targets": 32}),
    ],
)
def test_packed_batches_have_seqio_features(vocabulary, name, model_kind, lengths):
    s = stream(name, model_kind=model_kind, task_feature_lengths=lengths, shuffle=False)
    assert s.vocabulary == vocabulary
    batch = next(s)
    assert set(batch) == FEATURES[model_kind]
    for key, value in batch.items():
        assert value.dtype == np.int32 and value.shape == (4, s.model_feature_lengths[key]), key
    assert s.model_feature_lengths["decoder_target_tokens"] == (16 if model_kind == "encoder_decoder" else 64)
    targets, inputs = batch["decoder_target_tokens"], batch["decoder_input_tokens"]
    segments, positions = batch["decoder_segment_ids"], batch["decoder_positions"]
    if model_kind == "encoder_decoder":  # T5's concatenated documents fill the inputs exactly
        assert (batch["encoder_segment_ids"] == 1).all()
    else:
        assert segments.max() >= 2  # packing put several examples in a row
    for row in range(4):
        for segment in range(1, segments[row].max() + 1):
            where = np.flatnonzero(segments[row] == segment)
            np.testing.assert_array_equal(positions[row, where], np.arange(len(where)))
            assert inputs[row, where[0]] == 0  # each packed example starts from BOS
            np.testing.assert_array_equal(inputs[row, where[1:]], targets[row, where[:-1]])
    weights = batch["decoder_loss_weights"] > 0
    if model_kind == "prefix_lm":  # no loss on the prefix; attention to it is bidirectional
        prefix = batch["decoder_causal_attention"] > 0
        assert prefix.any() and not (weights & prefix & (np.roll(prefix, -1, axis=1))).any()
    else:
        np.testing.assert_array_equal(weights, segments > 0)
    if model_kind == "encoder_decoder":
        assert (targets[segments > 0] >= vocabulary.vocab_size - 100).any()  # sentinels
        assert vocabulary.decode([t for t in targets[0] if t < 4000]) != ""


def test_unpacked_rows_hold_one_example():
    batch = next(stream(pack=False, shuffle=False))
    assert set(batch) == {
        "encoder_input_tokens",
        "decoder_input_tokens",
        "decoder_target_tokens",
        "decoder_loss_weights",
    }
    for row in batch["decoder_target_tokens"]:
        assert np.sum(row == 1) == 1  # a single EOS


def test_resume_is_exact_from_a_saved_state_or_a_replay(tmp_path):
    uninterrupted = stream(shuffle=True, seed=3)
    batches = take(uninterrupted, 4)
    uninterrupted.save(str(tmp_path / "state"))
    batches += take(uninterrupted, 3)
    assert uninterrupted.position == 7
    resumed = stream(shuffle=True, seed=3)
    resumed.restore(str(tmp_path / "state"), position=4)
    assert resumed.position == 4
    assert_same(take(resumed, 3), batches[4:])
    assert resumed.position == 7
    assert_same(take(resumed, 2), take(uninterrupted, 2))
    replayed = stream(shuffle=True, seed=3)
    replayed.skip(4)
    assert replayed.position == 4
    assert_same(take(replayed, 3), batches[4:])
    with pytest.raises(ValueError, match="does not fit this one"):
        stream("t5lite_corpus_prefix_lm", model_kind="prefix_lm").restore(str(tmp_path / "state"), position=4)


def test_a_stream_of_another_batch_size_continues_after_the_rows_read(tmp_path):
    """A run resumed with another batch size (--allow_config_change): rows 12..19 read by a batch-8
    stream that skipped the 12 rows three batch-4 batches held are batches 4 and 5 of the batch-4 one.
    Its state, saved later, fits a stream built with the same skip."""
    small = stream(shuffle=True, seed=3)
    take(small, 3)
    expected = take(small, 4)
    big = stream(shuffle=True, seed=3, batch_size=8)
    big.skip_rows(12)
    assert big.rows_read == 12
    first = next(big)
    for key, value in first.items():
        np.testing.assert_array_equal(value, np.concatenate([expected[0][key], expected[1][key]]), err_msg=key)
    assert big.rows_read == 20
    big.save(str(tmp_path / "state"))
    resumed = stream(shuffle=True, seed=3, batch_size=8)
    resumed.skip_rows(big.rows_skipped)
    resumed.restore(str(tmp_path / "state"), position=1)
    assert_same([next(resumed)], [{k: np.concatenate([expected[2][k], expected[3][k]]) for k in first}])


def rows(s):
    """All non-padding rows of a finite stream, as tuples."""
    out = []
    for batch in s:
        out += [tuple(r) for r in batch["decoder_target_tokens"] if r.any()]
    return out


def test_shards_are_disjoint_and_cover_the_split():
    kwargs = dict(
        split="validation",
        task_feature_lengths={"inputs": 16, "targets": 16},
        pack=False,
        shuffle=True,
        repeat=False,
        batch_size=32,
    )
    everything = rows(stream("t5lite_synthetic_reverse", **kwargs))
    shards = [rows(stream("t5lite_synthetic_reverse", shard_index=i, num_shards=2, **kwargs)) for i in range(2)]
    assert len(everything) == 500 and 200 < len(shards[0]) < 300
    # Equal as multisets: every example is in exactly one shard.
    assert sorted(shards[0] + shards[1]) == sorted(everything)


def test_finite_stream_pads_its_last_batch():
    s = stream(
        "t5lite_synthetic_copy",
        split="validation",
        task_feature_lengths={"inputs": 16, "targets": 16},
        batch_size=64,
        pack=False,
        shuffle=False,
        repeat=False,
    )
    batches = list(s)
    assert s.position == len(batches) == 8  # 500 examples
    assert {b["encoder_input_tokens"].shape for b in batches} == {(64, 16)}
    last = batches[-1]["decoder_loss_weights"]
    assert last[: 500 - 7 * 64].any(axis=1).all() and not last[500 - 7 * 64 :].any()


def test_mixture_stream_for_prefix_lm():
    s = stream(
        "t5lite_synthetic",
        model_kind="prefix_lm",
        task_feature_lengths={"inputs": 16, "targets": 16},
        batch_size=8,
        shuffle=False,
    )
    batch = next(s)
    assert set(batch) == FEATURES["prefix_lm"]
    text = s.vocabulary.decode(batch["decoder_target_tokens"][0].tolist())
    assert text.split(":")[0] in {"copy", "reverse", "sort"}


def test_bad_input_errors(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"Unknown task or mixture 't5lite_corpus_spam'.*did you mean.*"
        r"Registered: .*t5lite_corpus_lm",
    ):
        stream("t5lite_corpus_spam")
    with pytest.raises(ValueError, match="model_kind='decoder' needs \\['targets'\\].*t5lite_corpus_lm"):
        stream(model_kind="decoder")
    with pytest.raises(ValueError, match="model_kind='prefix_lm' needs \\['inputs', 'targets'\\]"):
        stream("t5lite_corpus_lm", model_kind="prefix_lm")
    with pytest.raises(ValueError, match="model_kind='t5'"):
        stream(model_kind="t5")
    with pytest.raises(ValueError, match="task_feature_lengths"):
        stream(task_feature_lengths={"inputs": 64})
    with pytest.raises(ValueError, match="no split 'test'"):
        stream(split="test")
    with pytest.raises(ValueError, match="shard_index=2"):
        stream(shard_index=2, num_shards=2)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\n")
    data.register_text_file_task("test_blank", str(blank), validation_files=str(blank), objective="lm")
    with pytest.raises(ValueError, match="Task 'test_blank', split 'train' yields no examples.*data files"):
        stream("test_blank", model_kind="decoder", task_feature_lengths={"targets": 32})
