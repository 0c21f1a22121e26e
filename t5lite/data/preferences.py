"""Preference data for DPO: (instruction, chosen, rejected) records as seqio tasks.

A preference task has the features "inputs" (the instruction through the prompt template),
"chosen" and "rejected". The input stream (`DataStream`) turns each example into two rows,
(inputs, chosen) then (inputs, rejected), so a batch of 2n rows holds n whole pairs, chosen on
even rows; everything after that (feature converters, sharding, the step) sees ordinary rows.

`t5lite_preferences` is built in: on the instruction data's prompts the right answer is chosen
over a near miss (the other parity, the next number, a word short). Your own .jsonl files (one
{"instruction", "chosen", "rejected"} object per line) register with `register_preference_task`.
"""

from __future__ import annotations

import functools

import gin
import seqio
import tensorflow as tf

from t5lite.data.instructions import TEMPLATE, builtin_examples, register_prompted_task

PAIR_FEATURES = ("chosen", "rejected")


def near_miss(response: str) -> str:
    """A plausible wrong answer: the other parity, the next number, or one word short."""
    if response in ("even", "odd"):
        return "odd" if response == "even" else "even"
    if response.isdigit():
        return str(int(response) + 1)
    return " ".join(response.split()[:-1])


@functools.cache
def builtin_pairs(split: str) -> tuple[dict[str, str], ...]:
    return tuple(
        {"instruction": r["instruction"], "chosen": r["response"], "rejected": near_miss(r["response"])}
        for r in builtin_examples(split)
    )


@gin.configurable(module="t5lite.data")
def register_preference_task(
    name: str,
    train_file: str | None = None,
    validation_file: str | None = None,
    template: str = TEMPLATE,
    vocabulary: str | seqio.Vocabulary | None = None,
) -> str:
    """A preference task on .jsonl files, or on the built-in pairs when no train_file is given."""
    return register_prompted_task(
        name, builtin_pairs, {key: key for key in PAIR_FEATURES}, train_file, validation_file, template, vocabulary
    )


def is_pair_task(features) -> bool:
    return set(PAIR_FEATURES) <= set(features)


def pair_lengths(task_feature_lengths) -> dict[str, int]:
    """The task's lengths of a pair example: "targets" bounds each response."""
    return {"inputs": task_feature_lengths["inputs"], **{key: task_feature_lengths["targets"] for key in PAIR_FEATURES}}


def as_rows(examples: tf.data.Dataset) -> tf.data.Dataset:
    """Each {"inputs", "chosen", "rejected"} example -> rows {"inputs", "targets"}: chosen, then rejected."""

    def rows(example):
        chosen, rejected = ({"inputs": example["inputs"], "targets": example[key]} for key in PAIR_FEATURES)
        return tf.data.Dataset.from_tensors(chosen).concatenate(tf.data.Dataset.from_tensors(rejected))

    return examples.flat_map(rows)
