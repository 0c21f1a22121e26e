"""Data: the embedded corpus, vocabularies, objectives, seqio tasks and the training input stream.

Importing this package registers the built-in seqio tasks (see `tasks.py` for their names).
"""

from t5lite.data.cache import ENV_VAR as CACHE_ENV_VAR
from t5lite.data.corpus import corpus_path
from t5lite.data.evaluation import (
    RANK_ACCURACY,
    check_metric_names,
    evaluate_predictions,
    metric_names,
    task_vocabulary,
)
from t5lite.data.hf_tokenizer import TokenizerJsonVocabulary
from t5lite.data.instructions import apply_template, prompt_template, register_instruction_task
from t5lite.data.metrics import exact_match
from t5lite.data.objectives import OBJECTIVES
from t5lite.data.pipeline import MODEL_KINDS, PROMPTED_KINDS, DataStream, model_lengths
from t5lite.data.preferences import register_preference_task
from t5lite.data.span_corruption import targets_length_for
from t5lite.data.tasks import (
    check_registered,
    register_corpus_task,
    register_mixture,
    register_text_file_task,
    register_tfds_task,
    registered_names,
)
from t5lite.data.vocab import (
    DEFAULT_EXTRA_IDS,
    DEFAULT_VOCAB_SIZE,
    build_vocabulary,
    check_vocabulary_fits,
    default_vocabulary,
    get_vocabulary,
    vocabulary_size_for_model,
)
from t5lite.data.vocab_cli import add_vocab_arguments, vocab_command

__all__ = [
    "CACHE_ENV_VAR",
    "DEFAULT_EXTRA_IDS",
    "DEFAULT_VOCAB_SIZE",
    "MODEL_KINDS",
    "OBJECTIVES",
    "RANK_ACCURACY",
    "PROMPTED_KINDS",
    "TokenizerJsonVocabulary",
    "DataStream",
    "add_vocab_arguments",
    "apply_template",
    "build_vocabulary",
    "check_metric_names",
    "check_registered",
    "check_vocabulary_fits",
    "corpus_path",
    "default_vocabulary",
    "evaluate_predictions",
    "exact_match",
    "get_vocabulary",
    "metric_names",
    "model_lengths",
    "prompt_template",
    "register_corpus_task",
    "register_instruction_task",
    "register_preference_task",
    "register_mixture",
    "register_text_file_task",
    "register_tfds_task",
    "registered_names",
    "targets_length_for",
    "task_vocabulary",
    "vocab_command",
    "vocabulary_size_for_model",
]
