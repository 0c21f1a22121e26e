"""seqio task metrics for a model's predictions, for the training loop's evaluation step."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence

import seqio

from t5lite.data.tasks import check_registered

PredictFn = Callable[[Sequence[str]], Sequence[str]]


def evaluate_predictions(
    mixture_or_task_name: str,
    split: str,
    predict_fn: PredictFn,
    *,
    task_feature_lengths: Mapping[str, int] | None = None,
    max_examples: int | None = None,
) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} for each task (of a mixture) that defines metric functions.

    `predict_fn` maps a list of input texts to the list of predicted texts. Examples come in
    file order, unshuffled; `max_examples` per task caps the cost.
    """
    check_registered(mixture_or_task_name)
    results = {}
    for task in seqio.get_subtasks(seqio.get_mixture_or_task(mixture_or_task_name)):
        if not task.predict_metric_fns or split not in task.splits:
            continue
        dataset = task.get_dataset(sequence_length=task_feature_lengths, split=split, shuffle=False, seed=0)
        examples = list(itertools.islice(dataset.as_numpy_iterator(), max_examples))
        if not examples:
            raise ValueError(f"Task {task.name!r} has no {split!r} examples to evaluate.")
        inputs = [_text(task, example, "inputs") for example in examples]
        predictions = list(predict_fn(inputs))
        if len(predictions) != len(inputs):
            raise ValueError(f"predict_fn returned {len(predictions)} predictions for {len(inputs)} inputs.")
        targets = [task.postprocess_fn(_text(task, ex, "targets"), example=ex, is_target=True) for ex in examples]
        predictions = [task.postprocess_fn(p, example=ex, is_target=False) for p, ex in zip(predictions, examples)]
        results[task.name] = {
            name: float(value)
            for metric_fn in task.predict_metric_fns
            for name, value in metric_fn(targets, predictions).items()
        }
    return results


def _text(task: seqio.Task, example: Mapping, key: str) -> str:
    """The untokenized text when the task kept it, else the decoded tokens."""
    if f"{key}_pretokenized" in example:
        return example[f"{key}_pretokenized"].decode("utf-8")
    return task.output_features[key].vocabulary.decode(example[key].tolist())
