"""Training checkpoints that are verified when read: corrupt ones are named and skipped, never used."""

import pathlib
import shutil

import jax
import numpy as np
import pytest

from t5lite.config import ModelConfig
from t5lite.models import param_axes
from t5lite.train import optimizers
from t5lite.train.checkpoint import CorruptCheckpoint, TrainCheckpoints, checksums
from t5lite.train.step import init_state

CONFIG = ModelConfig(
    vocab_size=32, d_model=32, num_heads=2, head_dim=16, d_ff=64, num_encoder_layers=1, num_decoder_layers=1,
    dtype="float32",
)  # fmt: skip


class Stream:
    """What a checkpoint needs of a t5lite.data.DataStream."""

    position, rows_read, rows_skipped, description, shard = 0, 0, 0, {}, (0, 1)

    def save(self, prefix):
        pathlib.Path(prefix + ".index").write_text("")


def states():
    tx = optimizers.optimizer("adamw", 1e-3)
    state = init_state(CONFIG, tx, jax.random.PRNGKey(0))
    later = state.replace(step=state.step + 1, params=jax.tree.map(lambda x: x + 1, state.params))
    return state, later


def saved(directory, by_step):
    checkpoints = TrainCheckpoints(directory, save_every=1, keep=None)
    for step, state in by_step.items():
        checkpoints.save(step, state, Stream(), force=True)
    checkpoints.close()
    return TrainCheckpoints(directory, save_every=1, keep=None)


def flip_bytes(step_dir: pathlib.Path, count=4096, name=None):
    """Inverts `count` bytes in the middle of the state's largest file (or of the file `name`)."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and name in (None, p.name)]
    target = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    middle = len(data) // 2
    data[middle : middle + count] = bytes(b ^ 0xFF for b in data[middle : middle + count])
    target.write_bytes(bytes(data))


def test_checksums_do_not_depend_on_where_the_arrays_are():
    state, later = states()
    assert checksums(state) == checksums(jax.device_get(state)) != checksums(later)


def test_a_corrupt_latest_checkpoint_is_named_and_the_newest_intact_one_used(tmp_path, capsys):
    first, second = states()
    checkpoints = saved(tmp_path, {1: first, 2: second, 3: second})
    flip_bytes(tmp_path / "checkpoints" / "3")
    shutil.rmtree(tmp_path / "checkpoints" / "2" / "state")
    with pytest.raises(CorruptCheckpoint, match="Checkpoint 3 .*(cannot be read|reads back otherwise)"):
        checkpoints.restore(first, 3)
    step, state = checkpoints.restore_newest_intact(first)
    assert step == 1 and checksums(state) == checksums(first)
    out = capsys.readouterr().out
    assert "Checkpoint 3 " in out and "Checkpoint 2 " in out and "cannot be read" in out
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2.corrupt", "3.corrupt"]
    assert checkpoints.all_steps() == [1]


def test_a_corrupt_metadata_file_is_a_corrupt_checkpoint(tmp_path):
    """Undecodable JSON metadata raises UnicodeDecodeError, a ValueError, inside Orbax: it is the
    file's fault, so it is named as a corrupt checkpoint and the one before it is used."""
    first, second = states()
    checkpoints = saved(tmp_path, {1: first, 2: second})
    flip_bytes(tmp_path / "checkpoints" / "2", count=64, name="_METADATA")
    with pytest.raises(CorruptCheckpoint, match="Checkpoint 2 .*cannot be read"):
        checkpoints.restore(second, 2)
    step, state = checkpoints.restore_newest_intact(first)
    assert step == 1 and checksums(state) == checksums(first)


def test_a_state_of_another_optimizer_is_named_not_called_corrupt(tmp_path):
    adamw, _ = states()
    checkpoints = saved(tmp_path, {1: adamw})
    adafactor = optimizers.optimizer("adafactor", 1e-3, param_axes=param_axes(CONFIG))
    abstract = jax.eval_shape(lambda: init_state(CONFIG, adafactor, jax.random.PRNGKey(0)))
    with pytest.raises(ValueError, match="Checkpoint 1 .* holds the state of another optimizer or model") as caught:
        checkpoints.restore(abstract, 1)
    assert not isinstance(caught.value, CorruptCheckpoint)
    assert checkpoints.all_steps() == [1]


def test_no_intact_checkpoint_is_an_error_and_non_finite_parameters_are_not_evaluated(tmp_path):
    first, _ = states()
    checkpoints = saved(tmp_path / "corrupt", {1: first})
    shutil.rmtree(tmp_path / "corrupt" / "checkpoints" / "1" / "state")
    with pytest.raises(ValueError, match="No checkpoint of .* reads back as saved"):
        checkpoints.restore_newest_intact(first)
    broken = first.replace(params=jax.tree.map(lambda x: np.full(x.shape, np.nan, x.dtype), first.params))
    checkpoints = saved(tmp_path / "nan", {1: broken})
    with pytest.raises(ValueError, match="Checkpoint 1 .* holds non-finite parameters"):
        checkpoints.restore_params(1)
