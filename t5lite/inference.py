"""Using a trained run: restore it from its model dir, generate text, and evaluate it.

A run is self-describing: `<model_dir>/config.gin` names its task (and so its vocabulary)
and feature lengths, and `t5lite_config.json` its model, so `t5lite eval` and
`t5lite generate` need only `--model_dir`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import sys
from collections.abc import Sequence

import jax
import numpy as np
import seqio

from t5lite import config as config_lib
from t5lite import data as t5data
from t5lite import decoding, scoring
from t5lite.models import build
from t5lite.quantization.weights import quantize_weights
from t5lite.train import checkpoint
from t5lite.train.evaluation import evaluate
from t5lite.train.spec import RunSpec
from t5lite.train.step import eval_step

QUANTIZATION_FILE = "quantization.json"
PRUNING_FILE = "pruning.json"  # a run `t5lite prune` made
CONVERTED_FILE = "converted.json"  # a run `t5lite convert` made from a Hugging Face model


@dataclasses.dataclass
class Run:
    """A trained model with the run that trained it."""

    model: object
    params: object
    step: int
    spec: RunSpec

    @property
    def task(self) -> str:
        return self.spec.mixture_or_task_name

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def task_feature_lengths(self) -> dict[str, int]:
        return self.spec.task_feature_lengths

    @property
    def batch_size(self) -> int:
        return self.spec.batch_size

    @property
    def vocabulary(self) -> seqio.Vocabulary:
        return seqio.get_mixture_or_task(self.task).output_features["targets"].vocabulary


def load_run(
    model_dir: str | pathlib.Path, step: int | None = None, int8_weights: Sequence[str] = (), trust: bool = False
) -> Run:
    """A training run's checkpoint (latest, or `step`), or a quantised run written by `save_quantized`;
    `int8_weights` families ("attention", "mlp") are quantised to int8 weights on load. A config.gin
    that would import or call anything outside t5lite is refused unless `trust`."""
    model_dir = pathlib.Path(model_dir)
    gin_file = model_dir / "config.gin"
    if not gin_file.is_file():
        raise FileNotFoundError(
            f"{model_dir} has no config.gin; is it the --model_dir of a `t5lite train` run "
            f"or the --output of `t5lite quantize` or `t5lite prune`?"
        )
    import t5lite.train.loop  # noqa: F401  (the configurables config.gin binds)

    if not trust:
        config_lib.check_gin_is_t5lite(gin_file.read_text(), str(gin_file))
    config_lib.parse_gin([str(gin_file)])
    spec = RunSpec.from_gin()  # a task registered from gin registers here
    if checkpoint.is_checkpoint(model_dir):  # a quantised, pruned or converted model: one checkpoint
        about = next(
            model_dir / name
            for name in (QUANTIZATION_FILE, PRUNING_FILE, CONVERTED_FILE)
            if (model_dir / name).is_file()
        )
        saved_step = json.loads(about.read_text())["step"]
        if step not in (None, saved_step):
            raise ValueError(f"{model_dir} holds step {saved_step} only (a quantised or converted model); drop --step.")
        config, params = checkpoint.load_params(model_dir)
        step = saved_step
    else:
        config, params, step = checkpoint.restore_params(model_dir, step)
    if int8_weights:
        config, params = quantize_weights(config, params, int8_weights)
    return Run(model=build(config), params=params, step=step, spec=spec)


def calibration_batches(run: Run, num_batches: int):
    """The first `num_batches` training batches of the run's task, unshuffled."""
    stream = run.spec.data_stream("train", shuffle=False, repeat=False, seed=0)
    return [batch for batch, _ in zip(stream, range(num_batches))]


def save_quantized(
    run: Run, source_dir: str | pathlib.Path, output: str | pathlib.Path, recipe: dict, about: str = QUANTIZATION_FILE
) -> None:
    """Writes a quantised run that `load_run` reads: the model's checkpoint, the source run's
    config.gin (task, lengths) and `quantization.json` (the recipe, the source and its step).
    A pruned run (`about=PRUNING_FILE`) is written the same way."""
    output = pathlib.Path(output)
    checkpoint.save_params(output, run.model.config, run.params)
    shutil.copy(pathlib.Path(source_dir) / "config.gin", output / "config.gin")
    provenance = {**recipe, "source": str(pathlib.Path(source_dir).absolute()), "step": run.step}
    (output / about).write_text(json.dumps(provenance, indent=2))


def prompts_for(run: Run, texts: Sequence[str]) -> list[str]:
    """The texts as the run's task showed its inputs: through its instruction template, if it has one."""
    template = t5data.prompt_template(run.task)
    return list(texts) if template is None else [t5data.apply_template(template, text) for text in texts]


