"""A training run, as its gin files describe it: one frozen, validated RunSpec.

Gin binds it under the name `train` (`train.batch_size = 16`, ...), as runs have always been
written, so a run's gin files and the `config.gin` it saves build the same RunSpec. `t5lite train`
runs it, `t5lite compile` compiles its step, `eval` / `generate` / `quantize` read its task and
lengths from it, and the sweep runner plans with it: none of them reads gin on its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import gin
import jax

from t5lite import data as t5data
from t5lite.config import ModelConfig
from t5lite.models import flops
from t5lite.models.params import param_axes, trainable_pattern
from t5lite.sharding import MeshShape
from t5lite.train.distillation import Distillation
from t5lite.train.loss_scale import LossScaling
from t5lite.train.preference import Preference
from t5lite.train.rewards import RewardModel
from t5lite.train.rl import PolicyGradient


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Everything a run is but where it lives. `learning_rate` is a schedule (e.g.
    @learning_rate_schedule()) and `optimizer` a factory taking it (e.g. @optimizer, without
    parentheses). `mesh_shape` (e.g. @MeshShape()) spreads the step over all devices of all
    processes; batch_size is the global batch. Fine-tuning: a new run starts from `init_from` (a
    t5lite checkpoint or another run's directory) and trains the parameters whose "/"-joined paths
    match the regex `trainable` (default: all, or what LoRA, BitFit or a soft prompt add).
    `distillation` (@Distillation()) trains on a frozen teacher's soft targets; `preference`
    (@Preference()) trains with DPO or as a reward model on a preference task; `rl` (@GRPO() or
    @PPO()) trains on responses it samples to the task's prompts. A step whose loss,
    gradient norm or updated parameters are not finite stops the run before anything non-finite is
    saved; with `skip_nonfinite_steps=N` such a step is skipped instead (no update), until N in a row.
    `loss_scale` (needed with ModelConfig.dtype='float16'): 'dynamic' (from `loss_scale_initial`,
    halved at a step that overflows, which is skipped, doubled after `loss_scale_growth_interval`
    finite steps), a fixed scale, or None (no scaling); see t5lite/train/loss_scale.py."""

    model_config: ModelConfig
    mixture_or_task_name: str
    task_feature_lengths: Mapping[str, int]
    batch_size: int
    num_steps: int
    learning_rate: Callable
    optimizer: Callable
    model_kind: str | None = None  # None: encoder_decoder or decoder, as the model is
    mesh_shape: MeshShape = MeshShape()
    pack: bool = True
    seed: int = 0
    num_microbatches: int = 1
    z_loss: float = 1e-4
    label_smoothing: float = 0.0
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int | None = 3
    eval_every: int | None = None
    eval_batches: int = 10
    peak_flops_per_device: float | None = None
    progress: bool = True
    init_from: str | None = None
    trainable: str | None = None
    distillation: Distillation | None = None
    preference: Preference | None = None
    rl: PolicyGradient | None = None
    skip_nonfinite_steps: int = 0
    loss_scale: str | float | None = None
    loss_scale_initial: float = 2.0**15
    loss_scale_growth_interval: int = 2000
    kind: str = dataclasses.field(init=False)  # model_kind, resolved
    trainable_params: str | None = dataclasses.field(init=False)  # trainable, resolved; None: all
    loss_scaling: LossScaling | None = dataclasses.field(init=False)  # the loss_scale* settings, checked

    def __post_init__(self):
        config = self.model_config
        object.__setattr__(self, "task_feature_lengths", dict(self.task_feature_lengths))
        object.__setattr__(
            self, "kind", self.model_kind or ("encoder_decoder" if config.is_encoder_decoder else "decoder")
        )
        self._check_data()
        if not isinstance(self.skip_nonfinite_steps, int) or self.skip_nonfinite_steps < 0:
            raise ValueError(
                f"train.skip_nonfinite_steps={self.skip_nonfinite_steps!r} must be 0 (stop at the first "
                f"non-finite step) or how many in a row to skip before stopping."
            )
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"train.num_steps={self.num_steps!r} must be a positive number of steps.")
        object.__setattr__(self, "trainable_params", trainable_pattern(config, self.trainable))
        object.__setattr__(
            self,
            "loss_scaling",
            LossScaling.from_settings(
                self.loss_scale, self.loss_scale_initial, self.loss_scale_growth_interval, config.dtype
            ),
        )
        self._check_objectives()

    @classmethod
    def from_gin(cls) -> RunSpec:
        """The RunSpec the parsed gin config binds (`train.*`)."""
        bound = gin.get_bindings("t5lite.train")
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.init and f.default is dataclasses.MISSING and f.name not in bound
        ]
        if missing:
            raise ValueError(
                f"The gin config binds no {', '.join('train.' + name for name in missing)}; give a run "
                f"gin file (gin_configs/runs/) or bind them with --gin.train.NAME=VALUE."
            )
        return GinRunSpec()

    @property
    def lengths(self) -> tuple[int, int]:
        """(encoder length, decoder length) the model sees."""
        return t5data.model_lengths(self.kind, self.task_feature_lengths)

    @property
    def reference_config(self) -> ModelConfig | None:
        """The frozen copy of this model the step also runs: a DPO or RL reference (a teacher is loaded)."""
        needs = self.rl is not None or (self.preference is not None and self.preference.needs_reference)
        return self.model_config if needs else None

    @property
    def reward_config(self) -> ModelConfig | None:
        """An RL run's reward model (read from its run, checked against this model)."""
        if self.rl is None or not isinstance(self.rl.reward, RewardModel):
            return None
        return self.rl.reward.config(self.model_config)

    def frozen_configs(self, teacher: ModelConfig | None = None) -> tuple[ModelConfig, ...]:
        """The frozen models the step runs, in the order it takes their parameters: a distillation
        `teacher`, or the reference and then an RL reward model."""
        return tuple(c for c in (teacher, self.reference_config, self.reward_config) if c is not None)

    @property
    def rows_per_step(self) -> int:
        """Sequences a step trains on: the batch, or an RL step's responses (batch x group_size)."""
        return self.batch_size * (self.rl.group_size if self.rl else 1)

    def tx(self):
        """The optimizer, over the model's parameters."""
        return self.optimizer(learning_rate=self.learning_rate, param_axes=param_axes(self.model_config))

    def data_stream(
        self,
        split: str = "train",
        data_shard: tuple[int, int] = (0, 1),
        *,
        shuffle: bool = True,
        repeat: bool = True,
        seed: int | None = None,
    ) -> t5data.DataStream:
        """This process's stream: shard `data_shard` = (index, count) of the data, batch_size / count rows
        (seeded with the run's seed, or `seed`)."""
        index, count = data_shard
        return t5data.DataStream(
            self.mixture_or_task_name,
            split=split,
            task_feature_lengths=self.task_feature_lengths,
            batch_size=self.batch_size // count,
            model_kind=self.kind,
            pack=self.pack,
            shuffle=shuffle,
            seed=self.seed if seed is None else seed,
            shard_index=index,
            num_shards=count,
            repeat=repeat,
            start_id=self.model_config.start_id,
            eos_id=self.model_config.eos_id,
        )

    def flops_per_step(self, teacher: ModelConfig | None = None) -> float:
        """Model FLOPs of one step: training (3 x forward; 2 x with a frozen base) plus a forward of
        each frozen model the step also runs. An RL step also samples (its decoding's matmuls are a
        forward's) and scores its responses once before it trains on them `epochs` times."""
        encoder, decoder = self.lengths
        training = flops.training_flops_per_sequence(
            self.model_config, encoder, decoder, frozen_base=self.trainable_params is not None
        )
        forward = flops.forward_flops_per_sequence
        frozen = sum(forward(c, encoder, decoder) for c in self.frozen_configs(teacher))
        if self.rl is None:
            return self.batch_size * (training + frozen)
        sampling_and_scoring = 2 * forward(self.model_config, encoder, decoder)
        return self.rows_per_step * (self.rl.epochs * training + sampling_and_scoring + frozen)

    def _check_data(self) -> None:
        config, kind, lengths = self.model_config, self.kind, self.task_feature_lengths
        if kind not in t5data.MODEL_KINDS:
            raise ValueError(
                f"train.model_kind={kind!r} is not supported. Allowed values: {', '.join(t5data.MODEL_KINDS)}."
            )
        if config.is_encoder_decoder != (kind == "encoder_decoder"):
            raise ValueError(
                f"train.model_kind={kind!r} does not fit ModelConfig.architecture="
                f"{config.architecture!r}: encoder_decoder models take encoder_decoder data, decoders "
                f"take decoder, prefix_lm or causal_prefix_lm data."
            )
        needed = {"targets"} if kind == "decoder" else {"inputs", "targets"}
        if not needed <= set(lengths):
            raise ValueError(
                f"train.task_feature_lengths={lengths} must give lengths for {sorted(needed)} with model_kind={kind!r}."
            )
        if config.position_encoding == "learned" and max(self.lengths) > config.max_length:
            raise ValueError(
                f"Sequences of {max(self.lengths)} tokens are longer than the model's learned position "
                f"table (ModelConfig.max_length={config.max_length}); shorten "
                f"train.task_feature_lengths or raise max_length."
            )
        if config.adapters.prompt_length and self.pack:
            raise ValueError(
                f"AdapterConfig.prompt_length={config.adapters.prompt_length}: every row needs its own soft "
                f"prompt; set train.pack=False."
            )
        processes = jax.process_count()
        if self.batch_size % (processes * self.num_microbatches):
            raise ValueError(
                f"train.batch_size={self.batch_size} must divide evenly over {processes} process(es) "
                f"and num_microbatches={self.num_microbatches}."
            )

    def _check_objectives(self) -> None:
        """What preference and RL training need, and cannot be combined with (yet)."""
        chosen = [name for name in ("distillation", "preference", "rl") if getattr(self, name) is not None]
        if len(chosen) > 1:
            raise ValueError(
                f"{' and '.join('train.' + name for name in chosen)} are objectives of their own; choose one."
            )
        if self.preference is not None:
            self.preference.check(self.model_config)
        if self.rl is not None:
            self._check_rl()
        if chosen and chosen[0] != "distillation" and self.num_microbatches != 1:
            raise ValueError(
                f"train.{chosen[0]} scores whole pairs or groups of rows, which microbatches would split; "
                f"set train.num_microbatches=1 (it is {self.num_microbatches})."
            )
        if self.preference is not None and self.eval_every:
            raise ValueError(
                "train.preference logs its pair accuracy and margin while training; validation "
                "measures token loss, which DPO does not optimise: set train.eval_every=None."
            )

    def _check_rl(self) -> None:
        self.rl.check(self.model_config, self.kind, self.batch_size)
        if self.pack:
            raise ValueError("train.rl samples a response to each prompt: set train.pack=False.")
        if self.mesh_shape.stage != 1:
            raise ValueError(
                f"train.rl samples with the KV cache, which pipeline stages do not run; set MeshShape.stage=1 "
                f"(it is {self.mesh_shape.stage})."
            )
        if self.loss_scaling is not None:
            raise ValueError("train.rl does not scale its loss (float16); set train.loss_scale=None.")
        if self.model_config.moe.num_experts:
            raise ValueError(
                "train.rl does not train mixture-of-experts models yet (their routing losses and capacity "
                "per minibatch); use a dense model."
            )


GinRunSpec = gin.external_configurable(RunSpec, name="train", module="t5lite")
