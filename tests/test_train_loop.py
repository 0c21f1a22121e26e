"""End-to-end training through gin: learning, exact resume after SIGKILL, FLOPs, and bad input."""

import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from t5lite import cli
from t5lite.config import ModelConfig
from t5lite.models import flops
from t5lite.train.metrics import read_metrics

TINY = [
    "ModelConfig.d_model = 64",
    "ModelConfig.d_ff = 128",
    "ModelConfig.num_heads = 2",
    "ModelConfig.head_dim = 32",
    "ModelConfig.num_kv_heads = None",
    "ModelConfig.num_encoder_layers = 1",
    "ModelConfig.num_decoder_layers = 1",
    "ModelConfig.dtype = 'float32'",
    "train.batch_size = 8",
    "train.log_every = 1",
    "train.progress = False",
    "train.checkpoint_every = 10",
    "learning_rate_schedule.warmup_steps = 10",
]
SPAN = ["runs/t5_tiny_span_corruption.gin", "train.task_feature_lengths = {'inputs': 64, 'targets': 16}"]
PREFIX = ["runs/prefix_lm_tiny.gin", "train.task_feature_lengths = {'inputs': 48, 'targets': 16}"]


def train(model_dir, run, *bindings, flags=()):
    """Trains in this process as `t5lite train` would; returns the exit code."""
    gin_file, *run_bindings = run
    args = ["train", f"--gin_file={gin_file}", f"--model_dir={model_dir}", *flags]
    return cli.main(args + [f"--gin.{b.replace(' = ', '=', 1)}" for b in TINY + run_bindings + list(bindings)])


def losses(model_dir):
    return [row["loss"] for row in read_metrics(pathlib.Path(model_dir) / "train_metrics.jsonl")]


def check_learned(model_dir, steps):
    curve = losses(model_dir)
    assert len(curve) == steps
    assert np.mean(curve[-5:]) < np.mean(curve[:5]) - 1.0, curve
    assert (model_dir / "checkpoints" / str(steps)).is_dir() and (model_dir / "config.gin").is_file()
    row = read_metrics(model_dir / "train_metrics.jsonl")[-1]
    assert {"perplexity", "accuracy", "learning_rate", "grad_norm", "tokens_per_s", "mfu", "tflops_per_device"} <= set(
        row
    )


SFT_DECODER = [
    "runs/llama_tiny_lm.gin",
    "train.model_kind = 'causal_prefix_lm'",
    "train.mixture_or_task_name = 't5lite_instructions'",
    "train.task_feature_lengths = {'inputs': 48, 'targets': 16}",
]


# A causal LM's 40 steps on the corpus are the quickstart notebook's (tests/test_notebooks.py).
@pytest.mark.slow
@pytest.mark.parametrize("run", [PREFIX, SFT_DECODER], ids=["prefix_lm", "sft_causal_decoder"])
def test_training_lowers_the_loss(run, tmp_path):
    steps = 20 if run is SFT_DECODER else 40  # responses to the instructions are learnt fast
    assert train(tmp_path, run, f"train.num_steps = {steps}") == 0
    check_learned(tmp_path, steps)
    if run is SFT_DECODER:  # prompted with the instruction and EOS, scored by the task's metric
        from t5lite import inference

        results = inference.evaluate_run(inference.load_run(tmp_path), num_batches=1, max_examples=8)
        assert 0.0 <= results["metrics"]["t5lite_instructions"]["exact_match"] <= 100.0
        # GRPO goes on from it: responses sampled to the prompts of its causal_prefix_lm rows.
        grpo = ["train.rl = @GRPO()", "GRPO.reward = @rewards.exact_match", "GRPO.group_size = 2", "train.pack = False"]
        assert train(tmp_path / "grpo", run, *grpo, f"train.init_from = '{tmp_path}'", "train.num_steps = 2") == 0
        rows = read_metrics(tmp_path / "grpo" / "train_metrics.jsonl")
        assert [r["step"] for r in rows] == [1, 2] and rows[0]["kl"] == 0.0 and rows[1]["kl"] != 0.0
        assert all(0 <= r["reward_mean"] <= 1 and 1 <= r["response_length"] <= 16 for r in rows)