def generate_texts(
    run: Run,
    texts: Sequence[str],
    options: decoding.DecodingOptions,
    seed: int = 0,
    batch_size: int = 16,
    draft: Run | None = None,
    amateur: Run | None = None,
) -> list[str]:
    """Continues (decoder) or answers (encoder-decoder) each text; inputs longer than the trained
    input length are cut from the left so that the end of the text, nearest the answer, is kept
    (and a line on stderr says so). A `draft` run decodes speculatively, an `amateur` run contrastively."""
    helpers = {}
    for role, helper in (("draft", draft), ("amateur", amateur)):
        if helper is not None:
            if helper.vocabulary != run.vocabulary:
                raise ValueError(
                    f"The {role} run was trained on {helper.task} with another vocabulary than {run.task}'s; "
                    f"a {role} has to share the model's vocabulary."
                )
            helpers[role] = (helper.model, helper.params)
    outputs = []
    tokens_of = _prompt_tokens(run)
    for start in range(0, len(texts), batch_size):
        chunk = [tokens_of(start + i, text) for i, text in enumerate(texts[start : start + batch_size])]
        tokens = np.zeros((len(chunk), max(1, max(map(len, chunk)))), np.int32)
        for row, ids in enumerate(chunk):
            tokens[row, : len(ids)] = ids
        if run.kind == "encoder_decoder":
            kwargs = {"encoder_input_tokens": tokens}
        else:
            kwargs = {"prompt_tokens": tokens, "prefix_lm": run.kind == "prefix_lm"}
        result = decoding.generate(
            run.model, run.params, options=options, rng=jax.random.PRNGKey(seed + start), **kwargs, **helpers
        )
        eos = run.model.config.eos_id
        outputs += [
            run.vocabulary.decode(row[: row.index(eos)] if eos in row else row) for row in result.tokens.tolist()
        ]
    return outputs


def _prompt_tokens(run: Run):
    """(index, text) -> the ids the model is given. Inputs ended in EOS in training (the encoder's, or a
    prompted decoder's prefix); a plain decoder's prompt continues instead."""
    ends = run.kind == "encoder_decoder" or run.kind in t5data.PROMPTED_KINDS
    eos = [run.model.config.eos_id] if ends else []
    name = "inputs" if "inputs" in run.task_feature_lengths else "targets"
    keep = run.task_feature_lengths[name] - len(eos)

    def tokens(index: int, text: str) -> list[int]:
        ids = run.vocabulary.encode(text)
        if len(ids) > keep:
            print(
                f"Prompt {index + 1} is {len(ids)} tokens; the run was trained on {name} of "
                f"{run.task_feature_lengths[name]} (train.task_feature_lengths): kept its last {keep}.",
                file=sys.stderr,
            )
        return ids[-keep:] + eos

    return tokens


def validation_metrics(run: Run, num_batches: int = 20) -> dict[str, float]:
    """Loss, perplexity and token accuracy over the first `num_batches` validation batches."""
    eval_fn = jax.jit(lambda params, batch: eval_step(params, batch, config=run.model.config))
    return evaluate(run.params, run.spec, eval_fn, num_batches)


def greedy_options(run: Run) -> decoding.DecodingOptions:
    """Greedy decoding of up to the run's trained target length."""
    return decoding.DecodingOptions(max_new_tokens=run.task_feature_lengths["targets"])


def evaluate_run(
    run: Run,
    num_batches: int = 20,
    max_examples: int = 64,
    options: decoding.DecodingOptions | None = None,
    *,
    task: str | None = None,
    metrics: Sequence[str] | None = None,
    seed: int = 0,
) -> dict:
    """Validation perplexity and token accuracy on the run's own task, plus the metrics of `task`
    (default: the run's; another must share its vocabulary) on up to `max_examples` validation
    examples per task: its seqio metric functions, or those `metrics` names, on decodes (greedy, or
    samples for pass@k), and rank accuracy of a multiple-choice task's choices."""
    task = task or run.task
    check_task(run, task)
    options = options or greedy_options(run)
    results = {"step": run.step, "validation": validation_metrics(run, num_batches)}
    results["metrics"] = t5data.evaluate_predictions(
        task,
        "validation",
        lambda texts: generate_texts(run, texts, options),
        sample_fn=lambda texts, samples, temperature: sample_texts(
            run, texts, dataclasses.replace(options, temperature=temperature), samples, seed
        ),
        choices_fn=lambda questions: rank_choices(run, questions),
        metrics=metrics,
        task_feature_lengths=run.task_feature_lengths if task == run.task else None,
        max_examples=max_examples,
    )
    return results


def check_task(run: Run, task: str) -> None:
    """ValueError unless `task` is registered and shares the run's vocabulary (so its texts mean the same tokens)."""
    t5data.check_registered(task)
    if t5data.task_vocabulary(task) != t5data.task_vocabulary(run.task):
        raise ValueError(
            f"Task {task!r} has another vocabulary than {run.task!r}, the task the run was trained on; "
            f"evaluate it on a task with the same vocabulary."
        )


def sample_texts(
    run: Run, texts: Sequence[str], options: decoding.DecodingOptions, samples: int, seed: int = 0
) -> list[list[str]]:
    """`samples` outputs per text (a list each), every sample decoded with its own random keys."""
    draws = [generate_texts(run, texts, options, seed=seed + i * len(texts)) for i in range(samples)]
    return [list(outputs) for outputs in zip(*draws)]


def rank_choices(run: Run, questions: Sequence[tuple[str, Sequence[str], int]]) -> dict[str, float]:
    """Rank accuracy of (context, choices, label) questions, tokenized as the run was trained: contexts and
    choices end in EOS for a run trained on inputs and targets, not for a language model of running text."""
    prompted = run.kind == "encoder_decoder" or run.kind in t5data.PROMPTED_KINDS
    return scoring.evaluate_choices(
        run.model, run.params, questions, run.vocabulary.encode, prefix_lm=run.kind == "prefix_lm", add_eos=prompted
    )
