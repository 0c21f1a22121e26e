"""seqio Tasks and Mixtures: the built-in ones, and gin-configurable registration of your own.

Built in (registered when `t5lite.data` is imported):

  t5lite_corpus_span_corruption   embedded corpus, T5 span corruption   {"inputs", "targets"}
  t5lite_corpus_prefix_lm         embedded corpus, prefix LM            {"inputs", "targets"}
  t5lite_corpus_lm                embedded corpus, causal LM            {"targets"}
  ..._bytes                       the same three with the byte-level vocabulary
  t5lite_synthetic_copy / _reverse / _sort   digit sequences, exact-match metric
  t5lite_synthetic                mixture of the three synthetic tasks
  t5lite_instructions             built-in instruction tuning (SFT) data, exact-match metric
  t5lite_preferences              built-in preference pairs for DPO {"inputs", "chosen", "rejected"}
  t5lite_code                     small Python functions to complete (bytes), pass@1/pass@10 by running tests
  t5lite_corpus_choice            which of 4 endings continues a corpus paragraph, ranked by likelihood

Your own data through gin: each registration function returns the task's name, so a gin
evaluated reference registers it when the trainer reads its argument, e.g.

  train.mixture_or_task_name = @my_text/t5lite.data.register_text_file_task()
  my_text/t5lite.data.register_text_file_task.name = "my_text"
  my_text/t5lite.data.register_text_file_task.train_files = "/data/books/*.txt"
  my_text/t5lite.data.register_text_file_task.objective = "lm"

Each takes `metric_fns` that score the model's predictions in evaluation, e.g. `t5lite.data.metrics`'s:

  my_text/t5lite.data.register_text_file_task.metric_fns = [@t5lite.data.metrics.rouge]

(`@name` without parentheses passes the function itself.)

Registering a name again replaces the task, so a config may be parsed twice.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Sequence

import gin
import seqio

from t5lite.data import (
    code_tasks,
    corpus,
    instructions,
    metrics,
    multiple_choice,
    objectives,
    preferences,
    sources,
    synthetic,
)
from t5lite.data.vocab import get_vocabulary


@gin.configurable(module="t5lite.data")
def register_text_file_task(
    name: str,
    train_files: sources.Files,
    validation_files: sources.Files | None = None,
    objective: str = "span_corruption",
    vocabulary: str | seqio.Vocabulary | None = None,
    text_key: str = "text",
    validation_fraction: float = 0.03,
    metric_fns: Sequence[Callable] = (),
) -> str:
    """A task on .txt files (a line per example) or .jsonl files (`text_key` of each object).

    Without `validation_files`, `validation_fraction` of the lines (chosen by hash) is the
    validation split. `vocabulary`: None (the default vocabulary), "bytes" or a .model path.
    `metric_fns`: seqio metrics `(targets, predictions) -> {name: value}`, e.g. `metrics.bleu`.
    """
    source = sources.TextFilesSource(
        train_files, validation_files, text_key=text_key, validation_fraction=validation_fraction
    )
    return _register_text_task(name, source, objective, vocabulary, metric_fns=metric_fns)


@gin.configurable(module="t5lite.data")
def register_tfds_task(
    name: str,
    tfds_name: str,
    objective: str = "span_corruption",
    vocabulary: str | seqio.Vocabulary | None = None,
    text_key: str = "text",
    splits: Sequence[str] | dict[str, str] | None = None,
    tfds_data_dir: str | None = None,
    metric_fns: Sequence[Callable] = (),
) -> str:
    """A task on a TensorFlow Datasets text dataset, e.g. tfds_name="lm1b:1.1.0" (read from tfds_data_dir).

    `splits` renames TFDS splits, e.g. {"train": "train", "validation": "test"}.
    """
    source = seqio.TfdsDataSource(tfds_name=tfds_name, splits=splits, tfds_data_dir=tfds_data_dir)
    return _register_text_task(name, source, objective, vocabulary, text_key, metric_fns)


@gin.configurable(module="t5lite.data")
def register_corpus_task(
    name: str, objective: str = "span_corruption", vocabulary=None, metric_fns: Sequence[Callable] = ()
) -> str:
    """A task on the embedded corpus in `vocabulary` (e.g. a converted model's own tokenizer)."""
    source = sources.TextFilesSource(lambda: [str(corpus.corpus_path())])
    return _register_text_task(name, source, objective, vocabulary, metric_fns=metric_fns)


@gin.configurable(module="t5lite.data")
def register_mixture(name: str, tasks: Sequence[str | tuple[str, float]], default_rate: float = 1.0) -> str:
    """A mixture sampling its tasks (names, or (name, rate) pairs) in proportion to their rates."""
    for task in tasks:
        check_registered(task if isinstance(task, str) else task[0])
    seqio.MixtureRegistry.remove(name)
    seqio.MixtureRegistry.add(name, tasks, default_rate=default_rate)
    return name


def registered_names() -> list[str]:
    """Names of all registered Tasks and Mixtures."""
    return sorted({*seqio.TaskRegistry.names(), *seqio.MixtureRegistry.names()})


def check_registered(name: str) -> None:
    """Raises ValueError naming the registered tasks if `name` is not one of them."""
    names = registered_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        raise ValueError(
            f"Unknown task or mixture {name!r}{f' (did you mean {close}?)' if close else ''}. "
            f"Registered: {', '.join(names)}. Register your data with "
            f"t5lite.data.register_text_file_task or register_tfds_task (e.g. from gin)."
        )


def _register_text_task(
    name: str,
    source: seqio.DataSource,
    objective: str,
    vocabulary: str | seqio.Vocabulary | None,
    text_key: str = "text",
    metric_fns: Sequence[Callable] = (),
) -> str:
    vocab = get_vocabulary(vocabulary)
    rename = [] if text_key == "text" else [_renamer(text_key)]
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name,
        source=source,
        output_features=objectives.output_features(objective, vocab),
        preprocessors=rename + objectives.preprocessors(objective),
        metric_fns=list(metric_fns),
    )
    return name


def _renamer(text_key: str):
    @seqio.map_over_dataset
    def rename(features):
        if text_key not in features:
            raise ValueError(f"The dataset has no feature {text_key!r} (it has {sorted(features)}); set text_key.")
        return {"text": features[text_key]}

    return rename


def _register_synthetic_task(operation: str) -> str:
    name = f"t5lite_synthetic_{operation}"
    vocab = get_vocabulary(None)
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name,
        source=sources.RecordsSource(functools.partial(synthetic.examples, operation)),
        output_features={key: seqio.Feature(vocab, add_eos=True) for key in ("inputs", "targets")},
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
        metric_fns=[metrics.exact_match],
    )
    return name


def _register_builtin() -> None:
    for objective in objectives.OBJECTIVES:
        register_corpus_task(f"t5lite_corpus_{objective}", objective)
        register_corpus_task(f"t5lite_corpus_{objective}_bytes", objective, "bytes")
    seqio.MixtureRegistry.remove("t5lite_synthetic")
    seqio.MixtureRegistry.add(
        "t5lite_synthetic", [_register_synthetic_task(op) for op in synthetic.OPERATIONS], default_rate=1.0
    )
    instructions.register_instruction_task("t5lite_instructions")
    preferences.register_preference_task("t5lite_preferences")
    code_tasks.register_code_task("t5lite_code")
    multiple_choice.register_multiple_choice_task(multiple_choice.TASK_NAME)


_register_builtin()
