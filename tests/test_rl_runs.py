"""RL runs end to end through gin: GRPO from a briefly supervised model raises the synthetic tasks'
exact match, and a PPO run killed with SIGKILL resumes to the uninterrupted metrics bit for bit
(PPO against a reward model's run: tests/test_train_loop.py)."""

import subprocess
import sys

import numpy as np
import pytest
from test_train_loop import logged_rows, wait_for

from t5lite import cli
from t5lite.train.metrics import read_metrics

SFT = [
    "train.mixture_or_task_name = 't5lite_synthetic_copy'",
    "train.num_steps = 60",
    "train.progress = False",
    "train.log_every = 60",
    "ModelConfig.dtype = 'float32'",
]
GRPO = ["train.progress = False", "train.log_every = 1", "ModelConfig.dtype = 'float32'"]
TIMING = ("step_time_s", "tokens_per_s", "target_tokens_per_s", "tflops_per_device", "mfu")


def flags(bindings):
    return [f"--gin.{b.replace(' = ', '=', 1)}" for b in bindings]


def train_args(gin_file, model_dir, bindings):
    return ["train", f"--gin_file={gin_file}", f"--model_dir={model_dir}", *flags(bindings)]


@pytest.fixture(scope="module")
def supervised(tmp_path_factory):
    """The tiny synthetic model after 60 supervised steps on the copy task: about a quarter of its
    sampled answers are right."""
    model_dir = tmp_path_factory.mktemp("sft")
    assert cli.main(train_args("runs/t5_tiny_synthetic.gin", model_dir, SFT)) == 0
    return model_dir


def measured(model_dir):
    """Each logged row without its timings."""
    rows = read_metrics(model_dir / "train_metrics.jsonl")
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


@pytest.mark.slow
def test_grpo_raises_exact_match(supervised, tmp_path):
    """The README's run, shortened: 40 of its 200 steps (128 responses each)."""
    run = [*GRPO, f"train.init_from = '{supervised}'", "train.num_steps = 40", "train.checkpoint_every = 40"]
    assert cli.main(train_args("runs/grpo_synthetic.gin", tmp_path, run)) == 0
    rows = read_metrics(tmp_path / "train_metrics.jsonl")
    reward = [row["reward_mean"] for row in rows]
    assert np.mean(reward[-10:]) >= np.mean(reward[:10]) + 0.05, reward
    assert rows[0]["kl"] == 0.0 and max(row["kl"] for row in rows) < 10.0  # nats per response: bounded
    for name in ("reward_std", "entropy", "clip_fraction", "response_length", "grad_norm", "mfu"):
        assert all(np.isfinite(row[name]) for row in rows[1:]), name


@pytest.mark.slow
def test_a_killed_ppo_run_resumes_to_the_uninterrupted_metrics(tmp_path):
    """PPO from a fresh model (its reference rebuilt from the seed on resume), 8 prompts a step, 4
    epochs of 2 shuffled minibatches: sampling keys, the shuffles and the value head all resume."""
    run = [*GRPO, "train.rl = @PPO()", "PPO.reward = @rewards.exact_match", "AdapterConfig.reward_head = True"]
    run += ["train.num_steps = 6", "train.checkpoint_every = 3", "train.batch_size = 8"]
    assert cli.main(train_args("runs/grpo_synthetic.gin", tmp_path / "straight", run)) == 0
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "t5lite.cli", *train_args("runs/grpo_synthetic.gin", killed, run)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:  # killed past its step-3 checkpoint, before the end: the steps after it are sampled again
        wait_for(process, lambda: (killed / "checkpoints" / "3").is_dir() and logged_rows(killed) >= 4)
    finally:
        process.kill()
    output = process.communicate()[0]
    assert process.returncode == -9, output[-3000:]
    assert cli.main(train_args("runs/grpo_synthetic.gin", killed, run)) == 0
    rows = measured(tmp_path / "straight")
    assert measured(killed) == rows
    assert all(row["grad_norm"] > 0 for row in rows) and rows[-1]["kl"] != 0.0  # the policy moved
