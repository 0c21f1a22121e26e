"""Model checkpoints on disk: the config as JSON beside the parameters in Orbax format.

A t5lite checkpoint directory holds `t5lite_config.json` and `params/` (an Orbax
StandardCheckpointer tree). Conversion from Hugging Face and fine-tuning start from one.
"""

from __future__ import annotations

import pathlib

import orbax.checkpoint as ocp

from t5lite.config import ModelConfig
from t5lite.models import abstract_params

CONFIG_FILE = "t5lite_config.json"
PARAMS_DIR = "params"


def is_checkpoint(directory: str | pathlib.Path) -> bool:
    return (pathlib.Path(directory) / CONFIG_FILE).is_file()


def save_params(directory: str | pathlib.Path, config: ModelConfig, params) -> pathlib.Path:
    """Writes a new checkpoint; refuses a non-empty directory rather than overwrite anything."""
    directory = pathlib.Path(directory).absolute()
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} is not empty; choose a new directory for the checkpoint.")
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / PARAMS_DIR, params)
    (directory / CONFIG_FILE).write_text(config.to_json())
    return directory


def load_params(directory: str | pathlib.Path):
    """(config, params) of a checkpoint written by `save_params`."""
    directory = pathlib.Path(directory).absolute()
    if not is_checkpoint(directory):
        raise FileNotFoundError(f"{directory} is not a t5lite checkpoint: it has no {CONFIG_FILE}.")
    config = ModelConfig.from_json((directory / CONFIG_FILE).read_text())
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(directory / PARAMS_DIR, abstract_params(config))
    return config, params
