"""Loss scaling for float16 training: the scale's rule, skipped overflowing steps, exact unscaling, a
float16 run that recovers from a scale far too large, the settings a run refuses, and the scale
logged and resumed through `t5lite train`."""

import functools
import pathlib
import shutil
import sys

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from t5lite.train import optimizers
from t5lite.train.loss_scale import MIN_SCALE, LossScaling
from t5lite.train.spec import RunSpec
from t5lite.train.step import eval_step, init_state, train_step

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_train_step import CONFIG, batch, step_values  # noqa: E402 (the tiny float32 encoder-decoder and its batches)


def test_the_dynamic_scale_halves_at_an_overflow_and_doubles_after_a_run_of_finite_steps():
    scaling = LossScaling(dynamic=True, initial=8.0, growth_interval=3)
    finite = [1, 1, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1]
    # After each step: the scale and the finite steps in a row since it last changed.
    expected = [
        (8, 1), (8, 2), (4, 0), (4, 1), (4, 2), (8, 0), (8, 1), (4, 0),
        (2, 0), (1, 0), (1, 0), (1, 0), (1, 1), (1, 2), (2, 0),
    ]  # fmt: skip
    state, seen = scaling.init(), []
    update = jax.jit(scaling.update)
    for ok in finite:
        state = update(state, np.bool_(ok))
        seen.append((float(state.scale), int(state.finite_steps)))
    assert seen == expected
    assert int(state.overflows) == finite.count(0) and MIN_SCALE == 1.0
    fixed = LossScaling(dynamic=False, initial=8.0)
    assert fixed.update(fixed.init(), np.bool_(False)) == fixed.init()


def step_fn(config, schedule, tx, loss_scaling, **kwargs):
    return jax.jit(
        functools.partial(train_step, config=config, tx=tx, schedule=schedule, loss_scaling=loss_scaling, **kwargs)
    )


def test_an_overflowing_step_changes_nothing_but_the_step_and_halves_the_scale():
    """float16 at a scale of 2^40: the backward pass overflows. Parameters and optimizer state stay
    bit for bit; the step counts, the scale halves, and the step is no error (`finite`)."""
    config = CONFIG.replace(dtype="float16")
    schedule = optimizers.learning_rate_schedule("constant", 1e-2)
    tx = optimizers.optimizer("adamw", schedule)
    scaling = LossScaling(dynamic=True, initial=2.0**40)
    state = init_state(config, tx, jax.random.PRNGKey(0), loss_scaling=scaling)
    before = jax.device_get(state)
    after, metrics = step_fn(config, schedule, tx, scaling)(state, batch(), jax.random.PRNGKey(1))
    assert np.isfinite(metrics["loss"]) and not np.isfinite(metrics["grad_norm"])
    assert metrics["overflow"] and metrics["finite"] and int(after.step) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(after.params), before.params)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(after.opt_state), before.opt_state)
    assert float(after.loss_scale.scale) == float(metrics["loss_scale"]) == 2.0**39
    assert int(after.loss_scale.overflows) == int(metrics["loss_scale_overflows"]) == 1


@pytest.mark.parametrize("dynamic, num_microbatches", [(True, 2), (False, 1)], ids=["dynamic-accumulated", "fixed"])
def test_unscaled_gradients_are_the_gradients_of_the_unscaled_loss(dynamic, num_microbatches):
    """A float32 model scaled by 2^10 takes the step of the unscaled one (gradients unscaled once,
    after accumulating microbatches): the same gradient norm and parameters, up to float32 rounding."""
    schedule = optimizers.learning_rate_schedule("constant", 1.0)
    tx = optax.sgd(schedule)  # the update is the gradient
    scaling = LossScaling(dynamic=dynamic, initial=2.0**10)
    results = []
    for loss_scaling in (None, scaling):
        state = init_state(CONFIG, tx, jax.random.PRNGKey(0), loss_scaling=loss_scaling)
        step = step_fn(CONFIG, schedule, tx, loss_scaling, num_microbatches=num_microbatches)
        results.append(jax.device_get(step(state, batch(), jax.random.PRNGKey(1))))
    (plain, plain_metrics), (scaled, scaled_metrics) = results
    assert float(plain_metrics["grad_norm"]) > 0
    np.testing.assert_allclose(scaled_metrics["grad_norm"], plain_metrics["grad_norm"], rtol=1e-6)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7), scaled.params, plain.params)
    assert float(scaled.loss_scale.scale) == 2.0**10 and not scaled_metrics["overflow"]


