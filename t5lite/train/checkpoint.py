"""Model checkpoints on disk: the config as JSON beside the parameters in Orbax format.

A t5lite checkpoint directory holds `t5lite_config.json` and `params/` (an Orbax
StandardCheckpointer tree). Conversion from Hugging Face and fine-tuning start from one.
Training runs keep full train states (and the data position) with `TrainCheckpoints`.
What parameter-efficient fine-tuning trains (LoRA adapters, BitFit biases, a soft prompt) can be
saved alone (`adapters/` instead of `params/`): megabytes, not the base.
"""

from __future__ import annotations

import pathlib
import re

import jax
import orbax.checkpoint as ocp

from t5lite.config import ModelConfig
from flax import traverse_util

from t5lite.models import abstract_params
from t5lite.models.params import added_params, added_pattern

CONFIG_FILE = "t5lite_config.json"
PARAMS_DIR = "params"
ADAPTERS_DIR = "adapters"


def is_checkpoint(directory: str | pathlib.Path) -> bool:
    directory = pathlib.Path(directory)
    return (directory / CONFIG_FILE).is_file() and (directory / PARAMS_DIR).is_dir()


def save_params(directory: str | pathlib.Path, config: ModelConfig, params, subdir: str = PARAMS_DIR) -> pathlib.Path:
    """Writes a new checkpoint; refuses a non-empty directory rather than overwrite anything."""
    directory = pathlib.Path(directory).absolute()
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} is not empty; choose a new directory for the checkpoint.")
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / subdir, params)
    (directory / CONFIG_FILE).write_text(config.to_json())
    return directory


def save_adapters(directory: str | pathlib.Path, config: ModelConfig, params) -> pathlib.Path:
    """Writes what LoRA, BitFit or prompt tuning added to a model alone (with the model's config)."""
    found = added_params(config, params)
    if not found:
        raise ValueError("These parameters hold no adapters: set ModelConfig.lora_rank, bitfit or prompt_length.")
    return save_params(directory, config, traverse_util.unflatten_dict(found, sep="/"), subdir=ADAPTERS_DIR)


def load_adapters(directory: str | pathlib.Path, base_params):
    """(config, params): `base_params` (the model the adapters were trained on) with the adapters saved
    in `directory` by `save_adapters`."""
    directory = pathlib.Path(directory).absolute()
    if not (directory / CONFIG_FILE).is_file() or not (directory / ADAPTERS_DIR).is_dir():
        raise FileNotFoundError(f"{directory} holds no saved adapters ({CONFIG_FILE} and {ADAPTERS_DIR}/).")
    config = ModelConfig.from_json((directory / CONFIG_FILE).read_text())
    abstract = traverse_util.flatten_dict(abstract_params(config), sep="/")
    base = traverse_util.flatten_dict(base_params, sep="/")
    wrong = [p for p, leaf in abstract.items() if not re.search(added_pattern(config), p)
             and (p not in base or base[p].shape != leaf.shape)]
    if wrong:
        raise ValueError(f"The base parameters do not fit the adapters' model ({', '.join(wrong[:4])}); load the "
                         f"base model the adapters were trained on.")
    with ocp.StandardCheckpointer() as checkpointer:
        saved = checkpointer.restore(directory / ADAPTERS_DIR, traverse_util.unflatten_dict(added_params(config, abstract), sep="/"))
    base.update(traverse_util.flatten_dict(saved, sep="/"))
    return config, traverse_util.unflatten_dict(base, sep="/")


def load_params(directory: str | pathlib.Path):
    """(config, params) of a checkpoint written by `save_params`."""
    directory = pathlib.Path(directory).absolute()
    if not is_checkpoint(directory):
        raise FileNotFoundError(f"{directory} is not a t5lite checkpoint: it has no {CONFIG_FILE}.")
    config = ModelConfig.from_json((directory / CONFIG_FILE).read_text())
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(directory / PARAMS_DIR, abstract_params(config))
    return config, params


class TrainCheckpoints:
    """Orbax checkpoints of a training run under `<model_dir>/checkpoints/<step>/`: the train state
    and the position of the data stream, saved asynchronously; a save is visible only once complete,
    so a run killed mid-save resumes from the previous one."""

    def __init__(self, model_dir: str | pathlib.Path, save_every: int, keep: int | None):
        options = ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=keep, create=True,
                                               enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(pathlib.Path(model_dir).absolute() / "checkpoints", options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_position: int, force: bool = False) -> bool:
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({"position": int(data_position)})),
            force=force)

    def restore(self, abstract_state, step: int | None = None):
        """(state, data position) at `step`, or at the latest complete step."""
        step = self.latest_step() if step is None else step
        if step not in self.all_steps():
            raise FileNotFoundError(f"No complete checkpoint for step {step}; available: {self.all_steps()}.")
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return restored["state"], restored["data"]["position"]

    def restore_params(self, step: int | None = None):
        """(params, step) alone (no optimizer state is kept), for evaluation and generation: where the
        devices the run was sharded over are not all here, on this process's first device."""
        step = self.latest_step() if step is None else step
        if step not in self.all_steps():
            raise FileNotFoundError(f"No complete checkpoint for step {step}; available: {self.all_steps()}.")
        here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(fallback_sharding=here)))
        return restored["state"]["params"], step

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def load_pretrained(path: str | pathlib.Path):
    """(config, params) of a t5lite checkpoint (`save_params`, `t5lite convert`) or of a training run's
    latest checkpoint."""
    if is_checkpoint(path):
        return load_params(path)
    config, params, _ = restore_params(path)
    return config, params


def restore_params(model_dir: str | pathlib.Path, step: int | None = None):
    """(config, params, step) from a training run's latest (or given) checkpoint, for eval and generation."""
    model_dir = pathlib.Path(model_dir).absolute()
    config_file = model_dir / CONFIG_FILE
    if not config_file.is_file() or not (model_dir / "checkpoints").is_dir():
        raise FileNotFoundError(f"{model_dir} holds no training run (no {CONFIG_FILE} and checkpoints/); "
                                f"train one with `t5lite train --model_dir={model_dir} ...` first.")
    config = ModelConfig.from_json(config_file.read_text())
    checkpoints = TrainCheckpoints(model_dir, 1, None)
    try:
        params, step = checkpoints.restore_params(step)
    finally:
        checkpoints.close()
    return config, params, step
