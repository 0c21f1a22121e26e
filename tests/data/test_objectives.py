import json

import numpy as np
import pytest
import seqio
import tensorflow as tf

from t5lite import data

TEXTS = [
    "The quick brown fox jumps over the lazy dog, again and again and again.",
    "Short line.",
    "Every object has an identity, a type and a value; the identity never changes once it has been created.",
]
EOS = 1


def examples(tmp_path, objective, lengths, texts=TEXTS, suffix=".txt"):
    path = tmp_path / f"texts{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps({"body": t, "n": i}) + "\n" for i, t in enumerate(texts)))
    else:
        path.write_text("\n".join(texts) + "\n\n   \n")  # blank lines are skipped
    name = data.register_text_file_task(
        f"test_{objective}",
        str(path),
        validation_files=str(path),
        objective=objective,
        vocabulary="bytes",
        text_key="body",
    )
    task = seqio.get_mixture_or_task(name)
    return list(task.get_dataset(sequence_length=lengths, split="train", shuffle=False, seed=0).as_numpy_iterator())


def as_bytes(text):
    return [b + 3 for b in text.encode()]


def test_lm_pieces_cover_each_text_with_eos_only_at_its_end(tmp_path):
    pieces = examples(tmp_path, "lm", {"targets": 32})
    assert all(set(ex) == {"targets"} and 0 < len(ex["targets"]) <= 32 for ex in pieces)
    joined = np.concatenate([ex["targets"] for ex in pieces]).tolist()
    assert joined == sum((as_bytes(t) + [EOS] for t in TEXTS), [])
    # Pieces are full except each text's last, and EOS ends only those.
    sizes = [len(t.encode()) + 1 for t in TEXTS]
    expected = sum(([32] * (n // 32) + [n % 32] * (n % 32 > 0) for n in sizes), [])
    assert [len(ex["targets"]) for ex in pieces] == expected
    assert sum(int(EOS in ex["targets"]) for ex in pieces) == len(TEXTS)


def test_prefix_lm_splits_at_random_points(tmp_path):
    lengths = {"inputs": 24, "targets": 16}
    pieces = examples(tmp_path, "prefix_lm", lengths)
    rebuilt = []
    for ex in pieces:
        inputs, targets = ex["inputs"].tolist(), ex["targets"].tolist()
        assert inputs[-1] == EOS and 2 <= len(inputs) <= 24 and 1 <= len(targets) <= 16
        rebuilt += inputs[:-1] + targets
    assert rebuilt == sum((as_bytes(t) + [EOS] for t in TEXTS), [])
    assert len({len(ex["inputs"]) for ex in pieces}) > 2  # split points vary


def test_span_corruption_task_appends_eos(tmp_path):
    pieces = examples(tmp_path, "span_corruption", {"inputs": 32, "targets": 12})
    top = data.get_vocabulary("bytes").vocab_size - 1
    for ex in pieces:
        assert ex["inputs"][-1] == EOS and ex["targets"][-1] == EOS
        assert ex["targets"][0] == top and top in ex["inputs"]
        assert len(ex["inputs"]) <= 32 and len(ex["targets"]) <= 12


def test_jsonl_files_use_text_key(tmp_path):
    pieces = examples(tmp_path, "lm", {"targets": 512}, suffix=".jsonl")
    assert [ex["targets"].tolist() for ex in pieces] == [as_bytes(t) + [EOS] for t in TEXTS]
    path = tmp_path / "texts.jsonl"
    data.register_text_file_task("test_bad_key", str(path), objective="lm", vocabulary="bytes", text_key="text")
    dataset = seqio.get_mixture_or_task("test_bad_key").get_dataset({"targets": 64}, shuffle=False)
    with pytest.raises(Exception, match="no key 'text'"):
        next(dataset.as_numpy_iterator())


def test_registration_errors(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("some text here\n")
    with pytest.raises(ValueError, match="Unknown objective 'mlm'.*span_corruption, prefix_lm, lm"):
        data.register_text_file_task("test_bad", str(path), objective="mlm")
    with pytest.raises(FileNotFoundError, match="'train' split.*matches nothing"):
        data.register_text_file_task("test_bad", str(tmp_path / "nothing*.txt"))
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="mixes .jsonl and plain-text"):
        data.register_text_file_task("test_bad", str(tmp_path / "[ab].*"))
    with pytest.raises(ValueError, match="Unknown task or mixture 'test_nope'"):
        data.register_mixture("test_mix", ["t5lite_synthetic_copy", "test_nope"])


class FakeTfdsSource(seqio.DataSource):
    """Stands in for seqio.TfdsDataSource: TFDS datasets cannot be downloaded in tests."""

    def __init__(self, tfds_name, splits, tfds_data_dir):
        self.arguments = (tfds_name, splits, tfds_data_dir)
        super().__init__(splits=("train", "validation"))

    supports_arbitrary_sharding = False

    def list_shards(self, split):
        return [split]

    def get_dataset(self, split="train", shuffle=True, seed=None, shard_info=None, **unused):
        return tf.data.Dataset.from_tensor_slices({"sentence": TEXTS, "id": [1, 2, 3]})


def test_tfds_task_reads_text_key_and_mixes(monkeypatch):
    monkeypatch.setattr(seqio, "TfdsDataSource", FakeTfdsSource)
    name = data.register_tfds_task(
        "test_tfds",
        "lm1b:1.1.0",
        objective="lm",
        vocabulary="bytes",
        text_key="sentence",
        splits={"train": "train", "validation": "test"},
        tfds_data_dir="/data/tfds",
    )
    task = seqio.get_mixture_or_task(name)
    assert task.source.arguments == ("lm1b:1.1.0", {"train": "train", "validation": "test"}, "/data/tfds")
    pieces = list(task.get_dataset({"targets": 512}, split="validation", shuffle=False).as_numpy_iterator())
    assert [ex["targets"].tolist() for ex in pieces] == [as_bytes(t) + [EOS] for t in TEXTS]
    mixture = data.register_mixture("test_tfds_mix", [(name, 2.0), "t5lite_corpus_lm_bytes"])
    assert seqio.get_mixture_or_task(mixture).get_rate(task) == 2.0
