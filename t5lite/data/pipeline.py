"""The input pipeline the training loop consumes: seqio task -> feature converter -> numpy batches.

Every random choice (file and example order, span positions, prefix split points, mixture
sampling) is seeded from `seed` and tf.data runs deterministically, so the stream is a pure
function of its arguments. Its state (file offsets, shuffle buffers, random generators, packing
and prefetch buffers) is a tf.data iterator checkpoint: `save` writes it, `restore` continues
from it, at the same cost at batch 10,000 as at batch 0 and bit for bit as the stream that was
saved. `skip` replays batches instead, for checkpoints that hold only a position.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping

import numpy as np
import seqio
import tensorflow as tf

from t5lite.data import preferences
from t5lite.data.tasks import check_registered


class CausalPrefixLMFeatureConverter(seqio.PrefixLMFeatureConverter):
    """seqio's prefix LM (inputs then targets in one row, loss on the targets only) without its
    bidirectional prefix: the whole row attends causally, as a causal decoder (Llama-style) is
    fine-tuned on prompts and responses."""

    MODEL_FEATURES = {
        name: feature
        for name, feature in seqio.PrefixLMFeatureConverter.MODEL_FEATURES.items()
        if name != "decoder_causal_attention"
    }

    def _convert_features(self, ds, task_feature_lengths):
        return super()._convert_features(ds, task_feature_lengths).map(self._causal)

    def get_model_feature_lengths(self, task_feature_lengths):
        return self._causal(super().get_model_feature_lengths(task_feature_lengths))

    @staticmethod
    def _causal(features):
        return {name: value for name, value in features.items() if name != "decoder_causal_attention"}


FEATURE_CONVERTERS = {
    "encoder_decoder": seqio.EncDecFeatureConverter,
    "decoder": seqio.LMFeatureConverter,
    "prefix_lm": seqio.PrefixLMFeatureConverter,
    "causal_prefix_lm": CausalPrefixLMFeatureConverter,
}
MODEL_KINDS = tuple(FEATURE_CONVERTERS)
PROMPTED_KINDS = ("prefix_lm", "causal_prefix_lm")  # decoders taking "inputs" as a prompt


def model_lengths(model_kind: str, task_feature_lengths: Mapping[str, int]) -> tuple[int, int]:
    """(encoder length, decoder length) that a model of `model_kind` sees, as seqio's converter makes them."""
    lengths = FEATURE_CONVERTERS[model_kind](pack=False).get_model_feature_lengths(task_feature_lengths)
    return lengths.get("encoder_input_tokens", 0), lengths["decoder_target_tokens"]


