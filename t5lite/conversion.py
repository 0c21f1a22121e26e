"""Hugging Face models in and out as t5lite runs (`t5lite convert`).

In: a `save_pretrained` directory becomes a run directory that `t5lite generate`, `t5lite eval`
and `train.init_from` take: the weights (t5lite_config.json + params/), the model's own
tokenizer (vocabulary/: its SentencePiece model, or its tokenizer.json), `converted.json` (where
it came from) and a config.gin whose task is the embedded corpus in that tokenizer's ids and
whose optimizer suits fine-tuning. The model's start, EOS and padding ids come from its config.
Out: a training run's latest (or given) checkpoint, LoRA merged, with its tokenizer, as a
`save_pretrained` directory that transformers loads offline.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil

import gin
import seqio

from t5lite import config as config_lib
from t5lite import data as t5data
from t5lite import inference
from t5lite.config import ModelConfig
from t5lite.data.span_corruption import noise_counts, raw_length
from t5lite.interop import hf
from t5lite.models import build
from t5lite.models.lora import merge_lora
from t5lite.train import checkpoint
from t5lite.train.spec import RunSpec

VOCABULARY_DIR = "vocabulary"
SENTENCEPIECE_FILES = ("spiece.model", "tokenizer.model")  # T5's name, Llama's
TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json")
FINETUNE_BINDINGS = [  # a converted run's training settings: AdamW at a constant fine-tuning rate
    "train.batch_size = 8",
    "train.num_steps = 1000",
    "train.learning_rate = @learning_rate_schedule()",
    "learning_rate_schedule.name = 'constant'",
    "learning_rate_schedule.base_learning_rate = 1e-4",
    "train.optimizer = @optimizer",
    "optimizer.name = 'adamw'",
]


def import_run(hf_dir: str | pathlib.Path, run_dir: str | pathlib.Path, dtype: str = "bfloat16") -> ModelConfig:
    """Writes the run directory of a `save_pretrained` model. The model and its tokenizer are checked before
    anything is written; should writing the run fail after its weights, they are removed again."""
    hf_dir, run_dir = pathlib.Path(hf_dir), pathlib.Path(run_dir).absolute()
    model, params = hf.load_pretrained(hf_dir, dtype=dtype)
    config = model.config
    files, vocabulary_file, extra_ids = _tokenizer_files(hf_dir)
    vocabulary = t5data.get_vocabulary(str(hf_dir / vocabulary_file), extra_ids)
    _check_vocabulary(vocabulary, config, hf_dir)
    objective, lengths = _objective_and_lengths(config, vocabulary.extra_ids)
    task = re.sub(r"\W", "_", run_dir.name) + f"_corpus_{objective}"
    scope = "converted/t5lite.data"
    bindings = (
        ["import t5lite.data", "import t5lite.train.optimizers"]
        + config_lib.gin_bindings(config)
        + [
            "train.model_config = @ModelConfig()",
            f"train.mixture_or_task_name = @{scope}.register_corpus_task()",
            f"{scope}.register_corpus_task.name = {task!r}",
            f"{scope}.register_corpus_task.objective = {objective!r}",
            f"{scope}.register_corpus_task.vocabulary = @{scope}.get_vocabulary()",
            f"{scope}.get_vocabulary.spec = {str(run_dir / VOCABULARY_DIR / vocabulary_file)!r}",
            f"{scope}.get_vocabulary.extra_ids = {extra_ids}",
            f"train.task_feature_lengths = {lengths!r}",
            *FINETUNE_BINDINGS,
        ]
    )
    checkpoint.save_params(run_dir, config, params)
    try:
        (run_dir / VOCABULARY_DIR).mkdir()
        for file in files:
            shutil.copy(file, run_dir / VOCABULARY_DIR / file.name)
        config_lib.parse_gin([], bindings)
        RunSpec.from_gin()  # registers the task: the run opens as written
        (run_dir / "config.gin").write_text(gin.config_str())
    except BaseException:
        shutil.rmtree(run_dir)  # it was new or empty
        raise
    converted = {"source": str(hf_dir.absolute()), "step": 0}
    (run_dir / inference.CONVERTED_FILE).write_text(json.dumps(converted, indent=2))
    return config


def _tokenizer_files(directory: pathlib.Path) -> tuple[list[pathlib.Path], str, int]:
    """(files to copy, the file the vocabulary reads, its extra ids): a SentencePiece model where the
    directory has one (exact, and fast in tf.data), else tokenizer.json."""
    settings_file = directory / "tokenizer_config.json"
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    for name in SENTENCEPIECE_FILES:
        if (directory / name).is_file():
            return [directory / name], name, int(settings.get("extra_ids", 0))
    if (directory / "tokenizer.json").is_file():
        return [directory / name for name in TOKENIZER_JSON_FILES if (directory / name).is_file()], "tokenizer.json", 0
    raise FileNotFoundError(
        f"{directory} holds no tokenizer ({', '.join(SENTENCEPIECE_FILES)} or tokenizer.json); save the "
        f"model's tokenizer into it too (tokenizer.save_pretrained({str(directory)!r}))."
    )


def _check_vocabulary(vocabulary: seqio.Vocabulary, config: ModelConfig, source: pathlib.Path) -> None:
    t5data.check_vocabulary_fits(vocabulary, config.vocab_size)
    if vocabulary.eos_id != config.eos_id:
        raise ValueError(
            f"{source}: the tokenizer's EOS is id {vocabulary.eos_id} but the model config's eos_token_id is "
            f"{config.eos_id}; the model and its tokenizer must agree."
        )


def _objective_and_lengths(config: ModelConfig, extra_ids: int) -> tuple[str, dict[str, int]]:
    """T5's span corruption of 512 input tokens (fewer where the tokenizer has too few sentinels for
    its spans; a prefix LM where it has none); a decoder's causal LM over its context, up to 1024."""
    if not config.is_encoder_decoder:
        return "lm", {"targets": min(config.max_length, 1024)}
    if not extra_ids:
        return "prefix_lm", {"inputs": 512, "targets": 128}
    inputs = 512
    while inputs > 32 and noise_counts(raw_length(inputs))[1] > extra_ids:
        inputs //= 2
    return "span_corruption", {"inputs": inputs, "targets": t5data.targets_length_for(inputs)}


