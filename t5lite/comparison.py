"""Two runs compared example by example: both decode the validation inputs of a task greedily, a judge
scores each output, and the run with the higher score wins the example (equal scores tie).

A judge is a metric applied to one example at a time (`metric_judge`) or a reward model
(`reward_judge`: a run with `AdapterConfig.reward_head`, scoring (input, output) as it was trained to
score responses). The judgments give run A's win rate (wins plus half the ties, with a Wilson
interval) and Bradley-Terry ratings with percentile-bootstrap intervals (`t5lite.ratings`).
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import numpy as np
import seqio
import tensorflow as tf

from t5lite import inference, ratings
from t5lite.data import evaluation
from t5lite.data.pipeline import FEATURE_CONVERTERS
from t5lite.train.preference import response_rewards

CONFIDENCE = 0.95
BOOTSTRAP_ROUNDS = 1000
# Virtual ties per pair: keeps Bradley-Terry finite when one run wins every example (ratings.bradley_terry).
PRIOR = 1.0
REWARD_BATCH = 32


class Judge(NamedTuple):
    """`score(inputs, targets, outputs)` -> one number per example, higher is better; `name` says what
    it is, and a judge that reads tokens has the `vocabulary` the compared runs must share."""

    name: str
    score: Callable[[Sequence[str], Sequence, Sequence[str]], Sequence[float]]
    vocabulary: seqio.Vocabulary | None = None


def metric_judge(name: str) -> Judge:
    """A metric of `t5lite.data.metrics` on each example alone: the first value it returns (exact_match,
    bleu, rouge1, em, accuracy)."""
    metric_fns = evaluation.metric_functions()
    if name not in metric_fns or hasattr(metric_fns[name], "samples"):
        judges = [n for n, fn in metric_fns.items() if not hasattr(fn, "samples")]
        raise ValueError(f"--judge={name!r} is not a metric that scores one output; use one of {', '.join(judges)}.")

    def score(inputs, targets, outputs):
        return [next(iter(metric_fns[name]([t], [o]).values())) for t, o in zip(targets, outputs)]

    return Judge(name, score)


def reward_judge(run: inference.Run, name: str) -> Judge:
    """A reward model's reward of each (input, output) pair, tokenized and laid out as its training
    rows were (cut to its task's lengths, ending in EOS, through its model kind's feature converter)."""
    config = run.model.config
    if not config.adapters.reward_head:
        raise ValueError(f"The judge {name} has no reward head; train one with runs/reward_model_instructions.gin.")
    vocabulary = evaluation.task_vocabulary(run.task)
    convert = FEATURE_CONVERTERS[run.kind](pack=False)
    rewards = jax.jit(functools.partial(response_rewards, config))
    keep = {key: length - 1 for key, length in run.task_feature_lengths.items()}  # room for EOS
    tokens = tf.TensorSpec([None], tf.int32)

    def score(inputs, targets, outputs):
        def rows():  # a long input loses its start (the prompt's end stays), a long output its end
            for text, output in zip(inputs, outputs):
                yield {
                    "inputs": vocabulary.encode(text)[-keep["inputs"] :] + [config.eos_id],
                    "targets": vocabulary.encode(output)[: keep["targets"]] + [config.eos_id],
                }

        dataset = tf.data.Dataset.from_generator(rows, output_signature={"inputs": tokens, "targets": tokens})
        batches = convert(dataset, run.task_feature_lengths).batch(REWARD_BATCH).as_numpy_iterator()
        return np.concatenate([np.asarray(rewards(run.params, batch)) for batch in batches]).tolist()

    return Judge(f"reward model {name}", score, vocabulary)


def compare_runs(
    run_a: inference.Run,
    run_b: inference.Run,
    judge: Judge,
    *,
    names: tuple[str, str] = ("a", "b"),
    task: str | None = None,
    max_examples: int = 64,
    seed: int = 0,
) -> dict:
    """Judgments of every validation example of `task` (default: the runs' common task) and what they
    add up to: A's win rate and both runs' Bradley-Terry ratings. Bad input raises ValueError before
    anything is decoded."""
    task = task or _common_task(run_a, run_b)
    for run in (run_a, run_b):
        inference.check_task(run, task)
    if judge.vocabulary is not None and judge.vocabulary != evaluation.task_vocabulary(task):
        raise ValueError(f"The judge {judge.name} reads another vocabulary than task {task!r}'s.")
    if names[0] == names[1]:
        raise ValueError(f"Both runs are named {names[0]!r}; compare two different runs.")
    judged = []
    for subtask in seqio.get_subtasks(seqio.get_mixture_or_task(task)):
        if "validation" in subtask.splits:
            judged += _judged(subtask, run_a, run_b, judge, max_examples)
    if not judged:
        raise ValueError(f"Task {task!r} has no validation examples to compare the runs on.")
    games = [ratings.Judgment(*names, example["outcome"]) for example in judged]
    return {
        "task": task,
        "judge": judge.name,
        "runs": {key: {"name": name, "step": run.step} for key, name, run in zip("ab", names, (run_a, run_b))},
        "examples": len(judged),
        "win_rate": {"run": names[0], **ratings.win_rate(games, names[0], CONFIDENCE)._asdict()},
        "bradley_terry": {
            model: estimate._asdict()
            for model, estimate in ratings.bootstrap_intervals(
                games, bradley_terry, rounds=BOOTSTRAP_ROUNDS, confidence=CONFIDENCE, seed=seed
            ).items()
        },
        "settings": {"confidence": CONFIDENCE, "bootstrap_rounds": BOOTSTRAP_ROUNDS, "prior": PRIOR, "seed": seed},
        "judgments": judged,
    }


def bradley_terry(judgments: Sequence) -> dict:
    """`ratings.bradley_terry` with the PRIOR that keeps a clean sweep finite."""
    return ratings.bradley_terry(judgments, prior=PRIOR)


def summary(result: dict) -> str:
    """A small table of the result: each run's wins, losses, ties, win rate and rating."""
    rate, games = result["win_rate"], [g["outcome"] for g in result["judgments"]]
    level = f"{100 * result['settings']['confidence']:g}%"
    rows = [("run", "wins", "losses", "ties", f"win rate ({level} Wilson)", f"Bradley-Terry ({level} bootstrap)")]
    rate_b = {"value": 1 - rate["value"], "low": 1 - rate["high"], "high": 1 - rate["low"]}
    for key, won, share in (("a", 1.0, rate), ("b", 0.0, rate_b)):
        name = result["runs"][key]["name"]
        rating = result["bradley_terry"][name]
        rows.append(
            (
                name,
                str(games.count(won)),
                str(games.count(1.0 - won)),
                str(games.count(0.5)),
                f"{share['value']:.3f} [{share['low']:.3f}, {share['high']:.3f}]",
                f"{rating['value']:.1f} [{rating['low']:.1f}, {rating['high']:.1f}]",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    table = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(
        [f"{result['task']}: {result['examples']} validation examples judged by {result['judge']}", *table]
    )


def run_names(run_a: str | pathlib.Path, run_b: str | pathlib.Path) -> tuple[str, str]:
    """The runs' directory names, or their paths where the names are the same; ValueError for one run twice."""
    a, b = pathlib.Path(run_a), pathlib.Path(run_b)
    if a.resolve() == b.resolve():
        raise ValueError(f"--compare names {a} twice; compare two different runs (or a run and its quantised copy).")
    return (a.name, b.name) if a.name != b.name else (str(a), str(b))


def _common_task(run_a: inference.Run, run_b: inference.Run) -> str:
    if run_a.task != run_b.task:
        raise ValueError(
            f"The runs were trained on different tasks ({run_a.task!r} and {run_b.task!r}); "
            f"name the task to compare them on with --task."
        )
    return run_a.task


def _judged(task: seqio.Task, run_a: inference.Run, run_b: inference.Run, judge: Judge, max_examples: int) -> list:
    """One record per example of the task: input, target, both outputs, their scores and the outcome for A."""
    examples = evaluation.task_examples(task, "validation", max_examples)
    inputs, targets = evaluation.inputs_of(task, examples), evaluation.targets_of(task, examples)
    outputs = [
        evaluation.postprocessed(task, examples, inference.generate_texts(run, inputs, inference.greedy_options(run)))
        for run in (run_a, run_b)
    ]
    scores = [judge.score(inputs, targets, output) for output in outputs]
    return [
        {"input": x, "target": t, "a": oa, "b": ob, "score_a": sa, "score_b": sb, "outcome": _outcome(sa, sb)}
        for x, t, oa, ob, sa, sb in zip(inputs, targets, *outputs, *scores)
    ]


def _outcome(score_a: float, score_b: float) -> float:
    return 1.0 if score_a > score_b else 0.0 if score_a < score_b else 0.5
