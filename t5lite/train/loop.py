"""The training loop behind `t5lite train`: set a run up, then step, log, checkpoint and evaluate.

Setting up checks everything a run can get wrong (config, lengths, vocabulary, data, an
incompatible model dir, a checkpoint of another run) before anything in the model dir is
written, then restores the run or starts it. The loop keeps metrics on device and fetches them
only at logging / checkpoint steps; a non-finite loss stops the run before the next checkpoint,
so the last saved one stays good; SIGTERM or Ctrl-C stops it after the current step, saved.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import re
from collections.abc import Callable

import gin
import jax
import optax
import tqdm

from t5lite import data as t5data
from t5lite import hardware
from t5lite.config import ModelConfig, binding_values
from t5lite.models import pipeline
from t5lite.sharding import MeshShape, Partitioner, abstract_with_shardings
from t5lite.train import checkpoint as ckpt
from t5lite.train import metrics as metrics_lib
from t5lite.train import preemption
from t5lite.train.console import Console
from t5lite.train.distillation import Teacher, teacher_for
from t5lite.train.evaluation import evaluate
from t5lite.train.loss_scale import LossScaling
from t5lite.train.preference import Preference
from t5lite.train.pretrained import pretrained_params
from t5lite.train.rl import PolicyGradient, rl_step
from t5lite.train.run_lock import RunLock
from t5lite.train.spec import RunSpec
from t5lite.train.step import TrainState, init_state, sharded_eval_step, sharded_train_step, train_step

# Fields that may differ between a model dir's config and a resumed run's: they change how the
# same parameters are computed, not which parameters there are.
RESUMABLE_FIELDS = ("dtype", "dropout_rate", "remat_policy", "pipeline_microbatches", "pipeline_repeats")
# Gin bindings a resumed run may change: how long it runs, how it logs, saves and evaluates, the mesh
# it runs on, and the model's settings (compared field by field through t5lite_config.json instead).
RESUMABLE_BINDINGS = re.compile(
    r"^(train\.(num_steps|log_every|checkpoint_every|keep_checkpoints|eval_every|eval_batches|progress|"
    r"peak_flops_per_device|skip_nonfinite_steps|mesh_shape)|MeshShape\.|"
    r"(ModelConfig|MoeConfig|WeightQuantConfig|AdapterConfig)\.)"
)
STARTS_DIR = "starts"  # the config.gin of every start of a run, by the step it started from


def train(model_dir: str, spec: RunSpec | None = None, allow_config_change: bool = False) -> dict[str, float]:
    """Trains (or resumes) `spec` (default: the run the parsed gin config binds) in `model_dir`;
    returns the last logged training metrics. Raises `preemption.Interrupted` when SIGTERM or
    Ctrl-C stopped it, its checkpoint saved. A resumed run whose gin settings differ from those it
    was saved with (but for RESUMABLE_BINDINGS) is refused, unless `allow_config_change`."""
    spec = spec or RunSpec.from_gin()
    model_dir = pathlib.Path(model_dir).absolute()
    lock = RunLock(model_dir)
    try:
        if model_dir.is_dir() and jax.process_index() == 0:
            lock.acquire()  # before anything reads (or cleans up) its checkpoints
        return _train(model_dir, spec, lock, allow_config_change)
    finally:
        lock.release()


def _train(model_dir: pathlib.Path, spec: RunSpec, lock: RunLock, allow_config_change: bool) -> dict[str, float]:
    """`train` once the model dir is locked, if it exists; a new one is locked as it is created."""
    config = spec.model_config
    teacher = teacher_for(spec.distillation, config, spec.num_steps) if spec.distillation else None
    step = TrainStep.for_run(spec, teacher)
    check_model_dir(model_dir, config)
    checkpoints = None
    if (model_dir / "checkpoints").is_dir():
        checkpoints = ckpt.TrainCheckpoints(model_dir, spec.checkpoint_every, spec.keep_checkpoints)
    resume_step, state = checkpoints.latest_step() if checkpoints else None, None
    if resume_step is not None:
        check_settings(model_dir, allow_config_change)
        resume_step, state = checkpoints.restore_newest_intact(step.abstract_state)
    else:
        check_not_orphaned(model_dir, spec)
    # A DPO or RL run's reference is its step-0 model, rebuilt from init_from when it resumes.
    rebuild = resume_step is None or spec.reference_config is not None
    pretrained = pretrained_params(config, spec.init_from) if spec.init_from and rebuild else None
    teacher_arrays = ckpt.frozen_params(spec.distillation.teacher) if teacher else None
    data_shard = step.partitioner.data_shard(spec.batch_size)
    stream = _train_stream(spec, data_shard, checkpoints, resume_step, allow_config_change)
    first_batch = next(stream)  # an empty dataset fails here, before anything is written
    if spec.eval_every:  # so does an empty validation split, instead of at the first evaluation
        spec.data_stream("validation", data_shard, shuffle=False, repeat=False)

    if jax.process_index() == 0:
        model_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        (model_dir / "config.gin").write_text(gin.config_str())
        (model_dir / STARTS_DIR).mkdir(exist_ok=True)
        (model_dir / STARTS_DIR / f"{resume_step or 0}.gin").write_text(gin.config_str())
        (model_dir / ckpt.CONFIG_FILE).write_text(config.to_json())
    checkpoints = checkpoints or ckpt.TrainCheckpoints(model_dir, spec.checkpoint_every, spec.keep_checkpoints)
    # Measured (where no peak is known) on one local device, outside the mesh context.
    peak = (
        spec.peak_flops_per_device
        or hardware.peak_flops_per_device(jax.devices()[0])
        or metrics_lib.measure_peak_flops()
    )
    with step.partitioner.context():
        key = jax.random.PRNGKey(spec.seed)
        if state is None:
            state = init_state(
                config, step.tx, key, step.state_shardings, spec.trainable_params, pretrained, step.loss_scaling
            )
        references = ()  # the frozen models the step also runs: a teacher, or a reference and a reward model
        if teacher is not None:
            references = (teacher_arrays,)
        if spec.reference_config is not None:
            references = (
                init_state(config, step.tx, key, step.state_shardings, spec.trainable_params, pretrained).params,
            )
        if spec.reward_config is not None:
            references += (ckpt.frozen_params(spec.rl.reward.model_dir),)
        references = tuple(map(jax.device_put, references, step.frozen_shardings))
        loop = StepLoop(
            model_dir,
            spec,
            step,
            stream,
            data_shard,
            checkpoints,
            references,
            spec.flops_per_step(teacher.config if teacher else None),
            peak,
        )
        return loop.run(state, first_batch)


def check_model_dir(model_dir: pathlib.Path, config: ModelConfig) -> None:
    """A model dir that already holds another architecture is refused before anything is written."""
    saved_file = model_dir / ckpt.CONFIG_FILE
    if not saved_file.is_file():
        return
    saved = ModelConfig.from_json(saved_file.read_text())
    details = saved.differences(config, RESUMABLE_FIELDS)
    if details:
        raise ValueError(
            f"{model_dir} holds a run of a different model ({details}). Use a new --model_dir, or the "
            f"gin config that run used ({model_dir / 'config.gin'})."
        )


def check_not_orphaned(model_dir: pathlib.Path, spec: RunSpec) -> None:
    """Metrics past the first checkpoint step but no checkpoint: the run's checkpoints are gone, and
    starting over would silently replace its history."""
    metrics = model_dir / "train_metrics.jsonl"
    rows = metrics_lib.read_metrics(metrics) if metrics.is_file() else []
    if rows and rows[-1]["step"] >= spec.checkpoint_every:
        raise ValueError(
            f"{model_dir} holds metrics to step {rows[-1]['step']} but no checkpoint (checkpoints/ is empty or "
            f"gone). Restore its checkpoints, or use a new --model_dir (or delete {metrics.name} to start over here)."
        )


def check_settings(model_dir: pathlib.Path, allow_config_change: bool) -> None:
    """A resumed run's gin settings against those its model dir was last run with: a change that breaks
    exact resume (batch, task, optimizer, schedule, ...) is refused naming it, or reported when allowed."""
    saved_file = model_dir / "config.gin"
    if not saved_file.is_file():
        return
    saved, now = binding_values(saved_file.read_text()), binding_values(gin.config_str())
    changed = [
        f"{name}: {saved.get(name, '(unbound)')} there, {now.get(name, '(unbound)')} here"
        for name in sorted(set(saved) | set(now))
        if saved.get(name) != now.get(name) and not RESUMABLE_BINDINGS.match(name)
    ]
    if not changed:
        return
    if not allow_config_change:
        raise ValueError(
            f"{model_dir} was trained with other settings ({'; '.join(changed)}); resuming with these would not "
            f"continue that run. Resume with its config.gin, start a new run (train.init_from takes its "
            f"parameters), or pass --allow_config_change (each start's settings are kept in {STARTS_DIR}/)."
        )
    print(f"Resuming with changed settings: {'; '.join(changed)}.", flush=True)


def _train_stream(
    spec: RunSpec,
    data_shard: tuple[int, int],
    checkpoints: ckpt.TrainCheckpoints | None,
    resume_step: int | None,
    rebatch: bool = False,
) -> t5data.DataStream:
    """This process's training data, where the resumed run left it, checked against the model and objective."""
    stream = spec.data_stream("train", data_shard)
    if resume_step is not None:
        checkpoints.restore_stream(stream, resume_step, rebatch)
    t5data.check_vocabulary_fits(stream.vocabulary, spec.model_config.vocab_size)
    if stream.pairs != (spec.preference is not None):
        raise ValueError(
            f"Task {spec.mixture_or_task_name!r} {'holds' if stream.pairs else 'has no'} preference "
            f"pairs; train.preference=@Preference() and a preference task (e.g. t5lite_preferences) "
            f"go together."
        )
    return stream