def start_training(model_dir, steps, checkpoint_every):
    """`t5lite train` of the span-corruption run in a subprocess."""
    command = [sys.executable, "-m", "t5lite.cli", "train", f"--gin_file={SPAN[0]}", f"--model_dir={model_dir}"]
    bindings = TINY + SPAN[1:] + steps + [f"train.checkpoint_every = {checkpoint_every}"]
    command += [f"--gin.{b.replace(' = ', '=', 1)}" for b in bindings]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(process, ready, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None and not ready():
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be stopped: " + process.communicate()[0][-2000:]


def logged_rows(model_dir):
    metrics = model_dir / "train_metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def logged_steps(model_dir, split="train"):
    """The steps of the rows in a metrics file, as written (read_metrics would hide a repeated one)."""
    return [json.loads(line)["step"] for line in (model_dir / f"{split}_metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_interrupted_runs_resume_to_the_uninterrupted_losses(tmp_path):
    """Stopped by SIGTERM (exit 0, a checkpoint at the step it was on), killed (SIGKILL: the last
    periodic checkpoint survives) and interrupted by Ctrl-C (exit 130), one after the other, a
    rerun reproduces the uninterrupted run bit for bit, and the metrics hold every step once.
    Also span corruption's "training lowers the loss" (the uninterrupted run)."""
    steps = ["train.num_steps = 30"]
    assert train(tmp_path / "straight", SPAN, *steps) == 0
    check_learned(tmp_path / "straight", 30)

    run = tmp_path / "run"
    for signum, rows in ((signal.SIGTERM, 4), (signal.SIGKILL, 13), (signal.SIGINT, 16)):
        process = start_training(run, steps, checkpoint_every=10)
        wait_for(
            process,
            lambda: (
                logged_rows(run) >= rows  # SIGKILL: between two periodic checkpoints
                and (signum != signal.SIGKILL or (run / "checkpoints" / "10").is_dir())
            ),
        )
        process.send_signal(signum)
        output = process.communicate(timeout=300)[0]
        logged = logged_steps(run)
        if signum == signal.SIGKILL:
            assert logged[-1] < 30 and (run / "checkpoints" / "10").is_dir()
            continue
        assert process.returncode == {signal.SIGTERM: 0, signal.SIGINT: 130}[signum], output[-3000:]
        step = int(
            re.search(r"Interrupted at step (\d+); checkpoint saved, rerun the same command to resume", output).group(1)
        )
        assert "Traceback" not in output
        assert step >= rows and (run / "checkpoints" / str(step)).is_dir()  # at most the running step lost
        assert logged == list(range(1, step + 1))  # a resumed run dropped the rows after its checkpoint
    assert train(run, SPAN, *steps) == 0
    assert losses(run) == losses(tmp_path / "straight")  # bit-identical, step by step
    assert logged_steps(run) == list(range(1, 31))


def test_a_second_ctrl_c_aborts_at_once():
    from t5lite.train.preemption import StopRequests

    before = signal.getsignal(signal.SIGINT)  # pytest-xdist's workers may ignore SIGINT
    with StopRequests() as stop:
        assert not stop.now(1)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.now(2) and stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # the handler is given back


def test_flops_match_hand_counts():
    config = ModelConfig(
        architecture="decoder",
        vocab_size=1000,
        d_model=64,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        d_ff=256,
        num_decoder_layers=2,
        mlp_activation="swiglu",
    )
    s = 32
    projections = 2 * s * (64 * 64 + 64 * 32 + 64 * 32 + 64 * 64)  # q, k, v (2 kv heads), o
    scores = 4 * s * s * 4 * 16 / 2  # causal
    mlp = 2 * s * 3 * 64 * 256
    logits = 2 * s * 64 * 1000
    assert flops.training_flops_per_sequence(config, 0, s) == 3 * (2 * (projections + scores + mlp) + logits)
    # A frozen base (LoRA) skips the weight gradients: forward and the activations' backward only.
    assert flops.training_flops_per_sequence(config, 0, s, frozen_base=True) == 2 * (
        2 * (projections + scores + mlp) + logits
    )

    t5 = ModelConfig(
        architecture="encoder_decoder",
        vocab_size=500,
        d_model=32,
        num_heads=2,
        head_dim=8,
        d_ff=64,
        num_encoder_layers=1,
        num_decoder_layers=1,
        mlp_activation="relu",
    )
    e, d = 20, 10
    encoder = 2 * e * 4 * 32 * 16 + 4 * e * e * 16 + 2 * e * 2 * 32 * 64
    self_attention = 2 * d * 4 * 32 * 16 + 4 * d * d * 16 / 2
    cross = 2 * d * 2 * 32 * 16 + 2 * e * 2 * 32 * 16 + 4 * d * e * 16
    decoder = self_attention + cross + 2 * d * 2 * 32 * 64
    assert flops.training_flops_per_sequence(t5, e, d) == 3 * (encoder + decoder + 2 * d * 32 * 500)


def _fingerprint(directory: pathlib.Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("trained")
    # T5's warmup (a learning rate of 0.1, not TINY's 0.3): the pretrained model fine-tuning starts from.
    assert train(model_dir, SPAN, "train.num_steps = 10", "learning_rate_schedule.warmup_steps = 100") == 0
    return model_dir


@pytest.mark.slow
@pytest.mark.parametrize(
    "bindings, message",
    [
        (["ModelConfig.num_decoder_layers = 3"], "holds a run of a different model"),
        (["train.mixture_or_task_name = 'no_such_task'"], "no_such_task"),
        (["train.no_such_parameter = 1"], "no_such_parameter"),
        (["train.num_steps = 20", "optimizer.name = 'adamw'"], "optimizer.name: 'adafactor' there, 'adamw' here"),
        (["train.batch_size = 16"], "train.batch_size: 8 there, 16 here"),
        (["train.seed = 1", "ALLOW"], "data differs from the data of the run it resumes (seed: 0 there, 1 here"),
    ],
)
def test_bad_input_fails_clearly_and_keeps_checkpoints(trained_dir, bindings, message, capsys):
    """Also: a resumed run with other settings is refused, naming them (and with --allow_config_change,
    data that is not the run's: another seed, task or lengths)."""
    before = _fingerprint(trained_dir / "checkpoints")
    flags = ["--allow_config_change"] if "ALLOW" in bindings else []
    assert train(trained_dir, SPAN, *(b for b in bindings if b != "ALLOW"), flags=flags) == 2
    assert message in capsys.readouterr().err
    assert _fingerprint(trained_dir / "checkpoints") == before


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--method=smoothquant", "--bits=4"], "activations='int8' runs int8 x int8 matmuls"),
        (
            ["--method=int8", "--families=attention,embedding"],
            "WeightQuantConfig.families='embedding' is not supported",
        ),
        (["--method=gptq", "--group_size=48"], "group_size=48 must divide the inputs of every quantised kernel"),
        (["--method=int8", "--families="], "Name at least one family"),
        (["--method=gptq", "--percentile=99"], "only sets SmoothQuant's input ranges"),
        (["--method=gptq", "--bits=4", "--group_size=32", "--format=nf4"], "use method='int8'"),
    ],
)
def test_bad_quantize_input_fails_clearly_and_writes_nothing(trained_dir, tmp_path, args, message, capsys):
    output = tmp_path / "quantized"
    assert cli.main(["quantize", f"--checkpoint={trained_dir}", f"--output={output}", *args]) == 2
    assert message in capsys.readouterr().err
    assert not output.exists()


@pytest.mark.slow
def test_quantize_writes_nf4_with_double_quantised_scales(trained_dir, tmp_path, capsys):
    from t5lite import inference

    nf4 = ["--method=int8", "--bits=4", "--group_size=32", "--format=nf4", "--double_quant"]
    assert cli.main(["quantize", f"--checkpoint={trained_dir}", f"--output={tmp_path / 'nf4'}", *nf4]) == 0
    assert "Wrote the NF4 (4-bit NormalFloat) model" in capsys.readouterr().out
    run = inference.load_run(tmp_path / "nf4")
    config = run.model.config
    assert (config.weight_quant.format, config.weight_quant.double_quant, config.weight_quant.bits) == ("nf4", True, 4)
    query = run.params["encoder"]["layers"]["attention"]["query"]
    assert query["kernel"].dtype == query["kernel_scale"].dtype == np.int8 and "kernel_scale_scale" in query
    assert json.loads((tmp_path / "nf4" / "quantization.json").read_text())["format"] == "nf4"


@pytest.mark.slow
def test_the_console_says_how_a_run_starts_saves_evaluates_and_ends(trained_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_dir, run)
    again = ["train.num_steps = 10", "train.progress = True", "learning_rate_schedule.warmup_steps = 100"]
    assert train(run, SPAN, *again) == 0
    assert f"{run} is at step 10 of train.num_steps=10: nothing to train" in capsys.readouterr().out
    assert train(run, SPAN, *again, flags=["--quiet"]) == 0
    assert capsys.readouterr() == ("", "")
    more = ["train.num_steps = 12", "train.checkpoint_every = 1", "train.eval_every = 2", "train.eval_batches = 1"]
    assert train(run, SPAN, *again[1:], *more) == 0
    console = capsys.readouterr().out
    assert f"Resumed from step 10 (checkpoint {run / 'checkpoints' / '10'}); training to step 12" in console
    assert f"step 11: saved checkpoint {run / 'checkpoints' / '11'}" in console
    evaluated = read_metrics(run / "eval_metrics.jsonl")[-1]
    assert f"step 12: eval loss {evaluated['loss']:.4g}, perplexity {evaluated['perplexity']:.4g}" in console
    final = read_metrics(run / "train_metrics.jsonl")[-1]["loss"]
    assert f"Done: 2 steps ({2 * 8 * (64 + 16):,} tokens)" in console and f"final train loss {final:.4f}" in console
    assert f"best eval loss {evaluated['loss']:.4f} (step 12)" in console


@pytest.mark.slow
def test_generate_says_when_it_cuts_a_prompt_and_prints_no_start_up_noise(trained_dir):
    """In a process as a user starts it (no JAX_PLATFORMS): no libtpu, TensorFlow or CUDA notices."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL")}
    prompt = " ".join(["words"] * 400)
    command = [sys.executable, "-m", "t5lite.cli", "generate", f"--model_dir={trained_dir}", f"--prompt={prompt}"]
    done = subprocess.run([*command, "--max_new_tokens=2"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    cut = re.findall(
        r"Prompt 1 is (\d+) tokens; the run was trained on inputs of 64 .*: kept its last 63\.", done.stderr
    )
    assert cut and int(cut[0]) >= 400, done.stderr
    noise = [line for line in done.stderr.splitlines() if not line.startswith("Prompt 1 is")]
    assert not noise, noise


@pytest.mark.slow
def test_generate_decodes_speculatively_and_contrastively(trained_dir, capsys):
    """The methods' flags reach the decoder: the run as its own draft writes greedy's text; contrastive
    search and decoding (the run as its own amateur: every plausible token ties) run; bad pairs fail."""
    generate = [
        "generate",
        f"--model_dir={trained_dir}",
        "--prompt=The river <extra_id_0> the town.",
        "--max_new_tokens=6",
    ]
    assert cli.main(generate) == 0
    greedy = capsys.readouterr().out
    assert cli.main([*generate, f"--draft_dir={trained_dir}", "--draft_tokens=3"]) == 0
    assert capsys.readouterr().out == greedy
    for flags in (["--degeneration_penalty=0.6", "--top_k=4"], [f"--amateur_dir={trained_dir}"]):
        assert cli.main([*generate, *flags]) == 0
        assert capsys.readouterr().out.startswith("> The river <extra_id_0> the town.\n")
    assert cli.main([*generate, "--top_k=4"]) == 2
    assert "--degeneration_penalty for contrastive search" in capsys.readouterr().err
    assert cli.main([*generate, f"--draft_dir={trained_dir}", f"--amateur_dir={trained_dir}"]) == 2
    assert "not both" in capsys.readouterr().err


@pytest.mark.slow
def test_quantize_refuses_a_non_empty_output(trained_dir, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    assert cli.main(["quantize", f"--checkpoint={trained_dir}", f"--output={tmp_path}", "--method=int8"]) == 2
    assert "is not an empty directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize(
    "bindings, message",
    [
        (["ModelConfig.position_encoding = 'learned'", "ModelConfig.max_length = 32"], "learned position table"),
        (["ModelConfig.vocab_size = 1000"], "Set ModelConfig.vocab_size = 4224"),
        (["train.task_feature_lengths = {'targets': 16}"], "must give lengths for ['inputs', 'targets']"),
        (["train.num_steps = -5"], "train.num_steps=-5 must be a positive number of steps"),
        (["train.num_steps = 0"], "train.num_steps=0 must be a positive number of steps"),
        (["train.init_from = /tmp/t5"], "quote strings, e.g. --gin.train.init_from=\"'/tmp/t5'\""),
    ],
)
def test_bad_input_for_a_new_run_writes_nothing(tmp_path, bindings, message, capsys):
    assert train(tmp_path / "run", SPAN, *bindings) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_missing_gin_file(tmp_path, capsys):
    assert cli.main(["train", "--gin_file=runs/missing.gin", f"--model_dir={tmp_path / 'run'}"]) == 2
    assert "not found" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_empty_dataset(tmp_path, capsys):
    from t5lite import data

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    data.register_text_file_task("t5lite_test_empty", str(empty), objective="span_corruption")
    assert train(tmp_path / "run", SPAN, "train.mixture_or_task_name = 't5lite_test_empty'") == 2
    assert "empty" in capsys.readouterr().err.lower()
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_finetuning_beats_the_pretrained_model_and_lora_freezes_it(trained_dir, tmp_path, capsys):
    """Fine-tuning on the instruction task from the span-corruption run lifts the task's exact match;
    LoRA from the same run trains only its adapters; a different model is refused before writing."""
    import dataclasses

    from flax import traverse_util

    from t5lite import inference
    from t5lite.models.params import PROMPT_PATH
    from t5lite.train.checkpoint import restore_params

    def evaluate(run):
        return inference.evaluate_run(run, num_batches=1, max_examples=48)["metrics"]["t5lite_instructions"]

    lengths = {"inputs": 48, "targets": 16}
    pretrained = inference.load_run(trained_dir)
    pretrained.spec = dataclasses.replace(
        pretrained.spec, mixture_or_task_name="t5lite_instructions", task_feature_lengths=lengths
    )
    start = [f"train.init_from = '{trained_dir}'", "train.eval_every = None", "train.checkpoint_every = 1000"]
    full = ["runs/finetune_instructions.gin", f"train.task_feature_lengths = {lengths}"]
    assert train(tmp_path / "full", full, *start, "train.num_steps = 60", "train.batch_size = 16") == 0
    assert evaluate(inference.load_run(tmp_path / "full"))["exact_match"] >= evaluate(pretrained)["exact_match"] + 5

    # LoRA and a soft prompt together: both train, the base stays as it was.
    lora = ["runs/lora_instructions.gin", f"train.task_feature_lengths = {lengths}", "AdapterConfig.prompt_length = 4"]
    assert train(tmp_path / "lora", lora, *start, "train.num_steps = 20") == 0
    curve = losses(tmp_path / "lora")
    assert np.mean(curve[-3:]) < np.mean(curve[:3]) - 0.5, curve
    base = traverse_util.flatten_dict(restore_params(trained_dir)[1], sep="/")
    tuned = traverse_util.flatten_dict(restore_params(tmp_path / "lora")[1], sep="/")
    assert {p for p in tuned if "lora_" not in p} == set(base) | {PROMPT_PATH}
    for path, value in base.items():
        np.testing.assert_array_equal(tuned[path], value, err_msg=path)

    assert train(tmp_path / "other", full, *start, "ModelConfig.d_ff = 64") == 2
    assert "holds a different model (d_ff: 128 there, 64 here)" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
    assert train(tmp_path / "packed", full, *start, "AdapterConfig.prompt_length = 4", "train.pack = True") == 2
    assert "every row needs its own soft prompt; set train.pack=False" in capsys.readouterr().err
    assert not (tmp_path / "packed").exists()


@pytest.mark.slow
def test_distillation_trains_a_student_on_its_teachers_soft_targets(trained_dir, tmp_path, capsys):
    teacher = [
        f"Distillation.teacher = '{trained_dir}'",
        "train.distillation = @Distillation()",
        "Distillation.alpha = 1.0",
        "Distillation.temperature = 1.0",
    ]
    assert (
        train(
            tmp_path / "student",
            SPAN,
            *teacher,
            "ModelConfig.d_ff = 64",
            "train.num_steps = 12",
            "Distillation.hidden_weight = 1.0",
        )
        == 0
    )
    rows = read_metrics(tmp_path / "student" / "train_metrics.jsonl")
    assert all(row["temperature"] == 1.0 for row in rows)
    # The student moves towards its teacher, in its output distribution and in its layers' outputs.
    for metric, fall in (("distill_kl", 0.5), ("distill_hidden", 0.85)):
        values = [row[metric] for row in rows]
        assert np.mean(values[-3:]) < fall * np.mean(values[:3]), (metric, values)
    assert train(tmp_path / "other", SPAN, *teacher, "ModelConfig.vocab_size = 4352") == 2
    assert "Teacher and student need one vocabulary" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


@pytest.mark.slow
def test_dpo_reward_model_and_ppo_learn_the_preference_pairs(trained_dir, tmp_path, capsys):
    dpo = ["runs/dpo_instructions.gin", "train.task_feature_lengths = {'inputs': 48, 'targets': 8}"]
    start = [f"train.init_from = '{trained_dir}'", "train.checkpoint_every = 1000", "train.batch_size = 32"]
    assert (
        train(tmp_path / "dpo", dpo, *start, "train.num_steps = 12", "learning_rate_schedule.base_learning_rate = 5e-3")
        == 0
    )
    rows = read_metrics(tmp_path / "dpo" / "train_metrics.jsonl")
    assert abs(rows[0]["loss"] - np.log(2.0)) < 1e-5 and rows[0]["margin"] == 0.0  # policy == reference
    late = rows[len(rows) // 2 :]
    assert np.mean([r["margin"] for r in late]) > 0.05 and np.mean([r["accuracy"] for r in late]) > 0.6, rows
    # A reward model learns to rank 8 pairs of a .jsonl file (16 rows: all of them every step).
    from t5lite.data.preferences import builtin_pairs

    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in builtin_pairs("train")[:8]))
    reward = [
        "runs/reward_model_instructions.gin",
        "train.task_feature_lengths = {'inputs': 48, 'targets': 16}",
        "train.mixture_or_task_name = @pairs/t5lite.data.register_preference_task()",
        "pairs/t5lite.data.register_preference_task.name = 't5lite_test_pairs'",
        f"pairs/t5lite.data.register_preference_task.train_file = '{tmp_path / 'pairs.jsonl'}'",
    ]
    assert (
        train(
            tmp_path / "reward",
            reward,
            *start,
            "train.num_steps = 12",
            "learning_rate_schedule.base_learning_rate = 5e-3",
        )
        == 0
    )
    rows = read_metrics(tmp_path / "reward" / "train_metrics.jsonl")
    late = rows[len(rows) // 2 :]
    assert np.mean([r["loss"] for r in late]) < np.mean([r["loss"] for r in rows[:3]]), rows
    assert np.mean([r["accuracy"] for r in late]) > 0.8, rows
    # PPO against that reward model raises its score; the KL to the reference is logged and stays bounded.
    ppo = [
        "runs/ppo_instructions.gin",
        "train.task_feature_lengths = {'inputs': 48, 'targets': 8}",
        f"RewardModel.model_dir = '{tmp_path / 'reward'}'",
    ]
    ppo_run = [*start, "train.batch_size = 16", "learning_rate_schedule.base_learning_rate = 1e-3"]
    assert train(tmp_path / "ppo", ppo, *ppo_run, "train.num_steps = 12") == 0
    rows = read_metrics(tmp_path / "ppo" / "train_metrics.jsonl")
    scores = [r["reward_mean"] for r in rows]
    assert np.mean(scores[-3:]) > np.mean(scores[:3]) + 0.5 * np.std(scores[:3]), scores
    assert rows[0]["kl"] == 0.0 and all(abs(r["kl"]) < 10.0 for r in rows), [r["kl"] for r in rows]
    assert all(np.isfinite(r["value_loss"]) and 0 <= r["clip_fraction"] <= 1 for r in rows)
    # A reward model must have a reward head: refused before anything is written.
    assert train(tmp_path / "other", ppo[:2], *ppo_run, f"RewardModel.model_dir = '{trained_dir}'") == 2
    assert "holds a model without a reward head" in capsys.readouterr().err and not (tmp_path / "other").exists()
    # A preference task needs a preference objective (and back), refused before anything is written.
    assert train(tmp_path / "other", dpo, *start, "train.preference = None") == 2
    assert "go together" in capsys.readouterr().err and not (tmp_path / "other").exists()


@pytest.mark.slow
def test_eval_reads_a_run_whose_task_its_gin_registers(trained_dir, tmp_path):
    """A run on your own data registers its task in config.gin; loading the run registers it again."""
    import shutil

    from t5lite import data, inference

    run_dir = tmp_path / "run"
    shutil.copytree(trained_dir, run_dir)
    registration = (
        "train.mixture_or_task_name = @my_text/t5lite.data.register_text_file_task()\n"
        "my_text/t5lite.data.register_text_file_task.name = 't5lite_test_my_text'\n"
        f"my_text/t5lite.data.register_text_file_task.train_files = '{data.corpus_path()}'"
    )
    config_gin = (run_dir / "config.gin").read_text()
    bound = "train.mixture_or_task_name = 't5lite_corpus_span_corruption'"
    assert bound in config_gin
    (run_dir / "config.gin").write_text(config_gin.replace(bound, registration))
    run = inference.load_run(run_dir)
    assert run.task == "t5lite_test_my_text" and run.task_feature_lengths == {"inputs": 64, "targets": 16}
    assert inference.validation_metrics(run, num_batches=1)["loss"] > 0


@pytest.mark.slow
def test_named_step_restore_and_json_metrics(trained_dir):
    from t5lite.train.checkpoint import restore_params

    config, params, step = restore_params(trained_dir)
    assert step == 10 and config.d_model == 64
    assert json.loads((trained_dir / "t5lite_config.json").read_text())["d_model"] == 64
    assert any((trained_dir / "tensorboard" / "train").iterdir())


@pytest.mark.slow
def test_synthetic_copy_reaches_high_exact_match_also_quantised(tmp_path):
    from t5lite import inference

    bindings = [
        "train.mixture_or_task_name = 't5lite_synthetic_copy'",
        "train.num_steps = 300",
        "train.progress = False",
        "train.log_every = 100",
        "train.checkpoint_every = 300",
        "ModelConfig.dtype = 'float32'",
    ]
    args = ["train", "--gin_file=runs/t5_tiny_synthetic.gin", f"--model_dir={tmp_path}"]
    assert cli.main(args + [f"--gin.{b.replace(' = ', '=', 1)}" for b in bindings]) == 0
    results = inference.evaluate_run(inference.load_run(tmp_path), num_batches=1, max_examples=48)
    assert results["metrics"]["t5lite_synthetic_copy"]["exact_match"] >= 80.0, results
    # `t5lite quantize` (GPTQ, 4 bits, calibrated on training batches) writes a run eval takes.
    quantized = tmp_path / "gptq4"
    quantize = [
        "quantize",
        f"--checkpoint={tmp_path}",
        "--method=gptq",
        "--bits=4",
        "--group_size=32",
        "--calibration_batches=1",
    ]
    assert cli.main(quantize + [f"--output={quantized}"]) == 0
    assert cli.main(["eval", f"--model_dir={quantized}", "--batches=1", "--max_examples=24"]) == 0
    gptq = json.loads((quantized / "eval_300.json").read_text())
    assert (
        gptq["metrics"]["t5lite_synthetic_copy"]["exact_match"]
        >= results["metrics"]["t5lite_synthetic_copy"]["exact_match"] - 10.0
    ), (gptq, results)  # over 24, not 48
    assert abs(gptq["validation"]["loss"] - results["validation"]["loss"]) < 0.05, (gptq, results)
    assert cli.main(["eval", f"--model_dir={quantized}", "--step=10"]) == 2  # it holds step 300 only
    assert cli.main(["eval", f"--model_dir={quantized}", "--int8_weights=mlp"]) == 2  # already quantised


@pytest.mark.slow
def test_a_process_restores_the_input_state_of_the_shard_it_reads(tmp_path):
    """Saved streams are named by process and data shard: a process reading a shard that another
    process saved (a tensor group spanning hosts, or a run resumed on more processes) restores it."""
    from t5lite.data import DataStream
    from t5lite.train.checkpoint import saved_stream

    def stream(index):
        return DataStream(
            "t5lite_synthetic_copy",
            split="train",
            task_feature_lengths={"inputs": 8, "targets": 8},
            batch_size=4,
            model_kind="encoder_decoder",
            shard_index=index,
            num_shards=2,
        )

    saved = stream(1)
    for _ in range(3):
        next(saved)
    saved.save(str(tmp_path / "process_1.shard_1_of_2"))  # as process 1 of an earlier run saved it
    assert saved_stream(tmp_path, stream(0)) is None
    found = saved_stream(tmp_path, stream(1))
    assert found.name == "process_1.shard_1_of_2"
    resumed = stream(1)
    resumed.restore(str(found), position=3)
    expected, batch = next(saved), next(resumed)
    assert all(np.array_equal(expected[key], batch[key]) for key in expected)


@pytest.mark.slow
def test_a_run_of_the_flat_config_layout_evaluates_and_resumes(tmp_path):
    """A run directory whose config.gin and t5lite_config.json were written before ModelConfig had
    sub-configs (tests/fixtures/flat_config_run, flat MoE fields) still loads, evaluates and resumes."""
    from t5lite import inference

    old = pathlib.Path(__file__).parent / "fixtures" / "flat_config_run"
    assert cli.main(["train", f"--gin_file={old / 'config.gin'}", f"--model_dir={tmp_path}"]) == 0  # 2 steps
    assert "MoeConfig.num_experts = 4" in (tmp_path / "config.gin").read_text()  # written in today's layout
    for name in ("config.gin", "t5lite_config.json"):
        (tmp_path / name).write_text((old / name).read_text())
    run = inference.load_run(tmp_path)
    assert (run.step, run.model.config.moe.num_experts, run.model.config.adapters.lora_targets) == (2, 4, ("query",))
    assert inference.validation_metrics(run, num_batches=1)["loss"] > 0
    resume = ["train", f"--gin_file={tmp_path / 'config.gin'}", f"--model_dir={tmp_path}", "--gin.train.num_steps=4"]
    assert cli.main(resume) == 0
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]


@pytest.mark.slow
def test_a_diverging_run_stops_before_saving_anything_non_finite(tmp_path, capsys):
    """AdamW at lr 1e3 with a checkpoint every step: the run stops at the first bad step, and every
    checkpoint it kept holds finite parameters (the last of them is the one the message names)."""
    from t5lite.train.checkpoint import restore_params

    diverging = [
        "optimizer.name = 'adamw'",
        "learning_rate_schedule.name = 'constant'",
        "learning_rate_schedule.base_learning_rate = 1000.0",
        "train.checkpoint_every = 1",
        "train.keep_checkpoints = None",
        "train.num_steps = 30",
    ]
    assert train(tmp_path, SPAN, *diverging) == 2
    error = capsys.readouterr().err
    stopped = re.search(
        r"At step (\d+) (the loss became|the gradient norm became|the update made).*the last good "
        r"checkpoint is step (\d+)",
        error,
    )
    assert stopped, error
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == list(range(1, int(stopped[1]))) and int(stopped[3]) == saved[-1]
    for step in saved:
        params = restore_params(tmp_path, step)[1]
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(params)), step


@pytest.mark.slow
def test_a_run_resumed_between_log_points_logs_the_rows_of_an_uninterrupted_one(tmp_path):
    """log_every=5, checkpoint_every=2: rows come at checkpoints too, so a run stopped at step 4 and
    resumed logs at step 5 the average of the steps since the last row, as the run that never stopped."""
    cadence = ["train.log_every = 5", "train.checkpoint_every = 2"]
    assert train(tmp_path / "straight", SPAN, *cadence, "train.num_steps = 6") == 0
    assert train(tmp_path / "resumed", SPAN, *cadence, "train.num_steps = 4") == 0
    assert train(tmp_path / "resumed", SPAN, *cadence, "train.num_steps = 6") == 0
    assert logged_steps(tmp_path / "straight") == logged_steps(tmp_path / "resumed") == [2, 4, 5, 6]
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")


@pytest.mark.slow
def test_a_second_trainer_on_a_running_model_dir_refuses_and_the_first_is_unharmed(tmp_path, capsys):
    run = tmp_path / "run"
    first = start_training(run, ["train.num_steps = 16"], checkpoint_every=2)
    wait_for(first, lambda: logged_rows(run) >= 3)
    before = logged_steps(run)
    assert train(run, SPAN, "train.num_steps = 16", "train.checkpoint_every = 2") == 2
    assert "is being trained by pid" in capsys.readouterr().err
    output = first.communicate(timeout=300)[0]
    assert first.returncode == 0, output[-3000:]
    assert logged_steps(run) == list(range(1, 17)) and logged_steps(run)[: len(before)] == before
    assert (run / "checkpoints" / "16").is_dir()


@pytest.mark.slow
def test_a_changed_schedule_resumes_only_when_allowed_and_each_start_is_kept(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, SPAN, "train.num_steps = 2") == 0
    faster = ["train.num_steps = 4", "learning_rate_schedule.base_learning_rate = 0.5"]
    assert train(run, SPAN, *faster) == 2
    assert "learning_rate_schedule.base_learning_rate: 1.0 there, 0.5 here" in capsys.readouterr().err
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    assert train(run, SPAN, *faster, flags=["--allow_config_change"]) == 0
    assert "Resuming with changed settings: learning_rate_schedule.base_learning_rate" in capsys.readouterr().out
    starts = {p.name: p.read_text() for p in (run / "starts").iterdir()}
    assert sorted(starts) == ["0.gin", "2.gin"]
    assert "base_learning_rate = 1.0" in starts["0.gin"] and "base_learning_rate = 0.5" in starts["2.gin"]
    # A larger batch continues after the 32 rows (4 steps of 8) the run had read (the state it saves
    # then fits a stream built the same way: tests/data/test_data_stream.py).
    bigger = ["train.num_steps = 6", "train.batch_size = 16", "learning_rate_schedule.base_learning_rate = 0.5"]
    assert train(run, SPAN, *bigger, flags=["--allow_config_change"]) == 0
    assert "continuing after the 32 rows the run had read" in capsys.readouterr().out
    assert logged_steps(run)[-1] == 6


def test_an_empty_validation_split_is_refused_before_the_first_step(tmp_path, capsys):
    """Six lines: the train split has them all; with evaluation on, the run stops before it starts."""
    text = tmp_path / "six.txt"
    text.write_text("".join(f"line number {i} of a file far too small to hold out any of it\n" for i in range(6)))
    task = [
        "train.mixture_or_task_name = @six/t5lite.data.register_text_file_task()",
        "six/t5lite.data.register_text_file_task.name = 'test_six_lines'",
        f"six/t5lite.data.register_text_file_task.train_files = '{text}'",
        "six/t5lite.data.register_text_file_task.objective = 'prefix_lm'",
    ]
    assert train(tmp_path / "run", SPAN, *task, "train.eval_every = 2", "train.num_steps = 4") == 2
    assert "split 'validation' yields no examples" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_metrics_without_checkpoints_are_not_silently_restarted(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    rows = "".join(json.dumps({"step": step, "loss": 5.0}) + "\n" for step in range(1, 13))
    (run / "train_metrics.jsonl").write_text(rows)
    (run / "checkpoints").mkdir()  # emptied, say, by a cleanup script
    assert train(run, SPAN, "train.num_steps = 20", "train.checkpoint_every = 10") == 2
    assert "holds metrics to step 12 but no checkpoint" in capsys.readouterr().err
    assert (run / "train_metrics.jsonl").read_text() == rows
