"""Data fixtures; the temporary cache they build in is tests/conftest.py's `t5lite_cache`."""

import pytest


@pytest.fixture(scope="session")
def vocabulary(t5lite_cache):
    """The default vocabulary (unigram, 4000 pieces + 100 extra ids), trained on first use."""
    from t5lite import data

    vocab = data.default_vocabulary()
    assert vocab.vocab_size == data.DEFAULT_VOCAB_SIZE + data.DEFAULT_EXTRA_IDS
    return vocab


@pytest.fixture(scope="session")
def corpus_lines(t5lite_cache):
    from t5lite import data

    return data.corpus_path().read_text(encoding="utf-8").splitlines()


@pytest.fixture
def text_file(tmp_path, corpus_lines):
    """A small .txt file of real paragraphs, a line each."""
    path = tmp_path / "text.txt"
    path.write_text("\n".join(corpus_lines[:1500]) + "\n", encoding="utf-8")
    return path
