"""Model checkpoints on disk: the config as JSON beside the parameters in Orbax format.

A t5lite checkpoint directory holds `t5lite_config.json` and `params/` (an Orbax
StandardCheckpointer tree). Conversion from Hugging Face and fine-tuning start from one.
Training runs keep full train states (and the data position) with `TrainCheckpoints`.
What parameter-efficient fine-tuning trains (LoRA adapters, BitFit biases, a soft prompt) can be
saved alone (`adapters/` instead of `params/`): megabytes, not the base.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from t5lite.config import ModelConfig
from t5lite.models import abstract_params
from t5lite.models.params import added_params, added_pattern
from t5lite.train import migration

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
        raise ValueError("These parameters hold no adapters: set AdapterConfig.lora_rank, bitfit or prompt_length.")
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
    wrong = [
        p
        for p, leaf in abstract.items()
        if not re.search(added_pattern(config), p) and (p not in base or base[p].shape != leaf.shape)
    ]
    if wrong:
        raise ValueError(
            f"The base parameters do not fit the adapters' model ({', '.join(wrong[:4])}); load the "
            f"base model the adapters were trained on."
        )
    with ocp.StandardCheckpointer() as checkpointer:
        saved = checkpointer.restore(
            directory / ADAPTERS_DIR, traverse_util.unflatten_dict(added_params(config, abstract), sep="/")
        )
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


class DataStreamHandler(ocp.CheckpointHandler):
    """Orbax's side of a training input stream: each process writes its own stream's state into the
    step being saved (so the data position is as atomic as the step), named by process and data
    shard; a process restores the state of the shard it reads, its own file first (processes of a
    tensor group spanning hosts read one shard)."""

    def save(self, directory, args: DataStreamSave) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        args.stream.save(str(directory / _stream_file(args.stream, jax.process_index())))

    def restore(self, directory, args: DataStreamRestore):
        args.stream.restore(str(saved_stream(directory, args.stream)), args.position)
        return args.stream


@ocp.args.register_with_handler(DataStreamHandler, for_save=True)
@dataclasses.dataclass
class DataStreamSave(ocp.args.CheckpointArgs):
    stream: Any  # a t5lite.data.DataStream


@ocp.args.register_with_handler(DataStreamHandler, for_restore=True)
@dataclasses.dataclass
class DataStreamRestore(ocp.args.CheckpointArgs):
    stream: Any
    position: int


def _stream_file(stream, process: int) -> str:
    index, count = stream.shard
    return f"process_{process}.shard_{index}_of_{count}"


def saved_stream(directory, stream):
    """The saved state of `stream`'s data shard in a step's stream item (this process's own first),
    or None."""
    own = directory / _stream_file(stream, jax.process_index())
    if (directory / f"{own.name}.index").exists():
        return own
    index, count = stream.shard
    found = sorted(directory.glob(f"*.shard_{index}_of_{count}.index"))
    return found[0].with_suffix("") if found else None


class TrainCheckpoints:
    """Orbax checkpoints of a training run under `<model_dir>/checkpoints/<step>/`: the train state
    (saved asynchronously), the position of the data stream and every process's stream state;
    a save is visible only once complete, so a run killed mid-save resumes from the previous one."""

    def __init__(self, model_dir: str | pathlib.Path, save_every: int, keep: int | None):
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every, max_to_keep=keep, create=True, enable_async_checkpointing=True
        )
        self.manager = ocp.CheckpointManager(pathlib.Path(model_dir).absolute() / "checkpoints", options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, stream, force: bool = False) -> bool:
        """Saves `state`, its checksums and where `stream` (a t5lite.data.DataStream) stands."""
        data = {
            "position": int(stream.position),
            "rows": int(stream.rows_read),
            "skipped_rows": int(stream.rows_skipped),
            "stream": stream.description,
            "checksums": checksums(state),
        }
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data), stream=DataStreamSave(stream)
            ),
            force=force,
        )

    def restore(self, abstract_state, step: int | None = None):
        """The train state at `step`, or at the latest complete step, checked against the checksums
        saved with it (CorruptCheckpoint where it cannot be read or reads back otherwise). Adafactor
        statistics that `optax.adafactor` saved (runs from before t5lite's own Adafactor) are carried over."""
        step = self._complete(step)
        with self._reading(step):
            migrated = migration.restore_optax_adafactor(self.manager, step, abstract_state)
            if migrated is not None:
                return migrated
            restore = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            state = self.manager.restore(step, args=restore)["state"]
            self._verify(step, state)
        return state

    def restore_newest_intact(self, abstract_state):
        """(step, state) of the newest checkpoint that reads back as saved. A corrupt newer one is moved
        aside to `<step>.corrupt` (kept, never deleted), with a message; none intact is an error."""
        corrupt = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                return step, self.restore(abstract_state, step)
            except CorruptCheckpoint as error:
                aside = self.manager.directory / f"{step}.corrupt"
                (self.manager.directory / str(step)).rename(aside)
                self.manager.reload()
                corrupt.append(str(aside))
                print(f"{error} Moved it to {aside}; trying the checkpoint before it.", flush=True)
        raise ValueError(
            f"No checkpoint of {self.manager.directory.parent} reads back as saved (moved aside: "
            f"{', '.join(corrupt)}); restore a copy of them, or start a new run."
        )

    @contextlib.contextmanager
    def _reading(self, step: int):
        """Errors reading a step (a truncated file, a missing item, a metadata file whose bytes changed)
        as one CorruptCheckpoint line; a state of another optimizer or model as the ValueError that says so."""
        try:
            yield
        except CorruptCheckpoint:
            raise
        except Exception as error:  # noqa: BLE001 (Orbax and TensorStore raise many kinds)
            if isinstance(error, ValueError) and re.search(
                "tree structures do not match|Structure mismatch", str(error)
            ):
                raise ValueError(
                    f"Checkpoint {step} in {self.manager.directory} holds the state of another optimizer "
                    f"or model than this run's. Resume with the config the run started with (its "
                    f"config.gin), or start a new run from its parameters with train.init_from."
                ) from None
            # Other ValueErrors are the caller's, but undecodable metadata (also ValueErrors) is the file's.
            if isinstance(error, ValueError) and not isinstance(error, (UnicodeDecodeError, json.JSONDecodeError)):
                raise
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            message = f"{type(error).__name__}: {first_line}"
            raise CorruptCheckpoint(
                f"Checkpoint {step} in {self.manager.directory} cannot be read ({message[:300]})."
            ) from None

    def _verify(self, step: int, state, parts=("params", "opt_state")) -> None:
        if not (self.manager.directory / str(step) / "data").is_dir():
            return  # a state alone
        saved = self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
        if "checksums" not in saved:
            return  # saved by an earlier t5lite
        read = checksums(state, parts)
        changed = [part for part in parts if saved["checksums"][part] != read[part]]
        if changed:
            raise CorruptCheckpoint(
                f"Checkpoint {step} in {self.manager.directory} reads back otherwise than it was saved (checksum "
                f"of {' and '.join(changed)}: {[saved['checksums'][p] for p in changed]} saved, "
                f"{[read[p] for p in changed]} read)."
            )

    def restore_stream(self, stream, step: int, rebatch: bool = False) -> None:
        """Moves a fresh `stream` to where the run's stream stood at `step`: its saved state, read in
        constant time. Where the step holds only a position (checkpoints written before runs saved
        their input state) or the run now has another number of processes (the same global batch
        split another way), the pipeline is replayed instead; with `rebatch`, also where the batch
        size changed (after the rows the run had read). A stream that differs otherwise from the
        saved one (task, lengths, seed, ...) is refused."""
        data = self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
        saved, now = data.get("stream", stream.description), stream.description
        changed = {key: (saved.get(key), value) for key, value in now.items() if saved.get(key) != value}
        resharded = (
            set(changed) == {"rows_per_process", "processes"}
            and saved["rows_per_process"] * saved["processes"] == now["rows_per_process"] * now["processes"]
        )
        if rebatch and set(changed) == {"rows_per_process"}:
            rows = data.get("rows", data["position"] * saved["rows_per_process"])
            print(
                f"The batch changed from {saved['rows_per_process']} to {now['rows_per_process']} rows a process: "
                f"continuing after the {rows} rows the run had read (replayed).",
                flush=True,
            )
            stream.skip_rows(rows)
            return
        if changed and not resharded:
            details = "; ".join(f"{key}: {was!r} there, {here!r} here" for key, (was, here) in changed.items())
            raise ValueError(
                f"This run's data differs from the data of the run it resumes ({details}), so it cannot "
                f"continue where that stopped (only its batch size may change, with --allow_config_change). "
                f"Resume with the run's settings (its config.gin), or start a new run from its parameters "
                f"with train.init_from."
            )
        if data.get("skipped_rows") and not resharded:
            stream.skip_rows(data["skipped_rows"])  # as the saved stream was built, so that its state fits
        if not resharded and saved_stream(self.manager.directory / str(step) / "stream", stream) is not None:
            self.manager.restore(step, args=ocp.args.Composite(stream=DataStreamRestore(stream, data["position"])))
            return
        why = "split over other processes" if resharded else "saved without its input state (by an earlier t5lite)"
        print(
            f"Checkpoint {step} was {why}: continuing the data from batch {data['position']} of this pipeline "
            f"(replayed; its order may differ from what the run saw).",
            flush=True,
        )
        stream.skip(data["position"])

    def _complete(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step not in self.all_steps():
            raise FileNotFoundError(f"No complete checkpoint for step {step}; available: {self.all_steps()}.")
        return step

    def restore_params(self, step: int | None = None):
        """(params, step) alone (no optimizer state is kept), for evaluation and generation: where the
        devices the run was sharded over are not all here, on this process's first device. Checked
        against the saved checksum, and refused where not finite (nothing to evaluate)."""
        step = self._complete(step)
        here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        with self._reading(step):
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(fallback_sharding=here))
            )
            self._verify(step, restored["state"], parts=("params",))
        params = restored["state"]["params"]
        if not all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params)):
            raise ValueError(
                f"Checkpoint {step} in {self.manager.directory} holds non-finite parameters; evaluate an earlier "
                f"step (--step, one of {self.all_steps()})."
            )
        return params, step

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class CorruptCheckpoint(ValueError):
    """A checkpoint that cannot be read, or reads back otherwise than it was saved."""


