"""seqio DataSources of our own: {"text"} examples read from .txt or .jsonl files, and small
in-memory datasets of string records made by a function (synthetic tasks, instructions).

Without validation files, a fixed share of the lines becomes the validation split, chosen by a
hash of each line's text: the split is the same on every machine and every run, and does not
shift when files are added. Shuffling (file order, then lines in a large buffer) is seeded, so
a pipeline built twice with one seed reads the same order; seqio's FunctionDataSource warns
against exactly the shuffling we need here, hence a DataSource of our own.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import seqio
import tensorflow as tf

Files = str | Sequence[str] | Callable[[], Sequence[str]]
JSON_SUFFIXES = (".jsonl", ".json")
_HASH_BUCKETS = 10_000
# Lines shuffled in memory after the files are. Every checkpoint holds this buffer (about 160
# bytes a slot, filled or not, plus the buffered text), so it is sized for a full shuffle of the
# embedded corpus (11k lines), not of a large text file: file order does that.
LINE_SHUFFLE_BUFFER = 16_384
# Files of a split whose first bytes are checked to be text when a task is registered.
TEXT_CHECKED_FILES = 16


class TextFilesSource(seqio.DataSource):
    """Lines of `train_files` (glob patterns, or a function returning paths, called on first read)."""

    def __init__(
        self,
        train_files: Files,
        validation_files: Files | None = None,
        *,
        text_key: str = "text",
        validation_fraction: float = 0.03,
    ):
        if validation_files is None and not 0 < validation_fraction < 1:
            raise ValueError(
                f"validation_fraction={validation_fraction} must be in (0, 1) when no validation_files are given."
            )
        self._files = {"train": train_files, "validation": validation_files or train_files}
        self._hash_split = validation_files is None
        self._text_key = text_key
        self._validation_buckets = round(validation_fraction * _HASH_BUCKETS)
        for split, files in self._files.items():
            if not callable(files):  # fail at registration, not at the first training step
                for path in self.list_shards(split)[:TEXT_CHECKED_FILES]:
                    _check_text(path)
        super().__init__(splits=("train", "validation"))

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return False

    def list_shards(self, split: str) -> list[str]:
        files = self._files[split]
        paths = seqio.utils.list_files(files() if callable(files) else files)
        missing = [path for path in paths if not tf.io.gfile.exists(path)]
        if not paths or missing:
            raise FileNotFoundError(
                f"No text files for the {split!r} split: {files!r} matches "
                f"{'nothing' if not paths else 'missing files ' + str(missing)}. "
                f"Check the path or glob pattern."
            )
        if len({path.endswith(JSON_SUFFIXES) for path in paths}) > 1:
            raise ValueError(
                f"{files!r} mixes .jsonl and plain-text files; register them as two tasks and "
                f"combine them with register_mixture."
            )
        return paths

    def get_dataset(
        self,
        split: str = "train",
        shuffle: bool = True,
        seed: int | None = None,
        shard_info: seqio.ShardInfo | None = None,
        *,
        sequence_length=None,
        use_cached=False,
        num_epochs=1,
    ) -> tf.data.Dataset:
        paths = self.list_shards(split)
        files = tf.data.Dataset.from_tensor_slices(paths)
        if shard_info:
            files = files.shard(shard_info.num_shards, shard_info.index)
        if shuffle:
            files = files.shuffle(len(paths), seed=seed)
        lines = files.flat_map(tf.data.TextLineDataset)
        if paths[0].endswith(JSON_SUFFIXES):
            lines = lines.filter(_not_blank).map(self._json_text)
        if not self._hash_split:
            lines = lines.filter(_not_blank)
        elif split == "validation":
            lines = lines.filter(lambda line: _not_blank(line) & self._is_validation(line))
        else:
            lines = lines.filter(lambda line: _not_blank(line) & ~self._is_validation(line))
        if shuffle:
            lines = lines.shuffle(LINE_SHUFFLE_BUFFER, seed=seed)
        return lines.map(lambda line: {"text": tf.strings.strip(line)})

    def _where(self, line: bytes) -> str:
        """ "<file>:<line number>" of a line of this source's files (searched for when a line is bad)."""
        for split in self.splits:
            for path in self.list_shards(split):
                with tf.io.gfile.GFile(path, "rb") as f:
                    for number, candidate in enumerate(f, 1):
                        if candidate.rstrip(b"\r\n") == line:
                            return f"{path}:{number}"
        return "A line"

    def _is_validation(self, line: tf.Tensor) -> tf.Tensor:
        return tf.strings.to_hash_bucket_fast(tf.strings.strip(line), _HASH_BUCKETS) < self._validation_buckets

    def _json_text(self, line: tf.Tensor) -> tf.Tensor:
        def parse(line):
            line = line.numpy()
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ValueError(f"{self._where(line)} is not a line of UTF-8 JSON ({error}).") from None
            if not isinstance(record, dict) or self._text_key not in record:
                raise ValueError(
                    f"{self._where(line)} has no key {self._text_key!r}: {line[:200]!r}; set text_key to the "
                    f"field that holds the text."
                )
            if not isinstance(record[self._text_key], str):
                raise ValueError(
                    f"{self._where(line)}: {self._text_key!r} is {record[self._text_key]!r}, not a string."
                )
            return record[self._text_key]

        text = tf.py_function(parse, [line], tf.string)
        text.set_shape([])
        return text


class RecordsSource(seqio.DataSource):
    """The records (dicts of strings, all with the same keys) `records(split)` returns; the Task
    shuffles them."""

    def __init__(
        self, records: Callable[[str], Sequence[dict[str, str]]], splits: Sequence[str] = ("train", "validation")
    ):
        self._records = records
        super().__init__(splits=tuple(splits))

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return False

    def list_shards(self, split: str) -> list[str]:
        return [split]

    def get_dataset(
        self,
        split: str = "train",
        shuffle: bool = True,
        seed: int | None = None,
        shard_info: seqio.ShardInfo | None = None,
        *,
        sequence_length=None,
        use_cached=False,
        num_epochs=1,
    ) -> tf.data.Dataset:
        records = self._records(split)
        dataset = tf.data.Dataset.from_tensor_slices({key: [r[key] for r in records] for key in records[0]})
        return dataset.shard(shard_info.num_shards, shard_info.index) if shard_info else dataset


def _check_text(path: str, probe: int = 8192) -> None:
    """Refuses a file whose first bytes are not text (a NUL byte, or not UTF-8): a binary file would
    otherwise be trained on as lines of noise."""
    with tf.io.gfile.GFile(path, "rb") as f:
        head = f.read(probe)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:
        text = error.start > len(head) - 4  # a character cut at the probe's end is still text
    else:
        text = True
    if b"\0" in head or not text:
        raise ValueError(f"{path} is not a UTF-8 text file (binary data in its first {probe} bytes).")


def _not_blank(line: tf.Tensor) -> tf.Tensor:
    return tf.strings.length(tf.strings.strip(line)) > 0
