"""Model checkpoints on disk: the config as JSON beside the parameters in Orbax format.

A t5lite checkpoint directory holds `t5lite_config.json` and `params/` (an Orbax
StandardCheckpointer tree). Conversion from Hugging Face and fine-tuning start from one.
Training runs keep full train states (and the data position) with `TrainCheckpoints`.
"""

from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp

from t5lite.config import ModelConfig
from t5lite.models import abstract_params

CONFIG_FILE = "t5lite_config.json"
PARAMS_DIR = "params"


def is_checkpoint(directory: str | pathlib.Path) -> bool:
    directory = pathlib.Path(directory)
    return (directory / CONFIG_FILE).is_file() and (directory / PARAMS_DIR).is_dir()


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