class DataStream:
    """Deterministic, resumable iterator of numpy batches (dict feature name -> np.ndarray [batch, length]).

    Batches carry seqio's model feature names (encoder_input_tokens, decoder_target_tokens, ...).
    With `repeat=False` the last batch is filled up with all-zero rows (zero loss weights and
    segment ids), so every batch has the same shape and no example is dropped. Processes of a
    multi-host run pass their own `shard_index` and read disjoint parts of the data.
    A preference task's pairs become two rows each (see `t5lite.data.preferences`): `batch_size`
    rows hold batch_size / 2 pairs, chosen on even rows.
    """

    def __init__(
        self,
        mixture_or_task_name: str,
        *,
        split: str,
        task_feature_lengths: Mapping[str, int],
        batch_size: int,
        model_kind: str,
        pack: bool = True,
        shuffle: bool = True,
        seed: int = 0,
        shard_index: int = 0,
        num_shards: int = 1,
        repeat: bool = True,
        start_id: int = 0,
        eos_id: int = 1,
    ):
        if model_kind not in FEATURE_CONVERTERS:
            raise ValueError(f"model_kind={model_kind!r} is not supported. Allowed values: {', '.join(MODEL_KINDS)}.")
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer.")
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"shard_index={shard_index} must be in [0, num_shards={num_shards}).")
        check_registered(mixture_or_task_name)
        self._provider = seqio.get_mixture_or_task(mixture_or_task_name)
        if split not in self._provider.splits:
            raise ValueError(
                f"{mixture_or_task_name!r} has no split {split!r}; it has {sorted(self._provider.splits)}."
            )
        features = set(self._provider.output_features)
        self.pairs = preferences.is_pair_task(features)
        if self.pairs:
            _check_pairs(mixture_or_task_name, model_kind, task_feature_lengths, batch_size, pack)
        else:
            _check_features(mixture_or_task_name, features, model_kind, task_feature_lengths)
        _check_eos(mixture_or_task_name, self._provider, eos_id)
        self._name, self._split, self._lengths = mixture_or_task_name, split, dict(task_feature_lengths)
        self._batch_size, self._seed = batch_size, seed
        self.description = {
            "task": mixture_or_task_name,
            "split": split,
            "lengths": dict(task_feature_lengths),
            "rows_per_process": batch_size,
            "processes": num_shards,
            "model_kind": model_kind,
            "pack": pack,
            "shuffle": shuffle,
            "seed": seed,
        }
        """What decides the batches besides the data files; a saved state continues only a stream
        with the same description."""
        self._shard = seqio.ShardInfo(index=shard_index, num_shards=num_shards)
        self._converter = FEATURE_CONVERTERS[model_kind](pack=pack, bos_id=start_id)
        self._check_not_empty()
        self._repeat, self._shuffle = repeat, shuffle
        batches = self._dataset()
        self._spec = {
            name: (tuple(spec.shape), spec.dtype.as_numpy_dtype) for name, spec in batches.element_spec.items()
        }
        self._iterator = iter(batches)
        self._position, self._rows_skipped = 0, 0

    def __iter__(self) -> DataStream:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        with self._errors_reported():
            batch = {name: value.numpy() for name, value in next(self._iterator).items()}
        self._position += 1
        return batch

    @property
    def position(self) -> int:
        """Batches consumed so far."""
        return self._position

    @property
    def rows_read(self) -> int:
        """Rows (packed examples) of this process's data consumed so far, whatever the batch size was."""
        return self._rows_skipped + self._position * self._batch_size

    @property
    def rows_skipped(self) -> int:
        """Rows dropped before the first batch (`skip_rows`); `position` counts batches after them."""
        return self._rows_skipped

    def skip_rows(self, rows: int) -> None:
        """Continues after the first `rows` rows of this stream, read again and dropped: where a run
        whose batch size changed stopped reading. Rows split over batches as this stream batches them."""
        with self._errors_reported():
            self._iterator = iter(self._dataset(skip_rows=rows))
        self._position, self._rows_skipped = 0, rows

    def save(self, prefix: str) -> None:
        """Writes the stream's state to `prefix`.index and `prefix`.data-* (local or remote paths)."""
        tf.train.Checkpoint(iterator=self._iterator).write(prefix)

    def restore(self, prefix: str, position: int) -> None:
        """Continues from the state `save` wrote at `position`, in the same time wherever that is.
        The stream must be built as the saved one was (task, split, lengths, batch, shard, seed)."""
        try:
            tf.train.Checkpoint(iterator=self._iterator).read(prefix).assert_consumed()
        except (tf.errors.OpError, AssertionError, ValueError) as error:
            raise ValueError(
                f"The input stream saved at {prefix} does not fit this one (task {self._name!r}, "
                f"lengths {self._lengths}, {self._batch_size} rows a batch, shard "
                f"{self._shard.index} of {self._shard.num_shards}): {error}"
            ) from None
        self._position = position

    def skip(self, batches: int) -> None:
        """Drops the next `batches` batches: continuing from a position alone replays the pipeline."""
        with self._errors_reported():
            for _ in range(batches):
                next(self._iterator)
        self._position += batches

    @property
    def shard(self) -> tuple[int, int]:
        """(index, count) of the part of the data this stream reads."""
        return self._shard.index, self._shard.num_shards

    @property
    def batch_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Shape and dtype of every feature of a batch, known without preprocessing one."""
        return dict(self._spec)

    @property
    def vocabulary(self) -> seqio.Vocabulary:
        return self._provider.output_features["chosen" if self.pairs else "targets"].vocabulary

    @property
    def model_feature_lengths(self) -> dict[str, int]:
        """Length of each model feature, e.g. inputs + targets for the prefix-LM decoder."""
        return dict(self._converter.get_model_feature_lengths(self._lengths))

    def _examples(self, repeat: bool, shuffle: bool) -> tf.data.Dataset:
        examples = self._provider.get_dataset(
            sequence_length=preferences.pair_lengths(self._lengths) if self.pairs else self._lengths,
            split=self._split,
            shuffle=shuffle,
            seed=self._seed,
            shard_info=self._shard,
            num_epochs=None if repeat else 1,
        )
        features = set(self._provider.output_features)  # drop e.g. "*_pretokenized" strings
        examples = examples.map(lambda ex: {k: v for k, v in ex.items() if k in features})
        return preferences.as_rows(examples) if self.pairs else examples

    def _dataset(self, skip_rows: int = 0) -> tf.data.Dataset:
        rows = self._converter(self._examples(self._repeat, self._shuffle), self._lengths)
        if skip_rows:  # only then: the saved states of pipelines without it keep fitting
            rows = rows.skip(skip_rows)
        batches = rows.batch(self._batch_size).map(self._fill_batch)
        options = tf.data.Options()
        options.deterministic = True
        # Saved states leave out what stateful ops hold; ours (a JSON parser) hold nothing.
        options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
        return batches.prefetch(tf.data.AUTOTUNE).with_options(options)

    def _fill_batch(self, batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        def fill(x):
            x = tf.pad(x, [[0, self._batch_size - tf.shape(x)[0]]] + [[0, 0]] * (x.shape.rank - 1))
            return tf.ensure_shape(x, [self._batch_size] + x.shape[1:])

        return {key: fill(value) for key, value in batch.items()}

    @contextlib.contextmanager
    def _errors_reported(self):
        """An error of the input pipeline (a bad line, say) as a ValueError naming the task and what
        went wrong, raised after TensorFlow's error (and the iterator state it holds) is let go."""
        try:
            yield
        except tf.errors.OpError as error:
            message = pipeline_error(error)
        else:
            return
        raise ValueError(f"The input pipeline of task {self._name!r} ({self._split} split) failed: {message}")

    def _check_not_empty(self) -> None:
        """An empty split repeated forever would hang the first step instead of failing."""
        with self._errors_reported():
            empty = not any(True for _ in self._examples(repeat=False, shuffle=False).take(1))
        if empty:
            shard = f" (shard {self._shard.index} of {self._shard.num_shards})" if self._shard.num_shards > 1 else ""
            raise ValueError(
                f"Task {self._name!r}, split {self._split!r}{shard} yields no examples: its files are empty, or "
                f"every text is shorter than an objective needs. Check the task's data files, or use another "
                f"split{', or fewer shards' if shard else ''}."
            )


