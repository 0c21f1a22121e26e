"""seqio metric functions: `(targets, predictions) -> {name: value}` over decoded strings.

Each matches its counterpart in `t5.evaluation.metrics` (0-100, as T5 reports them) and is
gin-configurable, so a task registered from gin can take them:

  register_text_file_task.metric_fns = [@t5lite.data.metrics.bleu, @t5lite.data.metrics.rouge]
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

import gin
import numpy as np
import sacrebleu

_configurable = gin.configurable(module="t5lite.data.metrics")
_ROUGE_KEYS = ("rouge1", "rouge2", "rougeLsum")


@_configurable
def exact_match(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Percentage of predictions equal to their target (ends stripped), as T5 reports accuracy."""
    _check("exact_match", targets, predictions)
    hits = sum(t.strip() == p.strip() for t, p in zip(targets, predictions))
    return {"exact_match": 100.0 * hits / len(targets)}


@_configurable
def bleu(targets: Sequence[str | Sequence[str]], predictions: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu, "intl" tokenizer, as T5). A target is a reference or a list of them.

    T5 passes a list of lists to sacrebleu as reference *streams* (one list per reference, not per
    example); here each target holds its example's references, and they may vary in number.
    """
    _check("bleu", targets, predictions, references=True)
    references = _references(targets)
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(max(map(len, references)))]
    return {"bleu": sacrebleu.corpus_bleu(predictions, streams, tokenize="intl").score}


@_configurable
def rouge(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-Lsum F-measures (rouge-score, no stemming), as T5.

    Like T5, a " . " ends a sentence for ROUGE-Lsum. T5 reports the median of 1000 bootstrap means
    drawn from numpy's global RNG: not the mean, and random (up to 2 points off on five examples),
    less so with more examples. This is the mean itself, so it is deterministic.
    """
    from rouge_score import rouge_scorer  # imports nltk: a second, only when used

    _check("rouge", targets, predictions)
    scorer = rouge_scorer.RougeScorer(list(_ROUGE_KEYS))
    scores = [scorer.score(_sentence_lines(t), _sentence_lines(p)) for t, p in zip(targets, predictions)]
    return {key: 100.0 * float(np.mean([s[key].fmeasure for s in scores])) for key in _ROUGE_KEYS}


@_configurable
def squad(targets: Sequence[str | Sequence[str]], predictions: Sequence[str]) -> dict[str, float]:
    """SQuAD v1.1 exact match ("em") and token F1 ("f1"), the best over each example's answers.

    Answers are normalised first: lowercase, no punctuation, no articles (a, an, the), single spaces.
    """
    _check("squad", targets, predictions, references=True)
    answers = [[_normalize_answer(a) for a in refs] for refs in _references(targets)]
    guesses = [_normalize_answer(p) for p in predictions]
    em = np.mean([max(a == g for a in refs) for refs, g in zip(answers, guesses)])
    f1 = np.mean([max(_token_f1(a, g) for a in refs) for refs, g in zip(answers, guesses)])
    return {"em": 100.0 * float(em), "f1": 100.0 * float(f1)}


@_configurable
def classification(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Accuracy, macro-F1 and, per class, "accuracy/<label>" (its recall), for string labels.

    The classes are the labels among the targets, as T5's `mean_multiclass_f1` fixes its classes:
    a prediction that is no class counts as wrong without adding a class of F1 zero.
    """
    _check("classification", targets, predictions)
    counts = collections.Counter(zip(targets, predictions))
    predicted = collections.Counter(predictions)
    support = collections.Counter(targets)
    recall = {label: counts[label, label] / n for label, n in sorted(support.items())}
    f1 = [2 * counts[c, c] / (support[c] + predicted[c]) for c in recall]
    hits = sum(counts[c, c] for c in recall)
    per_class = {f"accuracy/{label}": 100.0 * r for label, r in recall.items()}
    return {"accuracy": 100.0 * hits / len(targets), "macro_f1": 100.0 * float(np.mean(f1)), **per_class}


def sampled(samples: int, temperature: float):
    """Marks a metric that scores several samples per example (pass@k): evaluation then decodes
    `samples` outputs per example at `temperature` and passes, for each example, their list."""

    def mark(metric_fn):
        metric_fn.samples, metric_fn.temperature = samples, temperature
        return metric_fn

    return mark


def _check(metric: str, targets: Sequence, predictions: Sequence, *, references: bool = False) -> None:
    """Raises ValueError for inputs that would otherwise score wrongly or fail deep inside a library.

    With `references`, a target may also be a non-empty list of reference strings.
    """
    if len(predictions) != len(targets):
        raise ValueError(f"{metric}: {len(predictions)} predictions for {len(targets)} targets.")
    if len(predictions) == 0:
        raise ValueError(f"{metric}: no predictions to score; it needs at least one example.")
    for i, prediction in enumerate(predictions):
        if not isinstance(prediction, str):
            raise ValueError(f"{metric}: prediction {i} is {_describe(prediction)}, not a string.")
    for i, target in enumerate(targets):
        if not (isinstance(target, str) or references and _is_reference_list(target)):
            expected = "a string or a non-empty list of strings" if references else "a string"
            raise ValueError(f"{metric}: target {i} is {_describe(target)}, not {expected}.")


def _is_reference_list(target) -> bool:
    return isinstance(target, list | tuple) and len(target) > 0 and all(isinstance(t, str) for t in target)


def _describe(value) -> str:
    return f"{type(value).__name__} {value!r:.60}"


def _references(targets: Sequence[str | Sequence[str]]) -> list[list[str]]:
    return [[target] if isinstance(target, str) else list(target) for target in targets]


def _sentence_lines(text: str) -> str:
    """One sentence a line, as rouge-score's ROUGE-Lsum expects and T5 prepares it."""
    return text.replace(" . ", " .\n")


def _normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _token_f1(answer: str, guess: str) -> float:
    common = sum((collections.Counter(answer.split()) & collections.Counter(guess.split())).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(guess.split()), common / len(answer.split())
    return 2 * precision * recall / (precision + recall)
