"""Knowledge distillation as a training objective: a frozen teacher's logits as soft targets.

`train.distillation = @Distillation()` with `Distillation.teacher` naming a t5lite checkpoint or
a run of any t5lite model with the student's vocabulary and kind (encoder-decoder, or decoder).
The step runs the teacher on each batch (no gradients) and trains the student on
alpha·T²·KL(teacher/T || student/T) + (1 - alpha)·CE, with T moving linearly from `temperature`
to `final_temperature` over the run (a hot start spreads the teacher's mass over more tokens).
With `hidden_weight` > 0 it also pulls student layers' outputs towards teacher layers' (cosine
distance per token, as DistilBERT; no learned projection, so both need one d_model) over
`layer_map`: {"decoder": ((student layer, teacher layer), ...), "encoder": ...}, by default each
student layer i of L onto teacher layer ceil((i + 1)·L_teacher / L) - 1 (the last onto the last).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import gin
import optax

from t5lite.config import ModelConfig
from t5lite.train import checkpoint


@gin.configurable(module="t5lite")
@dataclasses.dataclass(frozen=True)
class Distillation:
    teacher: str
    alpha: float = 0.5
    temperature: float = 2.0
    final_temperature: float | None = None  # None: constant
    hidden_weight: float = 0.0
    layer_map: dict[str, Any] | None = None  # None: uniform over every stack

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"Distillation.alpha={self.alpha} must be in [0, 1] (1: soft targets only).")
        for name in ("temperature", "final_temperature"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"Distillation.{name}={value} must be > 0.")
        if not self.hidden_weight >= 0.0:
            raise ValueError(f"Distillation.hidden_weight={self.hidden_weight} must be >= 0 (0: no hidden-state loss).")
        if self.layer_map is not None and not self.hidden_weight:
            raise ValueError(
                "Distillation.layer_map maps layers for the hidden-state loss; set "
                "Distillation.hidden_weight > 0 to use it."
            )

    def schedule(self, num_steps: int):
        """The temperature as a function of the step."""
        final = self.temperature if self.final_temperature is None else self.final_temperature
        return optax.linear_schedule(self.temperature, final, max(num_steps, 1))


@dataclasses.dataclass(frozen=True)
class Teacher:
    """What the train step needs of the teacher (its parameters are an argument of the step)."""

    config: ModelConfig
    alpha: float
    temperature: Any  # step -> temperature
    hidden_weight: float = 0.0
    layer_map: tuple[tuple[str, int, int], ...] = ()  # (stack, student layer, teacher layer)


def teacher_for(distillation: Distillation, student: ModelConfig, num_steps: int) -> Teacher:
    """What the step needs of `distillation`'s teacher (its config, read without its parameters);
    refuses a teacher whose logits do not line up with the student's."""
    config = checkpoint.pretrained_config(distillation.teacher)
    if config.vocab_size != student.vocab_size or config.is_encoder_decoder != student.is_encoder_decoder:
        raise ValueError(
            f"Distillation.teacher={distillation.teacher} is a {config.architecture} model with "
            f"vocab_size={config.vocab_size}; the student is a {student.architecture} model with "
            f"vocab_size={student.vocab_size}. Teacher and student need one vocabulary and one kind."
        )
    layer_map = hidden_layer_map(distillation, student, config) if distillation.hidden_weight else ()
    return Teacher(
        # On a mesh with pipeline stages the teacher runs through them on the student's schedule.
        config.replace(
            dropout_rate=0.0,
            pipeline_microbatches=student.pipeline_microbatches,
            pipeline_repeats=student.pipeline_repeats,
        ),
        distillation.alpha,
        distillation.schedule(num_steps),
        distillation.hidden_weight,
        layer_map,
    )


def hidden_layer_map(distillation: Distillation, student: ModelConfig, teacher: ModelConfig):
    """(stack, student layer, teacher layer) triples, checked against both models."""
    if student.d_model != teacher.d_model:
        raise ValueError(
            f"Distillation.hidden_weight compares layer outputs directly: the student's d_model="
            f"{student.d_model} differs from the teacher's {teacher.d_model}. Use equal widths or "
            f"hidden_weight=0."
        )
    depths = {stack: (depth, teacher.layer_stacks[stack]) for stack, depth in student.layer_stacks.items()}
    mapping = distillation.layer_map
    if mapping is None:
        mapping = {
            stack: [(i, -(-(i + 1) * theirs // ours) - 1) for i in range(ours)]
            for stack, (ours, theirs) in depths.items()
        }
    triples = []
    for stack, pairs in mapping.items():
        if stack not in depths:
            raise ValueError(f"Distillation.layer_map names stack {stack!r}; the models have {sorted(depths)}.")
        for pair in pairs:
            ours, theirs = depths[stack]
            if len(pair) != 2 or not (0 <= pair[0] < ours and 0 <= pair[1] < theirs):
                raise ValueError(
                    f"Distillation.layer_map[{stack!r}] has {tuple(pair)}; pairs are (student layer "
                    f"in 0..{ours - 1}, teacher layer in 0..{theirs - 1})."
                )
            triples.append((stack, int(pair[0]), int(pair[1])))
    if not triples:
        raise ValueError("Distillation.layer_map maps no layer; give (student, teacher) pairs per stack.")
    return tuple(triples)