def test_overflowed_steps_are_left_out_of_the_means_and_stop_a_run_only_at_the_smallest_scale():
    """A row averages the steps that updated the model, counts the overflowed ones as skipped and
    logs the last step's scale; a step that overflows at the smallest scale stops the run."""
    from t5lite.train.metrics import StepMetrics

    def scaled_step(loss, scale, overflows, overflow=False):
        values = step_values(loss, grad_norm=np.inf if overflow else 1.0)
        return {**values, "finite": True, "overflow": overflow, "loss_scale": scale, "loss_scale_overflows": overflows}

    metrics = StepMetrics(1.0, 10, 1, 1.0)
    for step, values in enumerate([scaled_step(2.0, 4, 0), scaled_step(3.0, 2, 1, True), scaled_step(4.0, 2, 1)], 1):
        metrics.add(step, values)
    metrics.fetch(last_checkpoint=None)
    summary = metrics.summary()
    assert (summary["loss"], summary["grad_norm"], summary["skipped_steps"]) == (3.0, 1.0, 1)
    assert (summary["loss_scale"], summary["loss_scale_overflows"]) == (2, 1)
    metrics.add(4, {**scaled_step(5.0, 1, 2), "grad_norm": np.float32(np.inf), "finite": False})
    with pytest.raises(FloatingPointError, match="At step 4 the gradient norm became inf with the loss scale at 1"):
        metrics.fetch(last_checkpoint=2)


def train_curve(config, scaling, steps, lr=3e-3):
    """(state, per-step metrics) of `steps` AdamW steps over four batches, in turn."""
    schedule = optimizers.learning_rate_schedule("constant", lr)
    tx = optimizers.optimizer("adamw", schedule)
    state = init_state(config, tx, jax.random.PRNGKey(0), loss_scaling=scaling)
    step = step_fn(config, schedule, tx, scaling)
    curve = []
    for i in range(steps):
        state, metrics = step(state, batch(8, seed=i % 4), jax.random.PRNGKey(1))
        curve.append(metrics)
    return state, jax.device_get(curve)


def validation_loss(params):
    """Mean token loss over the four training batches, in float32."""
    evaluate = jax.jit(functools.partial(eval_step, config=CONFIG))
    sums = [evaluate(params, batch(8, seed=seed)) for seed in range(4)]
    return sum(float(s["loss_sum"]) for s in sums) / sum(float(s["weight"]) for s in sums)


def test_a_float16_run_that_overflows_at_first_recovers_and_tracks_its_float32_twin():
    """Starting at 2^24, the first steps overflow and are skipped while the scale comes down; then no
    step overflows, and after 30 steps the model is as good (within 10%) as a float32 twin that took
    as many updates."""
    steps = 30
    half, curve = train_curve(CONFIG.replace(dtype="float16"), LossScaling(dynamic=True, initial=2.0**24), steps)
    overflows = [bool(m["overflow"]) for m in curve]
    skipped = sum(overflows)
    assert 0 < skipped < steps // 2 and overflows[:skipped] == [True] * skipped, overflows
    assert int(half.loss_scale.overflows) == skipped and float(half.loss_scale.scale) == 2.0 ** (24 - skipped)
    assert all(m["finite"] for m in curve)
    full, twin = train_curve(CONFIG, None, steps - skipped)
    ours, theirs = validation_loss(half.params), validation_loss(full.params)
    assert theirs < 0.6 * twin[0]["loss"], (twin[0]["loss"], theirs)  # the twin learned something to track
    assert abs(ours - theirs) <= 0.1 * theirs, (ours, theirs)


def spec(**settings):
    schedule = optimizers.learning_rate_schedule("constant", 1e-3)
    run = dict(
        model_config=CONFIG,
        mixture_or_task_name="t5lite_span_corruption",
        task_feature_lengths={"inputs": 16, "targets": 8},
        batch_size=4,
        num_steps=1,
        learning_rate=schedule,
        optimizer=functools.partial(optimizers.optimizer, "adamw"),
    )
    return RunSpec(**{**run, **settings})