def checksums(state, parts=("params", "opt_state")) -> dict[str, int]:
    """Of each part of a train state: the sum of its arrays' bits as unsigned integers (mod 2^32),
    computed where the arrays live. Integer sums do not depend on how the arrays are sharded or
    summed, so the same state gives the same number when read back; almost any corruption does not."""
    tree = {part: state[part] if isinstance(state, dict) else getattr(state, part) for part in parts}
    return {part: int(value) for part, value in jax.device_get(_checksums(tree)).items()}


@jax.jit
def _checksums(tree):
    def bits(x):
        if x.dtype == jnp.bool_:  # masks (gradual pruning): bitcast does not take bool
            x = x.astype(jnp.uint8)
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
        return jnp.sum(jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32), dtype=jnp.uint32)

    return {part: sum((bits(x) for x in jax.tree.leaves(arrays)), jnp.uint32(0)) for part, arrays in tree.items()}


def frozen_params(path: str | pathlib.Path):
    """The parameters at `path` of a frozen model a step runs (a teacher, a reward model) as host
    arrays: every process places its shards."""
    return jax.tree.map(np.asarray, load_pretrained(path)[1])


def load_pretrained(path: str | pathlib.Path):
    """(config, params) of a t5lite checkpoint (`save_params`, `t5lite convert`) or of a training run's
    latest checkpoint."""
    if is_checkpoint(path):
        return load_params(path)
    config, params, _ = restore_params(path)
    return config, params


def pretrained_config(path: str | pathlib.Path) -> ModelConfig:
    """The model of a t5lite checkpoint or of a training run, without loading its parameters."""
    config_file = pathlib.Path(path) / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is neither a t5lite checkpoint nor a training run: it has no {CONFIG_FILE}.")
    return ModelConfig.from_json(config_file.read_text())


def restore_params(model_dir: str | pathlib.Path, step: int | None = None):
    """(config, params, step) from a training run's latest (or given) checkpoint, for eval and generation."""
    model_dir = pathlib.Path(model_dir).absolute()
    config_file = model_dir / CONFIG_FILE
    if not config_file.is_file() or not (model_dir / "checkpoints").is_dir():
        raise FileNotFoundError(
            f"{model_dir} holds no training run (no {CONFIG_FILE} and checkpoints/); "
            f"train one with `t5lite train --model_dir={model_dir} ...` first."
        )
    config = ModelConfig.from_json(config_file.read_text())
    checkpoints = TrainCheckpoints(model_dir, 1, None)
    try:
        params, step = checkpoints.restore_params(step)
    finally:
        checkpoints.close()
    return config, params, step
