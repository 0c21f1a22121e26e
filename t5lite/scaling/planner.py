"""IsoFLOP sweep plans: for each compute budget, models spaced evenly in log N and the tokens each can afford.

Shape rule (both families): head_dim 64 and num_heads = d_model / 64; d_ff = d_ff_ratio ·
d_model rounded up to a multiple of 64; d_model a multiple of 64. For a target parameter
count N (total, as `param_count` counts it) every width gets the layer count that comes
closest to N, and the width whose depth is nearest the family's aspect ratio
d_model / layers = 64 wins. Chinchilla's and T5's small and base models sit near that
ratio, and Kaplan et al. found loss nearly flat for aspect ratios from 20 to 200, so one
ratio keeps the sweep a one-parameter family while depth tunes N finely.

- decoder (Llama-style): SwiGLU with d_ff ≈ 8/3 · d_model, RoPE, untied embeddings.
- encoder_decoder (T5 v1.1-style): GeGLU with d_ff ≈ 2.5 · d_model, relative position
  bias, untied, as many encoder as decoder layers (`layers` counts each stack).

Sizes are centred on N* = sqrt(C / (6 · tokens_per_param)) (Chinchilla's 20 tokens per
parameter unless told otherwise) and spread over N* · span^[-1, 1]. Tokens come from the
exact FLOP count (`t5lite.models.flops`), not 6·N·D, so small models whose parameters are
mostly embeddings get the tokens their budget really buys.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from t5lite.config import ModelConfig
from t5lite.models import flops
from t5lite.models.params import param_count
from t5lite.models.registry import LLAMA, T5_1_1

HEAD_DIM = 64
ASPECT_RATIO = 64
_MAX_WIDTH_MULTIPLE = 256  # d_model up to 16384
FAMILIES = {
    "decoder": (LLAMA, 8 / 3),
    "encoder_decoder": (T5_1_1, 2.5),
}


class PlanPoint(NamedTuple):
    name: str
    config: ModelConfig
    tokens: int
    flops: float


def shape(family: str, width: int, layers: int, base: ModelConfig | None = None) -> ModelConfig:
    """The family's config at `width` (d_model) and `layers` (per stack); `base` overrides the family's defaults."""
    default, d_ff_ratio = _family(family)
    if width % HEAD_DIM or layers < 1:
        raise ValueError(f"width={width} must be a multiple of {HEAD_DIM} and layers={layers} at least 1.")
    d_ff = HEAD_DIM * math.ceil(d_ff_ratio * width / HEAD_DIM)
    stacks = {"num_encoder_layers": layers} if default.is_encoder_decoder else {}
    return (base or default).replace(
        d_model=width,
        num_heads=width // HEAD_DIM,
        num_kv_heads=None,
        head_dim=HEAD_DIM,
        d_ff=d_ff,
        num_decoder_layers=layers,
        **stacks,
    )


def config_for_size(family: str, target_params: float, base: ModelConfig | None = None) -> ModelConfig:
    """The shape rule of the module docstring: the config of `family` closest to `target_params`."""
    if not target_params > 0:
        raise ValueError(f"target_params={target_params!r} must be positive.")
    best = None
    for width in range(HEAD_DIM, HEAD_DIM * (_MAX_WIDTH_MULTIPLE + 1), HEAD_DIM):
        one, two = (param_count(shape(family, width, n, base)) for n in (1, 2))
        if best is not None and one > 1.1 * target_params:
            break  # wider models overshoot even with one layer
        layers = max(1, round((target_params - one) / (two - one)) + 1)
        miss = abs(math.log((one + (layers - 1) * (two - one)) / target_params))
        # Widths that come within 10% of the target compete on aspect ratio; the others on the miss.
        score = (miss > 0.1, miss if miss > 0.1 else abs(math.log(layers * ASPECT_RATIO / width)))
        if best is None or score < best[0]:
            best = (score, width, layers)
    return shape(family, best[1], best[2], base)


def plan(
    budgets,
    family: str,
    *,
    inputs_length: int,
    targets_length: int,
    num_sizes: int = 5,
    span: float = 4.0,
    tokens_per_param: float = 20.0,
    overrides: Mapping | None = None,
) -> list[PlanPoint]:
    """An IsoFLOP grid: per budget C, `num_sizes` shapes spaced in log N and the tokens C buys each.

    `inputs_length`/`targets_length` are the sequence lengths the runs will train on (see
    `flops.training_flops_per_sequence`); `overrides` are ModelConfig fields applied to the
    family's base config, e.g. {"vocab_size": 8192}. Sizes that round to the same shape appear once.
    """
    budgets = np.asarray(budgets, float)
    if budgets.size == 0 or not np.all(budgets > 0):
        raise ValueError(f"budgets must be a non-empty list of positive FLOP counts; got {budgets.tolist()}.")
    if num_sizes < 3:
        raise ValueError(f"num_sizes={num_sizes} must be at least 3: Approach 2 fits a parabola to each profile.")
    if not span > 1:
        raise ValueError(f"span={span} must be > 1: sizes range over N* / span .. N* · span.")
    base = _family(family)[0].replace(**(overrides or {}))
    points = []
    for budget in budgets:
        centre = math.sqrt(budget / (6.0 * tokens_per_param))
        configs = {}
        for target in centre * span ** np.linspace(-1.0, 1.0, num_sizes):
            config = config_for_size(family, target, base)
            configs[(config.d_model, config.num_decoder_layers)] = config
        for (width, layers), config in configs.items():
            tokens = round(budget / flops.training_flops_per_token(config, inputs_length, targets_length))
            if tokens < flops.tokens_per_sequence(config, inputs_length, targets_length):
                raise ValueError(
                    f"C={budget:.3g} buys {family} d_model={width}, layers={layers} less than one "
                    "sequence; raise the budget or lower span."
                )
            points.append(
                PlanPoint(f"{family}_C{budget:.2e}_d{width}_L{layers}".replace("+", ""), config, tokens, float(budget))
            )
    return points


def family_base(family: str) -> ModelConfig:
    """The family's default config, so callers can check a base run's architecture against it."""
    return _family(family)[0]


def _family(family: str) -> tuple[ModelConfig, float]:
    if family not in FAMILIES:
        raise ValueError(f"Unknown model family {family!r}. Families: {', '.join(FAMILIES)}.")
    return FAMILIES[family]
