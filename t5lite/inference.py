"""Using a trained run: restore it from its model dir, generate text, and evaluate it.

A run is self-describing: `<model_dir>/config.gin` names its task (and so its vocabulary)
and feature lengths, and `t5lite_config.json` its model, so `t5lite eval` and
`t5lite generate` need only `--model_dir`.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Sequence

import gin
import jax
import numpy as np
import seqio

from t5lite import config as config_lib
from t5lite import data as t5data
from t5lite import decoding
from t5lite.models import build
from t5lite.quantization import quantize_weights
from t5lite.train import loop
from t5lite.train.step import eval_step


@dataclasses.dataclass
class Run:
    """A trained model with what it was trained on."""

    model: object
    params: object
    step: int
    task: str
    kind: str
    task_feature_lengths: dict[str, int]
    batch_size: int

    @property
    def vocabulary(self) -> seqio.Vocabulary:
        return seqio.get_mixture_or_task(self.task).output_features["targets"].vocabulary


def load_run(model_dir: str | pathlib.Path, step: int | None = None, int8_weights: Sequence[str] = ()) -> Run:
    """The run's checkpoint (latest, or `step`); `int8_weights` families ("attention", "mlp") are
    quantised to int8 weights on load (`t5lite.quantization.quantize_weights`)."""
    model_dir = pathlib.Path(model_dir)
    gin_file = model_dir / "config.gin"
    if not gin_file.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.gin; is it the --model_dir of a `t5lite train` run?")
    import t5lite.train.loop  # noqa: F401  (the configurables config.gin binds)

    config_lib.parse_gin([str(gin_file)])
    config, params, step = loop.restore_params(model_dir, step)
    if int8_weights:
        config, params = quantize_weights(config, params, int8_weights)
    query = lambda name, default=None: _query(f"train.{name}", default)
    kind = query("model_kind") or ("encoder_decoder" if config.is_encoder_decoder else "decoder")
    return Run(model=build(config), params=params, step=step, task=query("mixture_or_task_name"), kind=kind,
               task_feature_lengths=dict(query("task_feature_lengths")), batch_size=query("batch_size"))


def _query(name: str, default=None):
    try:
        return gin.query_parameter(name)
    except ValueError:
        return default


def generate_texts(run: Run, texts: Sequence[str], options: decoding.DecodingOptions, seed: int = 0,
                   batch_size: int = 16) -> list[str]:
    """Continues (decoder) or answers (encoder-decoder) each text; inputs longer than the trained
    input length are cut from the left so that the end of the text, nearest the answer, is kept."""
    vocabulary = run.vocabulary
    encoder_decoder = run.kind == "encoder_decoder"
    limit = run.task_feature_lengths["inputs" if "inputs" in run.task_feature_lengths else "targets"]
    outputs = []
    for start in range(0, len(texts), batch_size):
        # The encoder saw inputs ending in EOS during training; a decoder's prompt continues instead.
        chunk = [vocabulary.encode(text)[-(limit - 1):] + [1] if encoder_decoder else vocabulary.encode(text)[-limit:]
                 for text in texts[start:start + batch_size]]
        tokens = np.zeros((len(chunk), max(1, max(map(len, chunk)))), np.int32)
        for row, ids in enumerate(chunk):
            tokens[row, :len(ids)] = ids
        if encoder_decoder:
            kwargs = {"encoder_input_tokens": tokens}
        else:
            kwargs = {"prompt_tokens": tokens, "prefix_lm": run.kind == "prefix_lm"}
        result = decoding.generate(run.model, run.params, options=options, rng=jax.random.PRNGKey(seed + start),
                                   **kwargs)
        outputs += [vocabulary.decode(_until_eos(row)) for row in np.asarray(result.tokens).tolist()]
    return outputs


def _until_eos(ids: list[int]) -> list[int]:
    return ids[:ids.index(1)] if 1 in ids else ids


def evaluate_run(run: Run, num_batches: int = 20, max_examples: int = 64,
                 options: decoding.DecodingOptions | None = None) -> dict:
    """Validation perplexity and token accuracy, plus the task's seqio metrics (exact match, ...)
    on greedy decodes of up to `max_examples` validation examples per task."""
    eval_fn = jax.jit(lambda params, batch: eval_step(params, batch, config=run.model.config))
    results = {"step": run.step, "validation": loop.evaluate(run.params, run.model.config, run.task, run.kind,
                                                             run.task_feature_lengths, run.batch_size, num_batches,
                                                             True, eval_fn)}
    options = options or decoding.DecodingOptions(max_new_tokens=run.task_feature_lengths["targets"])
    if run.kind == "encoder_decoder":
        results["metrics"] = t5data.evaluate_predictions(
            run.task, "validation", lambda texts: generate_texts(run, texts, options),
            task_feature_lengths=run.task_feature_lengths, max_examples=max_examples)
    return results