def test_float16_takes_loss_scaling_and_the_spec_reads_its_settings():
    assert spec().loss_scaling is None
    dynamic = spec(model_config=CONFIG.replace(dtype="float16"), loss_scale="dynamic").loss_scaling
    assert dynamic == LossScaling(dynamic=True, initial=2.0**15, growth_interval=2000)
    fixed = spec(model_config=CONFIG.replace(dtype="float16"), loss_scale=1024).loss_scaling
    assert fixed == LossScaling(dynamic=False, initial=1024.0)
    tuned = spec(loss_scale="dynamic", loss_scale_initial=256.0, loss_scale_growth_interval=50).loss_scaling
    assert tuned == LossScaling(dynamic=True, initial=256.0, growth_interval=50)


@pytest.mark.parametrize(
    "settings, message",
    [
        (
            dict(model_config=CONFIG.replace(dtype="float16")),
            r"dtype='float16' needs loss scaling.*set train.loss_scale='dynamic'",
        ),
        (dict(loss_scale="dynamc"), r"train.loss_scale='dynamc' must be None \(no loss scaling\), 'dynamic'"),
        (dict(loss_scale=0.0), "train.loss_scale=0.0 must be None"),
        (dict(loss_scale=float("inf")), "train.loss_scale=inf must be None"),
        (dict(loss_scale=True), "train.loss_scale=True must be None"),
        (dict(loss_scale="dynamic", loss_scale_initial=0.5), r"train.loss_scale_initial=0.5 must be a number from 1"),
        (
            dict(loss_scale="dynamic", loss_scale_growth_interval=0),
            "train.loss_scale_growth_interval=0 must be a positive",
        ),
    ],
)
def test_float16_without_loss_scaling_and_bad_loss_scales_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        spec(**settings)


@pytest.mark.parametrize(
    "bindings, message",
    [
        (["ModelConfig.dtype = 'float16'"], "needs loss scaling, or small gradients underflow"),
        (["train.loss_scale = 'static'"], "train.loss_scale='static' must be None (no loss scaling), 'dynamic'"),
    ],
)
def test_t5lite_train_refuses_float16_without_loss_scaling_before_writing_anything(tmp_path, bindings, message, capsys):
    from test_train_loop import SPAN, train

    assert train(tmp_path / "run", SPAN, *bindings) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_loss_scale_is_logged_and_a_resumed_run_continues_with_the_one_it_saved(tmp_path):
    """float16 through `t5lite train`, starting at 2^20 so that the first steps overflow: rows log the
    scale and the skipped steps, each checkpoint holds the scale, and a run resumed from step 4 logs
    the rows (scale included) of the run that went straight on."""
    from test_train_loop import SPAN, logged_rows, train

    from t5lite.train.metrics import read_metrics

    fp16 = [
        "ModelConfig.dtype = 'float16'",
        "train.loss_scale = 'dynamic'",
        "train.loss_scale_initial = 1048576.0",
        "train.num_steps = 6",
        "train.checkpoint_every = 2",
        "train.keep_checkpoints = None",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(straight, SPAN, *fp16) == 0
    rows = read_metrics(straight / "train_metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(1, 7)) and logged_rows(straight) == 6
    assert rows[0]["loss_scale"] == 2.0**19 and rows[0]["skipped_steps"] == 1
    assert rows[-1]["loss_scale"] <= 2.0**16, rows  # (2^15 or 2^14 is where it settles)
    assert rows[-1]["loss_scale_overflows"] == sum(row["skipped_steps"] for row in rows)
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(straight / "checkpoints" / "4" / "state")
    assert float(state["loss_scale"]["scale"]) == rows[3]["loss_scale"]
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "6")
    assert train(resumed, SPAN, *fp16) == 0
    assert sorted(path.name for path in (resumed / "starts").iterdir()) == ["0.gin", "4.gin"]  # resumed at 4
    assert measured(read_metrics(resumed / "train_metrics.jsonl")) == measured(rows)


def measured(rows):
    """Logged rows without their timings."""
    timings = ("step_time_s", "tokens_per_s", "target_tokens_per_s", "tflops_per_device", "mfu")
    return [{name: value for name, value in row.items() if name not in timings} for row in rows]
