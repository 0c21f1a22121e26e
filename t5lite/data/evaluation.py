"""seqio task metrics for a model's outputs: its greedy decodes, several samples per example for the
metrics that need them (pass@k), or, for a multiple-choice task, how it ranks each question's choices.

The model stays outside: callers pass functions that decode or score texts (`t5lite.inference`
passes a run's), so this module needs neither JAX nor a model, and tests can pass fakes.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Mapping, Sequence

import seqio

from t5lite.data import code_tasks
from t5lite.data import metrics as seqio_metrics
from t5lite.data.tasks import check_registered

PredictFn = Callable[[Sequence[str]], Sequence[str]]  # input texts -> one greedy output each
SampleFn = Callable[[Sequence[str], int, float], Sequence[Sequence[str]]]  # (texts, samples, temperature) -> lists
Question = tuple[str, tuple[str, ...], int]  # (context, choices, index of the right choice)
ChoicesFn = Callable[[Sequence[Question]], Mapping[str, float]]  # questions -> rank_accuracy, ...
RANK_ACCURACY = "rank_accuracy"  # ranks a task's choices by likelihood (a ChoicesFn) instead of decoding


def metric_functions() -> dict[str, Callable]:
    """The seqio metric functions `metrics=` names: those of `t5lite.data.metrics` and pass_at_k."""
    named = {
        name: fn
        for name, fn in vars(seqio_metrics).items()
        if inspect.isfunction(fn) and list(inspect.signature(fn).parameters)[:2] == ["targets", "predictions"]
    }
    return {**named, "pass_at_k": code_tasks.pass_at_k_metric}


def metric_names() -> list[str]:
    return sorted([*metric_functions(), RANK_ACCURACY])


def check_metric_names(names: Sequence[str]) -> None:
    """ValueError naming the known metrics unless `names` are some of them (checked before any decoding)."""
    known = metric_names()
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        what = f"Unknown metric name(s) {', '.join(map(repr, unknown))}" if unknown else "No metric names given"
        raise ValueError(f"{what}; the known metrics are: {', '.join(known)}.")


def task_vocabulary(name: str) -> seqio.Vocabulary:
    """The vocabulary of a task's outputs: its "targets", or a preference task's responses."""
    features = seqio.get_mixture_or_task(name).output_features
    return features["targets" if "targets" in features else "chosen"].vocabulary


def evaluate_predictions(
    mixture_or_task_name: str,
    split: str,
    predict_fn: PredictFn | None = None,
    *,
    sample_fn: SampleFn | None = None,
    choices_fn: ChoicesFn | None = None,
    metrics: Sequence[str] | None = None,
    task_feature_lengths: Mapping[str, int] | None = None,
    max_examples: int | None = None,
) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} for each task (of a mixture) that has something to evaluate.

    Each task's own metric functions run, or those `metrics` names (`metric_names()`). A metric
    marked `metrics.sampled` gets, per example, the list of `fn.samples` outputs that
    `sample_fn(inputs, fn.samples, fn.temperature)` returns for it; the other metrics share one
    greedy `predict_fn(inputs)`. A task whose examples carry "choices" and a "label" is scored by
    `choices_fn` on its (context, choices, label) questions (with `metrics`, when they name
    rank_accuracy). Examples come in file order, unshuffled; `max_examples` per task caps the cost.
    """
    if metrics is not None:
        check_metric_names(metrics)
    check_registered(mixture_or_task_name)
    results = {}
    for task in seqio.get_subtasks(seqio.get_mixture_or_task(mixture_or_task_name)):
        if split not in task.splits:
            continue
        dataset = _dataset(task, split, task_feature_lengths)
        has_choices = {"choices", "label"} <= set(dataset.element_spec)
        ranked = has_choices if metrics is None else RANK_ACCURACY in metrics
        named = [metric_functions()[name] for name in metrics or () if name != RANK_ACCURACY]
        metric_fns = task.predict_metric_fns if metrics is None else named
        if not (metric_fns or ranked):
            continue
        examples = _first(dataset, max_examples)
        if not examples:
            raise ValueError(f"Task {task.name!r} has no {split!r} examples to evaluate.")
        scores = _ranked(task, examples, has_choices, choices_fn) if ranked else {}
        scores |= _scored(task, examples, metric_fns, predict_fn, sample_fn) if metric_fns else {}
        results[task.name] = {name: float(value) for name, value in scores.items()}
    return results


def task_examples(
    task: seqio.Task, split: str, max_examples: int | None, task_feature_lengths: Mapping[str, int] | None = None
) -> list[dict]:
    """The first `max_examples` examples of a task's split, as evaluation reads them (unshuffled)."""
    return _first(_dataset(task, split, task_feature_lengths), max_examples)


