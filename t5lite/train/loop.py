"""The training loop behind `t5lite train`: validate, resume, step, log, checkpoint, evaluate.

Everything a run can get wrong (config, lengths, vocabulary, data, an incompatible
model dir) is checked before anything in the model dir is written. The loop keeps
metrics on device and fetches them only at logging / checkpoint steps; a non-finite
loss stops the run before the next checkpoint, so the last saved one stays good.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any, Callable

import gin
import jax
import numpy as np
import optax
import tqdm

from t5lite import data as t5data
from t5lite.config import ModelConfig
from t5lite.scaling import flops
from t5lite.train import checkpoint as ckpt
from t5lite.train import metrics as metrics_lib
from t5lite.train import preemption
from t5lite.sharding import MeshShape, Partitioner, abstract_with_shardings
from t5lite.models.params import param_axes, trainable_pattern
from t5lite.train.distillation import Distillation, Teacher, load_teacher
from t5lite.train.preference import Preference
from t5lite.train.pretrained import pretrained_params
from t5lite.train.step import TrainState, init_state, sharded_eval_step, sharded_train_step

# Fields that may differ between a model dir's config and a resumed run's: they change how the
# same parameters are computed, not which parameters there are.
RESUMABLE_FIELDS = ("dtype", "dropout_rate", "remat_policy")


def model_lengths(kind: str, task_feature_lengths: dict[str, int]) -> tuple[int, int]:
    """(encoder length, decoder length) the model sees for the task's feature lengths."""
    if kind == "encoder_decoder":
        return task_feature_lengths["inputs"], task_feature_lengths["targets"]
    if kind in t5data.PROMPTED_KINDS:
        return 0, task_feature_lengths["inputs"] + task_feature_lengths["targets"]
    return 0, task_feature_lengths["targets"]


def check_run(config: ModelConfig, kind: str, task_feature_lengths: dict[str, int], batch_size: int,
              num_microbatches: int, pack: bool) -> None:
    if kind not in t5data.MODEL_KINDS:
        raise ValueError(f"train.model_kind={kind!r} is not supported. Allowed values: "
                         f"{', '.join(t5data.MODEL_KINDS)}.")
    if config.is_encoder_decoder != (kind == "encoder_decoder"):
        raise ValueError(f"train.model_kind={kind!r} does not fit ModelConfig.architecture="
                         f"{config.architecture!r}: encoder_decoder models take encoder_decoder data, decoders "
                         f"take decoder, prefix_lm or causal_prefix_lm data.")
    needed = {"targets"} if kind == "decoder" else {"inputs", "targets"}
    if not needed <= set(task_feature_lengths):
        raise ValueError(f"train.task_feature_lengths={task_feature_lengths} must give lengths for {sorted(needed)} "
                         f"with model_kind={kind!r}.")
    if config.position_encoding == "learned" and max(model_lengths(kind, task_feature_lengths)) > config.max_length:
        raise ValueError(f"Sequences of {max(model_lengths(kind, task_feature_lengths))} tokens are longer than the "
                         f"model's learned position table (ModelConfig.max_length={config.max_length}); shorten "
                         f"train.task_feature_lengths or raise max_length.")
    if config.prompt_length and pack:
        raise ValueError(f"ModelConfig.prompt_length={config.prompt_length}: every row needs its own soft prompt; "
                         f"set train.pack=False.")
    processes = jax.process_count()
    if batch_size % (processes * num_microbatches):
        raise ValueError(f"train.batch_size={batch_size} must divide evenly over {processes} process(es) and "
                         f"num_microbatches={num_microbatches}.")


def check_objectives(config: ModelConfig, distillation, preference, num_microbatches: int,
                     eval_every: int | None) -> None:
    """What preference training needs, and cannot be combined with (yet)."""
    if preference is None:
        return
    preference.check(config)
    if distillation is not None:
        raise ValueError("train.preference and train.distillation are two objectives; choose one.")
    if num_microbatches != 1:
        raise ValueError(f"train.preference scores pairs of neighbouring rows, which microbatches would split; "
                         f"set train.num_microbatches=1 (it is {num_microbatches}).")
    if eval_every:
        raise ValueError("train.preference logs its pair accuracy and margin while training; validation measures "
                         "token loss, which DPO does not optimise: set train.eval_every=None.")


