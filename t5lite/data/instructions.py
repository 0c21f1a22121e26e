"""Instruction tuning (SFT) data: (instruction, response) records through a prompt template.

The prompt `template.format(instruction=...)` becomes "inputs" and the response "targets", so
the loss falls on response tokens only: an encoder-decoder reads the prompt with its encoder,
a decoder (model_kind "prefix_lm", or "causal_prefix_lm" for a causal prefix) sees it as its
prefix, which seqio's feature converter gives zero loss weight. A prompt longer than its feature
length loses its beginning, not the template's response marker at its end; a long response is cut
at its end.

`t5lite_instructions` is a small built-in dataset of skills a tiny model learns within minutes
(parity, successor, sums, comparisons, reversing digits, repeating a word), made from a seeded
generator; a hash of the instruction decides the split. Your own .jsonl files (one
{"instruction": ..., "response": ...} object per line) register with `register_instruction_task`.
"""

from __future__ import annotations

import functools
import json
import random
import zlib
from collections.abc import Callable

import gin
import seqio
import tensorflow as tf

from t5lite.data import metrics, sources
from t5lite.data.vocab import get_vocabulary

TEMPLATE = "### Instruction:\n{instruction}\n### Response:\n"
SPLIT_SIZES = {"train": 5_000, "validation": 200}
WORDS = ("cat", "tree", "river", "stone", "light", "music", "bread", "cloud", "green", "window")
_VALIDATION_ONE_IN = 10


def _skills(rng: random.Random) -> list[Callable[[], tuple[str, str]]]:
    n = lambda: rng.randrange(100)
    return [
        lambda: (lambda k: (f"Is {k} even or odd?", "even" if k % 2 == 0 else "odd"))(n()),
        lambda: (lambda k: (f"What number comes after {k}?", str(k + 1)))(n()),
        lambda: (lambda a, b: (f"What is {a} plus {b}?", str(a + b)))(rng.randrange(10), rng.randrange(10)),
        lambda: (lambda a, b: (f"Which is larger, {a} or {b}?", str(max(a, b))))(n(), n()),
        lambda: (lambda d: (f"Reverse the digits: {' '.join(d)}", " ".join(d[::-1])))(
            [str(rng.randrange(10)) for _ in range(rng.randint(3, 6))]
        ),
        lambda: (lambda w, k: (f"Repeat the word {w} {k} times.", " ".join([w] * k)))(
            rng.choice(WORDS), rng.randint(2, 4)
        ),
    ]


@functools.cache
def builtin_examples(split: str) -> tuple[dict[str, str], ...]:
    """{"instruction", "response"} records of `split`, the same on every machine."""
    rng = random.Random("t5lite-instructions")
    skills, records, seen = _skills(rng), [], set()
    while len(records) < SPLIT_SIZES[split]:
        instruction, response = rng.choice(skills)()
        validation = zlib.crc32(instruction.encode()) % _VALIDATION_ONE_IN == 0
        if validation == (split == "validation") and (split == "train" or instruction not in seen):
            seen.add(instruction)
            records.append({"instruction": instruction, "response": response})
    return tuple(records)


def read_jsonl(path: str, keys: tuple[str, ...] = ("instruction", "response")) -> tuple[dict[str, str], ...]:
    """The `keys` of each record of a .jsonl file; a line without them is an error."""
    records = []
    with tf.io.gfile.GFile(path) as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or not set(keys) <= set(record):
                raise ValueError(f"{path}:{number} needs the keys {', '.join(map(repr, keys))}; got {line[:200]!r}.")
            records.append({key: str(record[key]) for key in keys})
    if not records:
        raise ValueError(f"{path} holds no records.")
    return tuple(records)


def format_prompt(template: str, responses: dict[str, str] | None = None):
    """A seqio preprocessor: {"instruction", ...} -> {"inputs": the prompt} and each response field
    renamed as `responses` says (default {"response": "targets"})."""
    if "{instruction}" not in template:
        raise ValueError(f"The instruction template {template!r} has no {{instruction}} field.")
    before, after = template.split("{instruction}", 1)
    responses = responses or {"response": "targets"}

    @seqio.map_over_dataset
    def apply(record):
        prompt = tf.strings.join([before, record["instruction"], after])
        return {"inputs": prompt, **{new: record[old] for old, new in responses.items()}}

    apply.template = template  # what `prompt_template` finds
    return apply


def apply_template(template: str, instruction: str) -> str:
    before, after = template.split("{instruction}", 1)
    return before + instruction + after


def prompt_template(mixture_or_task_name: str) -> str | None:
    """The instruction template of a task (of a mixture's first task), or None where it has none."""
    provider = seqio.get_mixture_or_task(mixture_or_task_name)
    task = provider.tasks[0] if isinstance(provider, seqio.Mixture) else provider
    return next((p.template for p in task.preprocessors if hasattr(p, "template")), None)


def keep_prompt_end(dataset: tf.data.Dataset, sequence_length) -> tf.data.Dataset:
    """Cuts a long tokenized prompt at its start, leaving room for EOS, so the response marker stays."""
    if not sequence_length or sequence_length.get("inputs") is None:
        return dataset
    keep = sequence_length["inputs"] - 1
    return dataset.map(lambda ex: {**ex, "inputs": ex["inputs"][-keep:]})


@gin.configurable(module="t5lite.data")
def register_instruction_task(
    name: str,
    train_file: str | None = None,
    validation_file: str | None = None,
    template: str = TEMPLATE,
    vocabulary: str | seqio.Vocabulary | None = None,
) -> str:
    """An SFT task on .jsonl files, or on the built-in dataset when no train_file is given. Metric:
    exact match of the generated response."""
    return register_prompted_task(
        name,
        builtin_examples,
        {"response": "targets"},
        train_file,
        validation_file,
        template,
        vocabulary,
        metric_fns=[metrics.exact_match],
    )


def register_prompted_task(
    name: str,
    builtin: Callable,
    responses: dict[str, str],
    train_file: str | None,
    validation_file: str | None,
    template: str,
    vocabulary,
    metric_fns=(),
) -> str:
    """A task of {"instruction", *responses} records (from .jsonl files, or `builtin(split)`) whose
    instruction goes through `template` into "inputs" and whose responses become the features
    `responses` names, each ending in EOS."""
    if validation_file and not train_file:
        raise ValueError("A validation_file needs a train_file; give both, or neither for the built-in dataset.")
    files = {"train": train_file, "validation": validation_file or train_file}
    keys = ("instruction", *responses)
    records = builtin if train_file is None else lambda split: read_jsonl(files[split], keys)
    if train_file is not None:
        records("train")  # fail at registration, not at the first step
    vocab = get_vocabulary(vocabulary)
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name,
        source=sources.RecordsSource(records),
        output_features={key: seqio.Feature(vocab, add_eos=True) for key in ("inputs", *responses.values())},
        preprocessors=[
            format_prompt(template, responses),
            seqio.preprocessors.tokenize,
            keep_prompt_end,
            seqio.preprocessors.append_eos_after_trim,
        ],
        metric_fns=list(metric_fns),
    )
    return name
