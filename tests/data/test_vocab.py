import argparse
import json
import unicodedata

import pytest
import seqio
from sentencepiece import sentencepiece_model_pb2

from t5lite import data

SENTENCES = [
    "Return a new list containing all items from the iterable in ascending order.",
    "The socket must be bound to an address and listening for connections.",
    "Naïve café — 東京 ümlaut ½",  # outside the training text: bytes, never UNK
]


def round_trip(vocab, text):
    """SentencePiece NFKC-normalises text, as T5's vocabularies do (½ becomes 1⁄2)."""
    ids = vocab.encode(text)
    assert vocab.unk_id not in ids
    assert vocab.decode(ids) == unicodedata.normalize("NFKC", text)
    return ids


def test_default_vocabulary_follows_t5_conventions(vocabulary, t5lite_cache):
    assert (vocabulary.pad_id, vocabulary.eos_id, vocabulary.unk_id) == (0, 1, 2)
    assert vocabulary.vocab_size == 4100 and vocabulary.extra_ids == 100
    assert vocabulary.sentencepiece_model_file.startswith(str(t5lite_cache / "vocab"))
    # Sentinels count down from the top of the vocabulary.
    assert vocabulary.tokenizer.piece_to_id("▁<extra_id_0>") == 4099
    assert vocabulary.tokenizer.piece_to_id("▁<extra_id_99>") == 4000
    for sentence in SENTENCES:
        round_trip(vocabulary, sentence)


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_trains_model_type_and_round_trips(tmp_path, text_file, model_type):
    path = data.build_vocabulary(tmp_path / "vocab", vocab_size=600, model_type=model_type, input_files=[text_file])
    model = sentencepiece_model_pb2.ModelProto.FromString(path.read_bytes())
    expected_type = sentencepiece_model_pb2.TrainerSpec.ModelType.Value(model_type.upper())
    assert model.trainer_spec.model_type == expected_type and len(model.pieces) == 600
    vocab = data.get_vocabulary(str(path))
    assert vocab.vocab_size == 700
    for sentence in SENTENCES[:2]:
        assert len(round_trip(vocab, sentence)) < len(sentence) / 2  # real subwords, not just bytes
    round_trip(vocab, SENTENCES[2])
    # The same text and settings reuse the file; other settings make another one.
    mtime = path.stat().st_mtime_ns
    assert (
        data.build_vocabulary(tmp_path / "vocab", vocab_size=600, model_type=model_type, input_files=[text_file])
        == path
    )
    assert path.stat().st_mtime_ns == mtime
    assert (
        data.build_vocabulary(tmp_path / "vocab", vocab_size=700, model_type=model_type, input_files=[text_file])
        != path
    )


def test_jsonl_input_uses_text_key(tmp_path, corpus_lines):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": i, "body": line}) + "\n" for i, line in enumerate(corpus_lines[:800])))
    model = data.build_vocabulary(tmp_path, vocab_size=400, model_type="bpe", input_files=[path], text_key="body")
    assert data.get_vocabulary(str(model)).decode(data.get_vocabulary(str(model)).encode("the file")) == "the file"
    with pytest.raises(ValueError, match="no key 'text'"):
        data.build_vocabulary(tmp_path, vocab_size=400, model_type="bpe", input_files=[path])


def test_bad_vocabulary_settings(tmp_path, text_file):
    with pytest.raises(ValueError, match="model_type='word'.*unigram, bpe"):
        data.build_vocabulary(tmp_path, model_type="word", input_files=[text_file])
    with pytest.raises(ValueError, match="vocab_size=100 must be"):
        data.build_vocabulary(tmp_path, vocab_size=100, input_files=[text_file])
    with pytest.raises(ValueError, match=r"lines of text fill at most \d+ pieces, not vocab_size=50000: pass"):
        data.build_vocabulary(tmp_path, vocab_size=50_000, model_type="unigram", input_files=[text_file])
    (tmp_path / "two.txt").write_text("hello world\nsmall input\n")
    with pytest.raises(ValueError, match="fill at most 2.. pieces, not vocab_size=1000: the least is 300"):
        data.build_vocabulary(tmp_path / "out", vocab_size=1000, input_files=[tmp_path / "two.txt"])
    assert list((tmp_path / "out").iterdir()) == []  # nor a lock file left behind
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.build_vocabulary(tmp_path, input_files=[tmp_path / "missing.txt"])
    with pytest.raises(FileNotFoundError, match="t5lite vocab"):
        data.get_vocabulary(str(tmp_path / "missing.model"))
    with pytest.raises(ValueError, match="'default', 'bytes'"):
        data.get_vocabulary("wordpiece")


def test_byte_vocabulary():
    vocab = data.get_vocabulary("bytes")
    assert isinstance(vocab, seqio.ByteVocabulary)
    assert vocab.vocab_size == 3 + 256 + 100 and data.vocabulary_size_for_model(vocab) == 384
    assert vocab.decode(vocab.encode(SENTENCES[2])) == SENTENCES[2]


def test_vocabulary_size_for_model_and_fit_check(vocabulary):
    assert data.vocabulary_size_for_model(vocabulary) == 4224  # 4100 rounded up to a multiple of 128
    data.check_vocabulary_fits(vocabulary, 4224)
    data.check_vocabulary_fits(vocabulary, 4100)
    with pytest.raises(ValueError) as error:
        data.check_vocabulary_fits(vocabulary, 4096)
    message = str(error.value)
    assert "4100 ids" in message and "vocab_size is 4096" in message and "ModelConfig.vocab_size = 4224" in message


def test_vocab_command(tmp_path, text_file, capsys):
    parser = argparse.ArgumentParser()
    data.add_vocab_arguments(parser)
    args = parser.parse_args(
        ["--output_dir", str(tmp_path), "--vocab_size", "500", "--model_type", "bpe", "--input", str(text_file)]
    )
    data.vocab_command(args)
    out = capsys.readouterr().out
    [model] = tmp_path.glob("*.model")
    assert str(model) in out
    assert "500 pieces + 100 extra ids = 600 ids" in out and "ModelConfig.vocab_size=640" in out
    with pytest.raises(SystemExit):
        parser.parse_args(["--model_type", "char"])
