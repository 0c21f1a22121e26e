"""Two processes on localhost (jax.distributed, gloo collectives, 4 CPU devices each) train, stop
together when one is preempted, save and resume like one process fed the same global batches."""

import dataclasses
import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from t5lite import config as t5config
from t5lite.sharding import MeshShape
from t5lite.train.checkpoint import restore_params
from t5lite.train.loop import TrainStep
from t5lite.train.metrics import read_metrics
from t5lite.train.spec import RunSpec
from t5lite.train.step import init_state

RUN = ["runs/t5_tiny_span_corruption.gin", "sharding/fsdp.gin"]
BINDINGS = [
    "ModelConfig.d_model = 64",
    "ModelConfig.d_ff = 128",
    "ModelConfig.num_heads = 4",
    "ModelConfig.head_dim = 16",
    "ModelConfig.num_encoder_layers = 1",
    "ModelConfig.num_decoder_layers = 1",
    "ModelConfig.dtype = 'float32'",
    "MeshShape.data = 2",
    "MeshShape.fsdp = 4",
    "train.batch_size = 8",
    "train.task_feature_lengths = {'inputs': 32, 'targets': 8}",
    "train.log_every = 1",
    "train.checkpoint_every = 1000",
    "train.progress = False",
    "train.eval_batches = 2",
    "learning_rate_schedule.name = 'constant'",
    "learning_rate_schedule.base_learning_rate = 0.01",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def start_two_processes(model_dir, num_steps):
    port = free_port()
    flags = os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=4")  # conftest's, for 4 devices
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
    bindings = [f"--gin.{b.replace(' = ', '=', 1)}" for b in BINDINGS + [f"train.num_steps = {num_steps}"]]
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "t5lite.cli",
                "train",
                *(f"--gin_file={f}" for f in RUN),
                f"--model_dir={model_dir}",
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={index}",
                *bindings,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index in range(2)
    ]


def finish(processes):
    outputs = [process.communicate(timeout=600)[0] for process in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
    return outputs


def one_process_reference(num_steps):
    """Losses and parameters of the same run on one device, fed each step the rows the two
    processes read (process 0's shard, then process 1's)."""
    t5config.parse_gin(RUN, BINDINGS + [f"train.num_steps = {num_steps}"])
    spec = RunSpec.from_gin()
    shards = [spec.data_stream("train", (index, 2)) for index in range(2)]
    step = TrainStep.for_run(dataclasses.replace(spec, mesh_shape=MeshShape()), devices=jax.devices()[:1])
    with step.partitioner.context():
        state = init_state(spec.model_config, step.tx, jax.random.PRNGKey(spec.seed), step.state_shardings)
        rng = jax.device_put(jax.random.fold_in(jax.random.PRNGKey(spec.seed), 1), step.partitioner.replicated)
        losses = []
        for _ in range(num_steps):
            local = [next(shard) for shard in shards]
            batch = {name: np.concatenate([rows[name] for rows in local]) for name in local[0]}
            state, metrics = step.fn(state, step.partitioner.global_batch(batch, spec.batch_size), rng)
            losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params)


@pytest.mark.slow
def test_two_processes_stop_together_save_and_resume_like_one(tmp_path):
    """SIGTERM to one process: both stop at the step they agree on, with one checkpoint; the rerun
    continues as one process fed the same global batches would."""
    processes = start_two_processes(tmp_path, num_steps=1000)
    metrics = tmp_path / "train_metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert all(process.poll() is None for process in processes), processes[0].communicate()[0][-3000:]
        time.sleep(0.05)
    processes[1].send_signal(signal.SIGTERM)
    stops = {int(re.search(r"Interrupted at step (\d+)", output).group(1)) for output in finish(processes)}
    assert len(stops) == 1  # one step for both
    stop = stops.pop()
    assert (tmp_path / "checkpoints" / str(stop)).is_dir()
    all_steps = stop + 2
    finish(start_two_processes(tmp_path, all_steps))  # resumes from the stop's checkpoint
    rows = read_metrics(tmp_path / "train_metrics.jsonl")
    written = [json.loads(line)["step"] for line in (tmp_path / "train_metrics.jsonl").read_text().splitlines()]
    assert written == list(range(1, all_steps + 1))  # no step twice
    evaluation = read_metrics(tmp_path / "eval_metrics.jsonl")  # both processes evaluated their shards together
    assert [row["step"] for row in evaluation] == [all_steps] and np.isfinite(evaluation[0]["loss"])
    reference_losses, reference_params = one_process_reference(all_steps)
    np.testing.assert_allclose([row["loss"] for row in rows], reference_losses, rtol=1e-5)
    _, params, step = restore_params(tmp_path)
    assert step == all_steps
    # float32 throughout; eight devices sum gradients in another order than one.
    jax.tree.map(
        functools.partial(np.testing.assert_allclose, rtol=2e-4, atol=2e-5), jax.device_get(params), reference_params
    )