def pipeline_error(error: tf.errors.OpError) -> str:
    """The message of the Python error raised inside the pipeline (a py_function's), or TensorFlow's
    own first line, without the traceback TensorFlow wraps around it."""
    python_errors = re.findall(r"^(\w+(?:Error|Exception)): (.+)$", error.message, re.MULTILINE)
    if python_errors:
        return python_errors[-1][1]
    return error.message.strip().splitlines()[0]


def _check_pairs(name: str, model_kind: str, lengths: Mapping[str, int], batch_size: int, pack: bool) -> None:
    """Pair rows must stay whole rows, side by side, after a prompt."""
    if model_kind == "decoder":
        raise ValueError(
            f"Task {name!r} holds preference pairs after a prompt; a decoder takes them with "
            f"model_kind='prefix_lm' or 'causal_prefix_lm'."
        )
    if pack:
        raise ValueError(f"Task {name!r} holds preference pairs, scored row by row: set train.pack=False.")
    if batch_size % 2:
        raise ValueError(
            f"Task {name!r} holds preference pairs, two rows each: batch_size={batch_size} rows (per "
            f"process) must be even."
        )
    _check_features(name, {"inputs", "targets"}, model_kind, lengths)


def _check_eos(name: str, provider, eos_id: int) -> None:
    """The task ends sequences with its vocabulary's EOS, which the model must know as its own."""
    vocabulary = next(iter(provider.output_features.values())).vocabulary
    if vocabulary.eos_id != eos_id:
        raise ValueError(
            f"Task {name!r} ends sequences with id {vocabulary.eos_id} (its vocabulary's EOS) but the model's "
            f"eos_id is {eos_id}: train with the model's own vocabulary, or set ModelConfig.eos_id = "
            f"{vocabulary.eos_id} for a new model."
        )


def _check_features(name: str, features: set[str], model_kind: str, lengths: Mapping[str, int]) -> None:
    """A decoder trained on span-corruption targets alone would learn nonsense, silently."""
    needed = {"targets"} if model_kind == "decoder" else {"inputs", "targets"}
    if not needed <= features or (model_kind == "decoder" and "inputs" in features):
        fix = (
            "a task with only 'targets', e.g. t5lite_corpus_lm"
            if model_kind == "decoder"
            else "a task with 'inputs' and 'targets', e.g. t5lite_corpus_span_corruption or t5lite_corpus_prefix_lm"
        )
        raise ValueError(
            f"Task {name!r} has features {sorted(features)} but model_kind={model_kind!r} needs "
            f"{sorted(needed)}: use {fix}."
        )
    missing = needed - set(lengths)
    if missing or any(not isinstance(lengths[key], int) or lengths[key] <= 0 for key in needed):
        raise ValueError(
            f"task_feature_lengths={dict(lengths)} must give a positive length for each of {sorted(needed)}."
        )