@dataclasses.dataclass
class StepLoop:
    """The steps of a set-up run, from its state's step to `spec.num_steps`: logging, saving and
    evaluating at their cadences, stopping early (saved) when asked to."""

    model_dir: pathlib.Path
    spec: RunSpec
    step: TrainStep
    stream: t5data.DataStream
    data_shard: tuple[int, int]
    checkpoints: ckpt.TrainCheckpoints
    references: tuple  # the frozen model's parameters, when the step runs one
    flops_per_step: float
    peak_flops_per_device: float

    def run(self, state: TrainState, first_batch) -> dict[str, float]:
        spec, partitioner, start = self.spec, self.step.partitioner, int(state.step)
        primary = jax.process_index() == 0
        writers = (
            {split: metrics_lib.MetricsWriter(self.model_dir, split, after_step=start) for split in ("train", "eval")}
            if primary
            else {}
        )
        bar = tqdm.tqdm(
            total=spec.num_steps,
            initial=start,
            disable=not (spec.progress and primary),
            unit="step",
            dynamic_ncols=True,
        )
        tokens_per_step = spec.rows_per_step * sum(spec.lengths)
        console = Console(self.model_dir, spec.progress and primary)
        checkpoint_dir = self.checkpoints.manager.directory
        console.started(
            start,
            spec.num_steps,
            checkpoint_dir / str(start) if start else None,
            f"batch {spec.batch_size}, lengths {spec.task_feature_lengths}, {partitioner.mesh.size} device(s)",
        )
        step_metrics = metrics_lib.StepMetrics(
            self.flops_per_step,
            tokens_per_step,
            partitioner.mesh.size,
            self.peak_flops_per_device,
            spec.skip_nonfinite_steps,
        )
        global_batch = functools.partial(partitioner.global_batch, batch_size=spec.batch_size)
        eval_fn = sharded_eval_step(partitioner, self.step.state_shardings.params, spec.model_config)
        dropout_rng = jax.device_put(jax.random.fold_in(jax.random.PRNGKey(spec.seed), 1), partitioner.replicated)
        batch, last, interrupted = global_batch(first_batch), {}, None
        try:
            with preemption.StopRequests() as stop:
                for done in range(start + 1, spec.num_steps + 1):
                    state, metrics = self.step.fn(state, batch, dropout_rng, *self.references)
                    step_metrics.add(done, metrics)
                    stopping = stop.now(done)
                    end = done == spec.num_steps or stopping
                    saving = done % spec.checkpoint_every == 0 or end
                    evaluating = spec.eval_every and (done % spec.eval_every == 0 or done == spec.num_steps)
                    # Rows at checkpoints too: a resumed run's first row then averages its own steps only.
                    logging = done % spec.log_every == 0 or saving
                    if logging or evaluating:  # what is saved or evaluated is finite, or the run stops here
                        step_metrics.fetch(self.checkpoints.latest_step())
                    if logging:
                        last = step_metrics.summary()
                        self._log(writers, bar, done, last)
                    if saving:
                        if self.checkpoints.save(done, state, self.stream, force=end):
                            console.saved(done, checkpoint_dir / str(done))
                        for writer in writers.values():
                            writer.sync()
                    if evaluating:
                        results = evaluate(
                            state.params, spec, eval_fn, spec.eval_batches, global_batch, self.data_shard
                        )
                        if writers:
                            writers["eval"].write(done, results)
                        console.evaluated(done, results)
                    bar.update(1)
                    if stopping and done < spec.num_steps:
                        interrupted = preemption.Interrupted(done, stop.signum)
                        break
                    if done < spec.num_steps:
                        batch = global_batch(next(self.stream))
        finally:
            bar.close()
            self.checkpoints.close()
        if interrupted:
            raise interrupted
        console.finished(spec.num_steps, tokens_per_step, last)
        return last

    @staticmethod
    def _log(writers, bar, step: int, metrics: dict[str, float]) -> None:
        if writers:
            writers["train"].write(step, metrics)
        bar.set_postfix(
            loss=f"{metrics['loss']:.3f}",
            tok_s=f"{metrics.get('tokens_per_s', 0):.0f}",
            mfu=f"{metrics.get('mfu', 0):.1%}",
        )