def check_model_dir(model_dir: pathlib.Path, config: ModelConfig) -> None:
    """A model dir that already holds another architecture is refused before anything is written."""
    saved_file = model_dir / ckpt.CONFIG_FILE
    if not saved_file.is_file():
        return
    saved = ModelConfig.from_json(saved_file.read_text())
    details = saved.differences(config, RESUMABLE_FIELDS)
    if details:
        raise ValueError(f"{model_dir} holds a run of a different model ({details}). Use a new --model_dir, or the "
                         f"gin config that run used ({model_dir / 'config.gin'}).")


def data_stream(name: str, kind: str, lengths: dict[str, int], batch_size: int, *, split: str, pack: bool,
                seed: int, data_shard: tuple[int, int] = (0, 1), shuffle: bool = True, repeat: bool = True):
    """This process's stream: shard `data_shard` = (index, count) of the data, batch_size / count rows."""
    index, count = data_shard
    return t5data.DataStream(name, split=split, task_feature_lengths=lengths, batch_size=batch_size // count,
                             model_kind=kind, pack=pack, shuffle=shuffle, seed=seed, shard_index=index,
                             num_shards=count, repeat=repeat)


def evaluate(params, config: ModelConfig, name: str, kind: str, lengths: dict[str, int], batch_size: int,
             num_batches: int, pack: bool, eval_fn: Callable, global_batch: Callable = dict,
             data_shard: tuple[int, int] = (0, 1)) -> dict[str, float]:
    """Perplexity and token accuracy over the first `num_batches` validation batches.

    `global_batch` turns this process's rows (shard `data_shard`) into the step's input. In a
    multi-process run every process runs `num_batches` steps; one whose shard has run out feeds
    all-padding batches."""
    stream = data_stream(name, kind, lengths, batch_size, split="validation", pack=pack, seed=0,
                         data_shard=data_shard, shuffle=False, repeat=False)
    totals = {"loss_sum": 0.0, "correct": 0.0, "weight": 0.0}
    last = None
    for _ in range(num_batches):
        local = next(stream, None)
        if local is None and jax.process_count() == 1:
            break
        last = local if local is not None else {key: np.zeros_like(value) for key, value in last.items()}
        totals = {k: totals[k] + float(v) for k, v in jax.device_get(eval_fn(params, global_batch(last))).items()}
    if not totals["weight"]:
        raise ValueError(f"The validation split of {name!r} gave no target tokens to evaluate on.")
    loss = totals["loss_sum"] / totals["weight"]
    return {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0))), "accuracy": totals["correct"] / totals["weight"]}


