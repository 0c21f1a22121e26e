"""A Hugging Face `tokenizer.json` (the `tokenizers` library) as a seqio vocabulary.

`save_pretrained` in transformers 5 writes a tokenizer as `tokenizer.json` (with
`tokenizer_config.json` naming its special tokens) and no SentencePiece model, so a converted
model's own tokenizer reaches seqio tasks, training and decoding through this adapter. Text is
encoded without special tokens: seqio appends EOS itself, and the start token comes from the
model (`ModelConfig.start_id`). Padding is id 0, as everywhere in t5lite. In tf.data it tokenizes
through `tf.py_function` (Python, one example at a time), slower than SentencePiece's TF op, which
is why `t5lite convert` prefers a model's SentencePiece file where it ships one.
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import seqio
import tensorflow as tf


class TokenizerJsonVocabulary(seqio.Vocabulary):
    """`tokenizer.json`; EOS and UNK are read from `tokenizer_config.json` beside it (or "</s>", "<unk>")."""

    def __init__(self, path: str | pathlib.Path):
        import tokenizers

        self.path = pathlib.Path(path).expanduser().absolute()
        if not self.path.is_file():
            raise FileNotFoundError(f"Tokenizer file {self.path} does not exist.")
        try:
            self.tokenizer = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as error:  # noqa: BLE001 (tokenizers raises its own Exception subclass)
            raise ValueError(f"{self.path} is not a Hugging Face tokenizer.json ({error}).") from None
        special = _special_tokens(self.path.with_name("tokenizer_config.json"))
        self._eos = self._eos_id(special.get("eos_token", "</s>"))
        self._unk = self.tokenizer.token_to_id(special.get("unk_token", "<unk>"))
        # T5's sentinels are the tokenizer's last ids (<extra_id_0> the very last), as seqio's extra ids.
        sentinels = [t for t in self.tokenizer.get_vocab(with_added_tokens=True) if re.fullmatch(r"<extra_id_\d+>", t)]
        self._size = self.tokenizer.get_vocab_size(with_added_tokens=True) - len(sentinels)
        if sentinels and self.tokenizer.token_to_id("<extra_id_0>") != self._size + len(sentinels) - 1:
            raise ValueError(f"{self.path}: <extra_id_0> is not its last id, where seqio puts the first sentinel.")
        super().__init__(extra_ids=len(sentinels))

    def _eos_id(self, token: str) -> int:
        found = self.tokenizer.token_to_id(token)
        if found is None or found == 0:
            what = "id 0 (padding in t5lite)" if found == 0 else "not in it"
            raise ValueError(
                f"{self.path}: its EOS token {token!r} is {what}; name the right one as eos_token in "
                f"tokenizer_config.json."
            )
        return found

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def unk_id(self) -> int | None:
        return self._unk

    @property
    def _base_vocab_size(self) -> int:
        return self._size

    def _encode(self, s: str) -> list[int]:
        return self.tokenizer.encode(s, add_special_tokens=False).ids

    def _decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        ids = tf.py_function(lambda text: np.asarray(self._encode(text.numpy().decode()), np.int32), [s], tf.int32)
        return tf.ensure_shape(ids, [None])

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        def decode(batch):  # [..., length] -> [...]
            array = batch.numpy()
            texts = [self._decode(row).encode() for row in array.reshape(-1, array.shape[-1])]
            return np.asarray(texts, object).reshape(array.shape[:-1])

        return tf.py_function(decode, [ids], tf.string)

    def __eq__(self, other) -> bool:
        return isinstance(other, TokenizerJsonVocabulary) and self.path == other.path

    def __str__(self) -> str:
        return f"TokenizerJsonVocabulary({self.path})"


def _special_tokens(config_file: pathlib.Path) -> dict[str, str]:
    """eos_token / unk_token of a tokenizer_config.json, as strings (they may be saved as AddedToken dicts)."""
    if not config_file.is_file():
        return {}
    config = json.loads(config_file.read_text())
    return {
        name: value.get("content") if isinstance(value, dict) else value
        for name in ("eos_token", "unk_token")
        if (value := config.get(name)) is not None
    }