def inputs_of(task: seqio.Task, examples: Sequence[Mapping]) -> list[str]:
    """The examples' input texts; ValueError if the task has none to decode from (a language-model task)."""
    if "inputs" not in task.output_features:
        raise ValueError(
            f"Task {task.name!r} has no inputs to decode from (its features: {', '.join(task.output_features)}); "
            f"metrics on outputs need a task of inputs and targets."
        )
    return [_text(task, example, "inputs") for example in examples]


def targets_of(task: seqio.Task, examples: Sequence[Mapping]) -> list:
    """The examples' targets through the task's postprocess_fn, as seqio's evaluator passes them to metrics."""
    return [task.postprocess_fn(_text(task, ex, "targets"), example=ex, is_target=True) for ex in examples]


def postprocessed(task: seqio.Task, examples: Sequence[Mapping], outputs: Sequence[str]) -> list:
    """A model's outputs (one per example) through the task's postprocess_fn."""
    return [task.postprocess_fn(output, example=ex, is_target=False) for output, ex in zip(outputs, examples)]


def _dataset(task: seqio.Task, split: str, task_feature_lengths: Mapping[str, int] | None):
    return task.get_dataset(sequence_length=task_feature_lengths, split=split, shuffle=False, seed=0)


def _first(dataset, max_examples: int | None) -> list[dict]:
    return list(itertools.islice(dataset.as_numpy_iterator(), max_examples))


def _scored(task, examples, metric_fns, predict_fn, sample_fn) -> dict[str, float]:
    """The metric functions' values on decodes: greedy ones decoded once, samples once per setting."""
    inputs, targets = inputs_of(task, examples), targets_of(task, examples)
    settings = list(dict.fromkeys(map(_setting, metric_fns)))
    if None in settings and predict_fn is None:
        raise ValueError(f"Task {task.name!r}'s metrics score greedy outputs; pass predict_fn.")
    if any(settings) and sample_fn is None:
        samples = next(setting for setting in settings if setting)[0]
        raise ValueError(f"Task {task.name!r} has a metric of {samples} samples per example; pass sample_fn.")
    outputs = {setting: _decode(task, examples, inputs, setting, predict_fn, sample_fn) for setting in settings}
    return {name: value for fn in metric_fns for name, value in fn(targets, outputs[_setting(fn)]).items()}


def _setting(metric_fn) -> tuple[int, float] | None:
    """(samples, temperature) of a metric marked `metrics.sampled`; None for one greedy output."""
    return (metric_fn.samples, metric_fn.temperature) if hasattr(metric_fn, "samples") else None


def _decode(task, examples, inputs, setting, predict_fn, sample_fn) -> list:
    """Postprocessed outputs: one per example (greedy), or a list of `samples` per example."""
    if setting is None:
        predictions = list(predict_fn(inputs))
        _check_count("predict_fn", "predictions", predictions, inputs)
        return postprocessed(task, examples, predictions)
    samples, temperature = setting
    drawn = list(sample_fn(inputs, samples, temperature))
    _check_count("sample_fn", "lists of samples", drawn, inputs)
    if any(len(outputs) != samples for outputs in drawn):
        raise ValueError(f"sample_fn returned {sorted({len(o) for o in drawn})} samples per input, not {samples}.")
    return [postprocessed(task, [ex] * samples, outputs) for ex, outputs in zip(examples, drawn)]


def _ranked(task, examples, has_choices: bool, choices_fn: ChoicesFn | None) -> Mapping[str, float]:
    """choices_fn's scores of the examples' questions: (context, choices, label) each."""
    if not has_choices:
        raise ValueError(
            f"{RANK_ACCURACY} ranks the choices of a multiple-choice task; task {task.name!r} has no "
            f"'choices' and 'label' features (t5lite_corpus_choice has them)."
        )
    if choices_fn is None:
        raise ValueError(f"Task {task.name!r} is scored by ranking its choices; pass choices_fn.")
    questions = [
        (_text(task, ex, "inputs"), tuple(choice.decode("utf-8") for choice in ex["choices"]), int(ex["label"]))
        for ex in examples
    ]
    return choices_fn(questions)


def _check_count(name: str, what: str, outputs: Sequence, inputs: Sequence[str]) -> None:
    if len(outputs) != len(inputs):
        raise ValueError(f"{name} returned {len(outputs)} {what} for {len(inputs)} inputs.")


def _text(task: seqio.Task, example: Mapping, key: str) -> str:
    """The untokenized text when the task kept it, else the decoded tokens."""
    if f"{key}_pretokenized" in example:
        return example[f"{key}_pretokenized"].decode("utf-8")
    return task.output_features[key].vocabulary.decode(example[key].tolist())