def export_run(
    run_dir: str | pathlib.Path, hf_dir: str | pathlib.Path, step: int | None = None, trust: bool = False
) -> str:
    """Writes a run's checkpoint (LoRA merged) and its tokenizer as a `save_pretrained` directory;
    returns a line on the tokenizer. Quantised models and other adapters are refused before writing."""
    run_dir, hf_dir = pathlib.Path(run_dir), pathlib.Path(hf_dir)
    if (run_dir / inference.QUANTIZATION_FILE).is_file():
        source = json.loads((run_dir / inference.QUANTIZATION_FILE).read_text()).get("source", "the float run")
        raise ValueError(
            f"{run_dir} is a quantised model; Hugging Face T5 and Llama hold float weights. Convert the run it "
            f"was quantised from ({source})."
        )
    if not (run_dir / "config.gin").is_file():  # a bare checkpoint: weights alone
        config, params = checkpoint.load_params(run_dir)
        vocabulary = None
    else:
        run = inference.load_run(run_dir, step, trust=trust)
        config, params, vocabulary = run.model.config, run.params, run.vocabulary
    if config.adapters.lora_rank and not config.weight_quant.families:
        config, params = merge_lora(config, params)
    hf.hf_config_from(config)  # refuses what Hugging Face cannot hold, before anything is written
    hf.save_pretrained(build(config), params, hf_dir)
    return _save_tokenizer(vocabulary, config, hf_dir)


def _save_tokenizer(vocabulary: seqio.Vocabulary | None, config: ModelConfig, directory: pathlib.Path) -> str:
    if isinstance(vocabulary, t5data.TokenizerJsonVocabulary):
        for name in TOKENIZER_JSON_FILES:
            if (vocabulary.path.parent / name).is_file():
                shutil.copy(vocabulary.path.parent / name, directory / name)
        return "with its tokenizer (tokenizer.json)"
    if not isinstance(vocabulary, seqio.SentencePieceVocabulary):
        return f"without a tokenizer: transformers has none for {vocabulary or 'a bare checkpoint'}"
    import transformers

    name, settings = (
        ("spiece.model", {"tokenizer_class": "T5Tokenizer", "extra_ids": vocabulary.extra_ids})
        if config.is_encoder_decoder
        else ("tokenizer.model", {"tokenizer_class": "LlamaTokenizer"})
    )
    shutil.copy(vocabulary.sentencepiece_model_file, directory / name)
    (directory / "tokenizer_config.json").write_text(json.dumps(settings))
    transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True).save_pretrained(directory)
    return f"with its tokenizer ({name}, tokenizer.json)"
