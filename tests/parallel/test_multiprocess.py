"""Two processes on localhost (jax.distributed, gloo collectives, 4 CPU devices each) train, save
and resume like one process fed the same global batches."""

import functools
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from t5lite import config as t5config
from t5lite.data import DataStream
from t5lite.sharding import MeshShape
from t5lite.train import aot
from t5lite.train.checkpoint import restore_params
from t5lite.train.loop import TrainStep
from t5lite.train.metrics import read_metrics
from t5lite.train.step import init_state

RUN = ["runs/t5_tiny_span_corruption.gin", "sharding/fsdp.gin"]
BINDINGS = ["ModelConfig.d_model = 64", "ModelConfig.d_ff = 128", "ModelConfig.num_heads = 4",
            "ModelConfig.head_dim = 16", "ModelConfig.num_encoder_layers = 1", "ModelConfig.num_decoder_layers = 1",
            "ModelConfig.dtype = 'float32'", "MeshShape.data = 2", "MeshShape.fsdp = 4", "train.batch_size = 8",
            "train.task_feature_lengths = {'inputs': 32, 'targets': 8}", "train.log_every = 1",
            "train.checkpoint_every = 2", "train.progress = False", "train.eval_every = 6", "train.eval_batches = 2",
            "learning_rate_schedule.name = 'constant'",
            "learning_rate_schedule.base_learning_rate = 0.01"]
FIRST_STEPS, ALL_STEPS = 4, 6


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def train_two_processes(model_dir, num_steps):
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    bindings = [f"--gin.{b.replace(' = ', '=', 1)}" for b in BINDINGS + [f"train.num_steps = {num_steps}"]]
    processes = [subprocess.Popen(
        [sys.executable, "-m", "t5lite.cli", "train", *(f"--gin_file={f}" for f in RUN), f"--model_dir={model_dir}",
         f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={index}", *bindings],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for index in range(2)]
    outputs = [process.communicate(timeout=600)[0] for process in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]


def one_process_reference():
    """Losses and parameters of the same run on one device, fed each step the rows the two
    processes read (process 0's shard, then process 1's)."""
    t5config.parse_gin(RUN, BINDINGS + [f"train.num_steps = {ALL_STEPS}"])
    args = aot.train_arguments()
    shards = [DataStream(args["mixture_or_task_name"], split="train", task_feature_lengths=args["task_feature_lengths"],
                         batch_size=args["batch_size"] // 2, model_kind="encoder_decoder", shard_index=index,
                         num_shards=2, seed=args["seed"]) for index in range(2)]
    step = TrainStep.create(args["model_config"], MeshShape(), args["optimizer"](
        learning_rate=args["learning_rate"]), args["learning_rate"], seed=args["seed"], batch_size=args["batch_size"],
        num_microbatches=1, z_loss=args["z_loss"], label_smoothing=0.0, devices=jax.devices()[:1])
    with step.partitioner.context():
        state = init_state(args["model_config"], step.tx, jax.random.PRNGKey(args["seed"]), step.state_shardings)
        rng = jax.device_put(jax.random.fold_in(jax.random.PRNGKey(args["seed"]), 1), step.partitioner.replicated)
        losses = []
        for _ in range(ALL_STEPS):
            local = [next(shard) for shard in shards]
            batch = {name: np.concatenate([rows[name] for rows in local]) for name in local[0]}
            state, metrics = step.fn(state, step.partitioner.global_batch(batch, args["batch_size"]), rng)
            losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params)


def test_two_processes_train_save_resume_like_one(tmp_path):
    train_two_processes(tmp_path, FIRST_STEPS)
    train_two_processes(tmp_path, ALL_STEPS)  # resumes from the step-4 checkpoint
    rows = read_metrics(tmp_path / "train_metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(1, ALL_STEPS + 1))
    evaluation = read_metrics(tmp_path / "eval_metrics.jsonl")  # both processes evaluated their shards together
    assert [row["step"] for row in evaluation] == [FIRST_STEPS, ALL_STEPS]  # each run evaluates at its end
    assert all(np.isfinite(row["loss"]) for row in evaluation)
    reference_losses, reference_params = one_process_reference()
    np.testing.assert_allclose([row["loss"] for row in rows], reference_losses, rtol=1e-5)
    _, params, step = restore_params(tmp_path)
    assert step == ALL_STEPS
    # float32 throughout; eight devices sum gradients in another order than one.
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=2e-4, atol=2e-5), jax.device_get(params),
                 reference_params)
