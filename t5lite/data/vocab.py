"""Vocabularies: SentencePiece models trained by t5lite, byte-level, and the model-size checks.

Ids follow T5: 0 pad, 1 EOS, 2 UNK, no BOS; seqio appends the extra (sentinel) ids after the
SentencePiece pieces, numbered from the end (`<extra_id_0>` is the last id). Pieces fall back
to bytes, so any Unicode text round-trips without UNK (after NFKC normalisation, as in T5).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import math
import pathlib
import random
import re
from collections.abc import Iterable, Sequence

import gin
import seqio

from t5lite.data import cache, corpus
from t5lite.data.hf_tokenizer import TokenizerJsonVocabulary

MODEL_TYPES = ("unigram", "bpe")
DEFAULT_VOCAB_SIZE = 4000
DEFAULT_MODEL_TYPE = "unigram"
# T5's 100 sentinels; span corruption of 512 input tokens needs about 30.
DEFAULT_EXTRA_IDS = 100
DEFAULT_MAX_SENTENCES = 200_000
# T5's special ids; byte fallback instead of UNK; one thread because SentencePiece's result
# depends on the thread count.
_TRAINER_OPTIONS = dict(
    pad_id=0,
    eos_id=1,
    unk_id=2,
    bos_id=-1,
    byte_fallback=True,
    num_threads=1,
    max_sentence_length=1 << 16,
    minloglevel=2,
)


class _PaddingNotice(logging.Filter):
    """seqio warns when a SentencePiece model has no pad piece at 0 (Llama's); t5lite pads with 0 by design."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "uses PAD_ID=0" not in record.getMessage()


logging.getLogger("absl").addFilter(_PaddingNotice())

# Embedding tables are padded to a multiple of this for efficient TPU/GPU matmuls (T5 uses 128).
VOCAB_SIZE_MULTIPLE = 128


def build_vocabulary(
    output_dir: str | pathlib.Path | None = None,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    model_type: str = DEFAULT_MODEL_TYPE,
    input_files: Sequence[str] | None = None,
    text_key: str = "text",
    max_sentences: int = DEFAULT_MAX_SENTENCES,
) -> pathlib.Path:
    """Trains a SentencePiece model (or reuses the cached one) and returns its .model path.

    Trains on `input_files` (.txt: a line per example; .jsonl: `text_key` of each object) or, by
    default, the embedded corpus; `max_sentences` lines at most, sampled with a fixed seed. The
    file name carries a fingerprint of the text and settings, so a finished file is reused.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is not supported. Allowed values: {', '.join(MODEL_TYPES)}.")
    if not isinstance(vocab_size, int) or vocab_size < 300:
        raise ValueError(
            f"vocab_size={vocab_size!r} must be an integer >= 300 (259 ids are reserved for "
            f"pad/EOS/UNK and the 256 byte pieces)."
        )
    if input_files:
        prefix, lines = "text", (line for path in input_files for line in _read_lines(pathlib.Path(path), text_key))
    else:
        prefix, lines = corpus.corpus_name(), corpus.corpus_path().read_text(encoding="utf-8").splitlines()
    sentences = _sample(lines, max_sentences)
    options = dict(_TRAINER_OPTIONS, vocab_size=vocab_size, model_type=model_type)
    fingerprint = hashlib.sha256(json.dumps([options, sentences]).encode()).hexdigest()[:10]
    directory = pathlib.Path(output_dir).expanduser() if output_dir else cache.cache_dir("vocab")
    path = directory / f"{prefix}-{model_type}-{vocab_size}-{fingerprint}.model"
    return cache.build_once(path, lambda: _train(sentences, options))


def _read_lines(path: pathlib.Path, text_key: str) -> Iterable[str]:
    if not path.is_file():
        raise FileNotFoundError(f"Vocabulary input {path} does not exist.")
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if path.suffix in (".jsonl", ".json") and line.strip():
                record = json.loads(line)
                if text_key not in record:
                    raise ValueError(
                        f"{path}:{number} has no key {text_key!r} (keys: {sorted(record)}); pass the right text_key."
                    )
                line = str(record[text_key])
            if line.strip():
                yield line.strip()


def _sample(lines: Iterable[str], k: int) -> list[str]:
    """At most k lines, chosen uniformly with a fixed seed in one pass (reservoir sampling)."""
    rng, sample = random.Random(0), []
    for i, line in enumerate(lines):
        if i < k:
            sample.append(line)
        elif (j := rng.randrange(i + 1)) < k:
            sample[j] = line
    return sample


def _train(sentences: list[str], options: dict) -> bytes:
    import sentencepiece

    if not sentences:
        raise ValueError("No text to train a vocabulary on: the input files hold no non-empty lines.")
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, **options)
    except RuntimeError as error:  # e.g. "Vocabulary size too high (8000). Please set it to a value <= 5755."
        most = re.search(r"<= (\d+)", str(error))
        if most:
            fix = f"pass --vocab_size={most[1]} or less" if int(most[1]) >= 300 else "the least is 300: give more text"
            raise ValueError(
                f"{len(sentences)} lines of text fill at most {most[1]} pieces, not vocab_size="
                f"{options['vocab_size']}: {fix}."
            ) from None
        raise ValueError(
            f"SentencePiece could not train a {options['model_type']} vocabulary of "
            f"{options['vocab_size']} pieces on {len(sentences)} lines: {error}"
        ) from error
    return model.getvalue()


class CorpusVocabulary(seqio.SentencePieceVocabulary):
    """The default vocabulary, trained on the embedded corpus the first time it is used.

    Tasks are registered when `t5lite.data` is imported; training then would slow every import
    and fix the cache directory too early (tests point `T5LITE_CACHE` at a temporary one).
    """

    def __init__(
        self,
        vocab_size: int = DEFAULT_VOCAB_SIZE,
        model_type: str = DEFAULT_MODEL_TYPE,
        extra_ids: int = DEFAULT_EXTRA_IDS,
    ):
        super().__init__("", extra_ids=extra_ids)
        self._corpus_spec = (vocab_size, model_type)

    def _model_context(self):
        if not self._sentencepiece_model_file:
            vocab_size, model_type = self._corpus_spec
            self._sentencepiece_model_file = str(build_vocabulary(vocab_size=vocab_size, model_type=model_type))
        return super()._model_context()

    @property
    def sentencepiece_model_file(self) -> str:
        self._model_context()
        return self._sentencepiece_model_file

    def __eq__(self, other):
        return (
            isinstance(other, CorpusVocabulary)
            and self._corpus_spec == other._corpus_spec
            and self.extra_ids == other.extra_ids
        )

    def __str__(self) -> str:
        vocab_size, model_type = self._corpus_spec
        return f"CorpusVocabulary({model_type}, {vocab_size} pieces, extra_ids={self.extra_ids})"


@functools.cache
def default_vocabulary(extra_ids: int = DEFAULT_EXTRA_IDS) -> CorpusVocabulary:
    """One shared instance, so the model file is located and loaded once per process."""
    return CorpusVocabulary(extra_ids=extra_ids)


@gin.configurable(module="t5lite.data")
def get_vocabulary(spec: str | seqio.Vocabulary | None = None, extra_ids: int = DEFAULT_EXTRA_IDS) -> seqio.Vocabulary:
    """A vocabulary from a gin-friendly spec.

    None or "default": SentencePiece trained on the embedded corpus; "bytes": UTF-8 bytes
    (ByT5's ids); a path to a .model file: that SentencePiece model; a path to a Hugging Face
    tokenizer .json file: that tokenizer; a Vocabulary: itself.
    """
    if isinstance(spec, seqio.Vocabulary):
        return spec
    if spec in (None, "default"):
        return default_vocabulary(extra_ids)
    if spec == "bytes":
        return seqio.ByteVocabulary(extra_ids=extra_ids)
    path = pathlib.Path(spec).expanduser()
    if path.suffix == ".json":
        return TokenizerJsonVocabulary(path)
    if path.suffix != ".model":
        raise ValueError(
            f"Unknown vocabulary {spec!r}: use 'default', 'bytes', the path of a SentencePiece "
            f".model file (e.g. from `t5lite vocab`) or of a Hugging Face tokenizer.json."
        )
    if not path.is_file():
        raise FileNotFoundError(f"SentencePiece model {path} does not exist; build one with `t5lite vocab`.")
    vocabulary = seqio.SentencePieceVocabulary(str(path), extra_ids=extra_ids)
    try:
        vocabulary.tokenizer  # noqa: B018 (loads the model now, not at the first batch)
    except Exception as error:  # noqa: BLE001 (SentencePiece raises bare RuntimeErrors and OSErrors)
        message = f"{path} is not a SentencePiece model ({error}); build one with `t5lite vocab`."
    else:
        return vocabulary
    raise ValueError(message)


def vocabulary_size_for_model(vocabulary: seqio.Vocabulary, multiple: int = VOCAB_SIZE_MULTIPLE) -> int:
    """The ModelConfig.vocab_size to use: all ids, extra ids included, rounded up to `multiple`."""
    return math.ceil(vocabulary.vocab_size / multiple) * multiple


def check_vocabulary_fits(vocabulary: seqio.Vocabulary, model_vocab_size: int) -> None:
    """Raises ValueError if some token id would index past the model's embedding table."""
    if vocabulary.vocab_size > model_vocab_size:
        raise ValueError(
            f"The vocabulary has {vocabulary.vocab_size} ids (including {vocabulary.extra_ids} extra ids) but "
            f"the model's vocab_size is {model_vocab_size}, so larger ids would fall outside the embedding "
            f"table. Set ModelConfig.vocab_size = {vocabulary_size_for_model(vocabulary)} (any value >= "
            f"{vocabulary.vocab_size} works), e.g. --gin.ModelConfig.vocab_size="
            f"{vocabulary_size_for_model(vocabulary)}."
        )
