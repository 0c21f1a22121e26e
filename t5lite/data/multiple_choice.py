"""A built-in multiple-choice task on the embedded corpus, in the style of HellaSwag and story cloze:
which of four endings continues the beginning of a paragraph?

Each paragraph of a split gives one question: its first `MAX_WORDS` words, cut in the middle, are
the context and the true ending. Three other endings of the same split are the distractors, of the
same length in words where the split has enough of them (so the summed log-likelihood cannot pick
the answer by its length), and never an ending of a paragraph that begins with the same context.
The paragraph's own hash seeds the draw and the answer's position, so every machine makes the same
questions and the answer's position varies.

The train and validation splits are those of the corpus tasks (`t5lite_corpus_*`): a model
pre-trained on the corpus's train split has not read a validation paragraph.

As a seqio task (`register_multiple_choice_task`) an example has "inputs" (the context) and
"targets" (the true ending) to train on, and keeps "choices" (a string tensor [4]) and "label"
(the true ending's index) for evaluation, which ranks the choices by their log-likelihood under
the model (`t5lite.scoring.evaluate_choices`, metrics `rank_accuracy` and `rank_accuracy_norm`).
`multiple_choice_examples` returns the same questions as plain Python.
"""

from __future__ import annotations

import functools
import random
import zlib
from collections import defaultdict
from typing import NamedTuple

import gin
import seqio

from t5lite.data import corpus, sources
from t5lite.data.vocab import get_vocabulary

TASK_NAME = "t5lite_corpus_choice"
NUM_CHOICES = 4
MAX_WORDS = 24  # of a paragraph's beginning: a context and an ending of up to 12 words each
SPLITS = ("train", "validation")


class MultipleChoice(NamedTuple):
    """A question: its context, the candidate endings, and the index of the true one."""

    context: str
    choices: tuple[str, ...]
    label: int


def multiple_choice_examples(split: str, max_examples: int | None = None) -> list[MultipleChoice]:
    """The questions of `split` in corpus order (the first `max_examples` of them)."""
    return [MultipleChoice(r["inputs"], tuple(r["choices"]), r["label"]) for r in _records(split)[:max_examples]]


@gin.configurable(module="t5lite.data")
def register_multiple_choice_task(name: str = TASK_NAME, vocabulary: str | seqio.Vocabulary | None = None) -> str:
    """The corpus multiple-choice task; "inputs" and "targets" end in EOS, as an instruction task's."""
    vocab = get_vocabulary(vocabulary)
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name,
        source=sources.RecordsSource(_records, splits=SPLITS),
        output_features={key: seqio.Feature(vocab, add_eos=True) for key in ("inputs", "targets")},
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
    )
    return name


@functools.cache
def _records(split: str) -> tuple[dict, ...]:
    """{"inputs", "targets", "choices", "label"} of every paragraph of `split`."""
    pairs = [_beginning_and_ending(p) for p in _paragraphs(split)]
    endings = list(dict.fromkeys(ending for _, ending in pairs))  # distinct, in corpus order
    by_words = defaultdict(list)
    for ending in endings:
        by_words[len(ending.split())].append(ending)
    true_endings = defaultdict(set)  # context -> the endings that really follow it
    for context, ending in pairs:
        true_endings[context].add(ending)
    records = []
    for context, ending in pairs:
        rng = random.Random(zlib.crc32(f"{context}\n{ending}".encode()))
        same_length = by_words[len(ending.split())]
        pool = same_length if len(same_length) >= len(true_endings[context]) + NUM_CHOICES else endings
        choices = []
        while len(choices) < NUM_CHOICES - 1:
            candidate = pool[rng.randrange(len(pool))]
            if candidate not in true_endings[context] and candidate not in choices:
                choices.append(candidate)
        label = rng.randrange(NUM_CHOICES)
        choices.insert(label, ending)
        records.append({"inputs": context, "targets": ending, "choices": choices, "label": label})
    return tuple(records)


def _beginning_and_ending(paragraph: str) -> tuple[str, str]:
    """The first MAX_WORDS words, cut in the middle (corpus paragraphs have at least 6 words)."""
    words = paragraph.split()[:MAX_WORDS]
    cut = len(words) // 2
    return " ".join(words[:cut]), " ".join(words[cut:])


@functools.cache
def _paragraphs(split: str) -> tuple[str, ...]:
    """The corpus paragraphs of `split`, split as the corpus tasks split them (by a hash of the line)."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}. Allowed values: {', '.join(SPLITS)}.")
    source = sources.TextFilesSource(lambda: [str(corpus.corpus_path())])
    lines = source.get_dataset(split, shuffle=False).as_numpy_iterator()
    return tuple(line["text"].decode("utf-8") for line in lines)
