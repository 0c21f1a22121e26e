import collections
import pathlib
import threading
import time

from t5lite import data
from t5lite.data import cache, corpus, sources


def test_corpus_is_cached_english_prose(t5lite_cache, corpus_lines):
    path = data.corpus_path()
    assert path.parent == pathlib.Path(t5lite_cache) / "corpus"
    assert len(corpus_lines) > 5000 and path.stat().st_size > 800_000
    assert len(set(corpus_lines)) == len(corpus_lines)  # deduplicated
    assert all(len(line.split()) >= 6 and ">>>" not in line for line in corpus_lines)
    words = collections.Counter(w.lower() for line in corpus_lines for w in line.split())
    top = [w for w, _ in words.most_common(10)]
    assert {"the", "a", "of", "to", "is"} <= set(top)


def test_corpus_is_reused_not_rebuilt():
    path = data.corpus_path()
    mtime = path.stat().st_mtime_ns
    assert data.corpus_path() == path and path.stat().st_mtime_ns == mtime


def test_prose_filter_rejects_code_and_tables():
    assert corpus._is_prose("Return the number of items in the sequence, or zero.")
    assert not corpus._is_prose("    for x in range(10):\n        print(x) and more words here")
    assert not corpus._is_prose(">>> sorted([3, 1, 2]) gives back the list sorted")
    assert not corpus._is_prose("Too short.")
    assert not corpus._is_prose("+------+------+------+ | a    | b    | c    | +------+------+------+")


def test_validation_split_is_disjoint_and_small(corpus_lines):
    source = sources.TextFilesSource([str(data.corpus_path())])
    texts = {
        split: [
            t.decode()
            for batch in source.get_dataset(split, shuffle=False).batch(4096).as_numpy_iterator()
            for t in batch["text"]
        ]
        for split in ("train", "validation")
    }
    assert not set(texts["train"]) & set(texts["validation"])
    assert len(texts["train"]) + len(texts["validation"]) == len(corpus_lines)
    assert 0.02 < len(texts["validation"]) / len(corpus_lines) < 0.04
    # Shuffling is seeded: the same seed gives the same order, another seed another order.
    first = lambda seed: [ex["text"] for ex in source.get_dataset("train", seed=seed).take(20).as_numpy_iterator()]
    assert first(1) == first(1) != first(2)


def test_cache_follows_env_var_and_writes_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("T5LITE_CACHE", str(tmp_path / "elsewhere"))
    directory = cache.cache_dir("vocab")
    assert directory == tmp_path / "elsewhere" / "vocab" and directory.is_dir()
    path = cache.write_atomically(directory / "x.bin", b"abc")
    assert path.read_bytes() == b"abc" and oct(path.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in directory.iterdir()] == ["x.bin"]  # no temporary file left behind


def test_concurrent_builders_build_once(tmp_path):
    calls = []

    def make():
        calls.append(1)
        time.sleep(0.2)
        return b"built"

    threads = [threading.Thread(target=cache.build_once, args=(tmp_path / "f.bin", make)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and (tmp_path / "f.bin").read_bytes() == b"built"
