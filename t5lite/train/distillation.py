"""Knowledge distillation as a training objective: a frozen teacher's logits as soft targets.

`train.distillation = @Distillation()` with `Distillation.teacher` naming a t5lite checkpoint or
a run of any t5lite model with the student's vocabulary and kind (encoder-decoder, or decoder).
The step runs the teacher on each batch (no gradients) and trains the student on
alpha·T²·KL(teacher/T || student/T) + (1 - alpha)·CE, with T moving linearly from `temperature`
to `final_temperature` over the run (a hot start spreads the teacher's mass over more tokens).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import gin
import jax
import numpy as np
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

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"Distillation.alpha={self.alpha} must be in [0, 1] (1: soft targets only).")
        for name in ("temperature", "final_temperature"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"Distillation.{name}={value} must be > 0.")

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


def load_teacher(distillation: Distillation, student: ModelConfig, num_steps: int):
    """(Teacher, parameters); refuses a teacher whose logits do not line up with the student's."""
    config, params = checkpoint.load_pretrained(distillation.teacher)
    if config.vocab_size != student.vocab_size or config.is_encoder_decoder != student.is_encoder_decoder:
        raise ValueError(f"Distillation.teacher={distillation.teacher} is a {config.architecture} model with "
                         f"vocab_size={config.vocab_size}; the student is a {student.architecture} model with "
                         f"vocab_size={student.vocab_size}. Teacher and student need one vocabulary and one kind.")
    teacher = Teacher(config.replace(dropout_rate=0.0), distillation.alpha, distillation.schedule(num_steps))
    return teacher, jax.tree.map(np.asarray, params)  # host arrays: every process places its shards