def _check_teacher_stages(teacher: Teacher, stages: int) -> None:
    """A distillation teacher runs through the student's pipeline stages, if there are any."""
    pipeline.check_schedule(teacher.config, stages)
    if stages > 1 and teacher.hidden_weight:
        raise ValueError(
            f"Distillation.hidden_weight compares layer outputs, which pipeline stages (stage={stages}) do not "
            f"keep; set hidden_weight=0 or MeshShape.stage=1."
        )


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """The sharded train step of a run and what it needs: `train` runs it, `t5lite compile`
    compiles it ahead of time for a TPU topology."""

    partitioner: Partitioner
    tx: optax.GradientTransformation
    abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings
    state_shardings: TrainState
    fn: Callable
    frozen_shardings: tuple = ()  # of the frozen models' parameters (RunSpec.frozen_configs)
    loss_scaling: LossScaling | None = None  # the state then holds the loss scale

    @classmethod
    def for_run(cls, spec: RunSpec, teacher: Teacher | None = None, devices=None) -> TrainStep:
        """The step `spec` trains with (`teacher`: its distillation teacher, `distillation.teacher_for`),
        over `devices` (default: all devices of all processes)."""
        return cls.create(
            spec.model_config,
            spec.mesh_shape,
            spec.tx(),
            spec.learning_rate,
            seed=spec.seed,
            batch_size=spec.batch_size,
            num_microbatches=spec.num_microbatches,
            z_loss=spec.z_loss,
            label_smoothing=spec.label_smoothing,
            trainable=spec.trainable_params,
            teacher=teacher,
            preference=spec.preference,
            rl=spec.rl,
            kind=spec.kind,
            max_new_tokens=spec.task_feature_lengths["targets"],
            frozen=spec.frozen_configs(teacher.config if teacher else None),
            reward_config=spec.reward_config,
            skip_nonfinite=bool(spec.skip_nonfinite_steps),
            loss_scaling=spec.loss_scaling,
            devices=devices,
        )

    @classmethod
    def create(
        cls,
        config: ModelConfig,
        mesh_shape: MeshShape,
        tx: optax.GradientTransformation,
        schedule: Callable,
        *,
        seed: int,
        batch_size: int,
        num_microbatches: int,
        z_loss: float,
        label_smoothing: float,
        trainable: str | None = None,
        teacher: Teacher | None = None,
        preference: Preference | None = None,
        rl: PolicyGradient | None = None,
        kind: str | None = None,
        max_new_tokens: int | None = None,
        frozen: tuple[ModelConfig, ...] | None = None,
        reward_config: ModelConfig | None = None,
        skip_nonfinite: bool = False,
        loss_scaling: LossScaling | None = None,
        devices=None,
    ) -> TrainStep:
        """`frozen`: the configs of the frozen models the step runs (RunSpec.frozen_configs); default:
        the teacher's, if there is one. An RL step (`rl`) samples `max_new_tokens` for `kind` prompts."""
        partitioner = Partitioner.create(config, mesh_shape, devices)
        partitioner.check_batch(batch_size, num_microbatches)
        if teacher is not None:
            _check_teacher_stages(teacher, partitioner.mesh.shape["stage"])
        abstract = jax.eval_shape(
            functools.partial(init_state, config, tx, trainable=trainable, loss_scaling=loss_scaling),
            jax.random.PRNGKey(seed),
        )
        state_shardings = partitioner.state(abstract, partitioner.params(config), trainable)
        # The loss scale's scalars are replicated, like the step counter.
        state_shardings = state_shardings.replace(
            loss_scale=jax.tree.map(lambda _: partitioner.replicated, abstract.loss_scale)
        )
        if frozen is None:
            frozen = (teacher.config,) if teacher else ()
        frozen_shardings = tuple(partitioner.params(c) for c in frozen)
        if rl is None:
            step_fn, objective = (
                train_step,
                dict(
                    num_microbatches=num_microbatches,
                    z_loss=z_loss,
                    label_smoothing=label_smoothing,
                    teacher=teacher,
                    preference=preference,
                    loss_scaling=loss_scaling,
                ),
            )
        else:
            step_fn, objective = (
                rl_step,
                dict(rl=rl, kind=kind, max_new_tokens=max_new_tokens, reward_config=reward_config),
            )
        fn = sharded_train_step(
            partitioner,
            state_shardings,
            frozen_shardings,
            step_fn,
            config=config,
            tx=tx,
            schedule=schedule,
            trainable=trainable,
            skip_nonfinite=skip_nonfinite,
            **objective,
        )
        return cls(
            partitioner,
            tx,
            abstract_with_shardings(abstract, state_shardings),
            state_shardings,
            fn,
            frozen_shardings,
            loss_scaling,
        )