@gin.configurable(module="t5lite", denylist=["model_dir"])
def train(model_dir: str, *, model_config: ModelConfig = gin.REQUIRED, mixture_or_task_name: str = gin.REQUIRED,
          task_feature_lengths: dict = gin.REQUIRED, batch_size: int = gin.REQUIRED, num_steps: int = gin.REQUIRED,
          learning_rate: Callable = gin.REQUIRED, optimizer: Callable = gin.REQUIRED, model_kind: str | None = None,
          mesh_shape: MeshShape = MeshShape(), pack: bool = True, seed: int = 0, num_microbatches: int = 1,
          z_loss: float = 1e-4, label_smoothing: float = 0.0, log_every: int = 50, checkpoint_every: int = 500,
          keep_checkpoints: int | None = 3, eval_every: int | None = None, eval_batches: int = 10,
          peak_flops_per_device: float | None = None, progress: bool = True, init_from: str | None = None,
          trainable: str | None = None, distillation: Distillation | None = None,
          preference: Preference | None = None) -> dict[str, float]:
    """Trains (or resumes) a model in `model_dir`; returns the last logged training metrics.

    `learning_rate` is a schedule (e.g. @learning_rate_schedule()) and `optimizer` a factory taking it
    (e.g. @optimizer, without parentheses). `mesh_shape` (e.g. @MeshShape()) spreads the step over all
    devices of all processes; batch_size is the global batch.
    Fine-tuning: a new run starts from `init_from` (a t5lite checkpoint or another run's directory)
    and trains the parameters whose "/"-joined paths match the regex `trainable` (default: all, or
    the LoRA adapters of a model with `ModelConfig.lora_rank`). `distillation` (@Distillation())
    trains on a frozen teacher's soft targets; `preference` (@Preference()) trains with DPO on a
    preference task, against the model the run starts from.
    """
    model_dir = pathlib.Path(model_dir).absolute()
    config = model_config
    kind = model_kind or ("encoder_decoder" if config.is_encoder_decoder else "decoder")
    check_run(config, kind, task_feature_lengths, batch_size, num_microbatches, pack)
    check_objectives(config, distillation, preference, num_microbatches, eval_every)
    trainable = trainable_pattern(config, trainable)
    teacher, teacher_params = load_teacher(distillation, config, num_steps) if distillation else (None, None)
    tx = optimizer(learning_rate=learning_rate, param_axes=param_axes(config))
    step = TrainStep.create(config, mesh_shape, tx, learning_rate, seed=seed,
                            batch_size=batch_size, num_microbatches=num_microbatches, z_loss=z_loss,
                            label_smoothing=label_smoothing, trainable=trainable, teacher=teacher,
                            preference=preference)
    check_model_dir(model_dir, config)
    checkpoints_exist = (model_dir / "checkpoints").is_dir()
    checkpoints = ckpt.TrainCheckpoints(model_dir, checkpoint_every, keep_checkpoints) if checkpoints_exist else None
    resume_step = checkpoints.latest_step() if checkpoints else None
    if resume_step is not None:
        state = checkpoints.restore(step.abstract_state, resume_step)
    # A DPO run's reference is its step-0 model, rebuilt from init_from when it resumes.
    rebuild = preference is not None and preference.needs_reference
    pretrained = pretrained_params(config, init_from) if init_from and (resume_step is None or rebuild) else None
    data_shard = step.partitioner.data_shard(batch_size)
    stream = data_stream(mixture_or_task_name, kind, task_feature_lengths, batch_size, split="train", pack=pack,
                         seed=seed, data_shard=data_shard)
    if resume_step is not None:
        checkpoints.restore_stream(stream, resume_step)
    t5data.check_vocabulary_fits(stream.vocabulary, config.vocab_size)
    if stream.pairs != (preference is not None):
        raise ValueError(f"Task {mixture_or_task_name!r} {'holds' if stream.pairs else 'has no'} preference pairs; "
                         f"train.preference=@Preference() and a preference task (e.g. t5lite_preferences) go "
                         f"together.")
    first_batch = next(stream)  # an empty dataset fails here, before anything is written

    if jax.process_index() == 0:
        model_dir.mkdir(parents=True, exist_ok=True)
        (model_dir / "config.gin").write_text(gin.config_str())
        (model_dir / ckpt.CONFIG_FILE).write_text(config.to_json())
    checkpoints = checkpoints or ckpt.TrainCheckpoints(model_dir, checkpoint_every, keep_checkpoints)
    # Measured (where no peak is known) on one local device, outside the mesh context.
    peak = peak_flops_per_device or flops.peak_flops_per_device(jax.devices()[0]) or metrics_lib.measure_peak_flops()
    partitioner = step.partitioner
    with partitioner.context():
        if resume_step is None:
            state = init_state(config, step.tx, jax.random.PRNGKey(seed), step.state_shardings, trainable, pretrained)
        start = int(state.step)
        reference_args = ()
        if teacher is not None:
            reference_args = (jax.device_put(teacher_params, step.reference_shardings),)
        if preference is not None and preference.needs_reference:
            reference_args = (init_state(config, step.tx, jax.random.PRNGKey(seed), step.state_shardings, trainable,
                                         pretrained).params,)
        eval_fn = sharded_eval_step(partitioner, step.state_shardings.params, config)
        dropout_rng = jax.device_put(jax.random.fold_in(jax.random.PRNGKey(seed), 1), partitioner.replicated)
        encoder_length, decoder_length = model_lengths(kind, task_feature_lengths)
        flops_per_step = batch_size * flops.training_flops_per_sequence(config, encoder_length, decoder_length,
                                                                        frozen_base=trainable is not None)
        if reference_args:  # the teacher's / reference's forward pass is work the step does too
            reference_config = teacher.config if teacher else config
            flops_per_step += batch_size * flops.forward_flops_per_sequence(reference_config, encoder_length,
                                                                            decoder_length)
        primary = jax.process_index() == 0
        writer = metrics_lib.MetricsWriter(model_dir, after_step=start) if primary else None
        eval_writer = metrics_lib.MetricsWriter(model_dir, "eval", after_step=start) if primary else None
        bar = tqdm.tqdm(total=num_steps, initial=start, disable=not (progress and primary), unit="step",
                        dynamic_ncols=True)
        step_metrics = metrics_lib.StepMetrics(flops_per_step, batch_size * (encoder_length + decoder_length),
                                               partitioner.mesh.size, peak)
        global_batch = functools.partial(partitioner.global_batch, batch_size=batch_size)
        batch, last, interrupted = global_batch(first_batch), {}, None
        try:
            with preemption.StopRequests() as stop:
                for done in range(start + 1, num_steps + 1):
                    state, metrics = step.fn(state, batch, dropout_rng, *reference_args)
                    step_metrics.add(done, metrics)
                    stopping = stop.now(done)
                    logging = done % log_every == 0 or done == num_steps or stopping
                    saving = done % checkpoint_every == 0 or done == num_steps or stopping
                    if logging or saving:
                        step_metrics.fetch(checkpoints.latest_step())
                    if logging:
                        last = step_metrics.summary()
                        if writer:
                            writer.write(done, last)
                        bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last.get('tokens_per_s', 0):.0f}",
                                        mfu=f"{last.get('mfu', 0):.1%}")
                    if saving:
                        checkpoints.save(done, state, stream, force=done == num_steps or stopping)
                    if eval_every and (done % eval_every == 0 or done == num_steps):
                        results = evaluate(state.params, config, mixture_or_task_name, kind, task_feature_lengths,
                                           batch_size, eval_batches, pack, eval_fn, global_batch, data_shard)
                        if eval_writer:
                            eval_writer.write(done, results)
                    bar.update(1)
                    if stopping and done < num_steps:
                        interrupted = preemption.Interrupted(done, stop.signum)
                        break
                    if done < num_steps:
                        batch = global_batch(next(stream))
        finally:
            bar.close()
            checkpoints.close()
    if interrupted:
        raise interrupted
    return last


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """The sharded train step of a run and what it needs: `train` runs it, `t5lite compile`
    compiles it ahead of time for a TPU topology."""

    partitioner: Partitioner
    tx: optax.GradientTransformation
    abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings
    state_shardings: TrainState
    fn: Callable
    reference_shardings: Any = None  # of a distillation teacher's or a DPO reference's parameters

    @classmethod
    def create(cls, config: ModelConfig, mesh_shape: MeshShape, tx: optax.GradientTransformation,
               schedule: Callable, *, seed: int, batch_size: int, num_microbatches: int, z_loss: float,
               label_smoothing: float, trainable: str | None = None, teacher: Teacher | None = None,
               preference: Preference | None = None, devices=None) -> "TrainStep":
        partitioner = Partitioner.create(config, mesh_shape, devices)
        partitioner.check_batch(batch_size, num_microbatches)
        abstract = jax.eval_shape(functools.partial(init_state, config, tx, trainable=trainable),
                                  jax.random.PRNGKey(seed))
        state_shardings = partitioner.state(abstract, partitioner.params(config), trainable)
        reference_shardings = None
        if teacher is not None or (preference is not None and preference.needs_reference):
            reference_shardings = partitioner.params(teacher.config if teacher else config)
        fn = sharded_train_step(partitioner, state_shardings, reference_shardings, config=config, tx=tx,
                                schedule=schedule, num_microbatches=num_microbatches, z_loss=z_loss,
                                label_smoothing=label_smoothing, trainable=trainable, teacher=teacher,
                                preference=preference)
        return cls(partitioner, tx, abstract_with_shardings(abstract, state_shardings), state_shardings, fn,
                   reference_shardings)
