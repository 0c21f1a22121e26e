"""What `generate` is asked for (DecodingOptions, validated on construction) and what it returns."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import NamedTuple

import jax


@dataclasses.dataclass(frozen=True)
class DecodingOptions:
    """How to pick tokens: greedy (temperature 0), sampling, or beam search (num_beams set)."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter
    # Beam search with this many beams; None samples (greedy at temperature 0). With length_penalty=0,
    # one beam finds the greedy sequence.
    num_beams: int | None = None
    # GNMT's alpha: beam search ranks log p(y) / ((5 + |y|) / 6) ** alpha; 0 ranks by log p(y).
    length_penalty: float = 0.6
    # OpenAI's: logit -= frequency_penalty * count + presence_penalty * (count > 0), counting
    # the tokens generated so far in the row (prompt tokens are not counted).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    eos_id: int | str | None = "model"  # "model": ModelConfig.eos_id; None: always generate max_new_tokens
    # Contrastive search (Su et al. 2022) when > 0: of the top_k likeliest tokens, pick the one that
    # maximises (1 - alpha) p(v) - alpha * max cosine(h_v, h_j<t), h the final hidden states.
    degeneration_penalty: float = 0.0
    # Contrastive decoding (Li et al. 2023), when generate() is given an amateur: tokens score
    # log p_expert - log p_amateur (amateur logits / amateur_temperature), among those whose expert
    # probability is at least plausibility_alpha times the most likely token's.
    plausibility_alpha: float = 0.1
    amateur_temperature: float = 1.0
    # Speculative decoding, when generate() is given a draft: tokens the draft proposes per round.
    draft_tokens: int = 4
    # Ids never chosen by greedy decoding or sampling (Hugging Face's suppress_tokens), e.g. (0,): a
    # sampled padding id would read as a hole in the row when the response is scored (RL does this).
    suppress_tokens: tuple[int, ...] = ()

    def __post_init__(self):
        _require(
            "max_new_tokens",
            self.max_new_tokens,
            _is_int(self.max_new_tokens) and self.max_new_tokens > 0,
            "a positive integer",
        )
        _require(
            "temperature",
            self.temperature,
            _is_real(self.temperature) and self.temperature >= 0,
            "a finite number >= 0 (0 is greedy)",
        )
        _require("top_k", self.top_k, _is_int(self.top_k) and self.top_k >= 0, "an integer >= 0 (0 turns it off)")
        _require("top_p", self.top_p, _is_real(self.top_p) and 0 < self.top_p <= 1, "in (0, 1] (1 turns it off)")
        _require(
            "num_beams",
            self.num_beams,
            self.num_beams is None or _is_int(self.num_beams) and self.num_beams >= 1,
            "None (no beam search) or an integer >= 1",
        )
        _require(
            "length_penalty",
            self.length_penalty,
            _is_real(self.length_penalty) and self.length_penalty >= 0,
            "a finite number >= 0 (0 ranks beams by log-probability alone)",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            _require(name, getattr(self, name), _is_real(getattr(self, name)), "a finite number")
        _require(
            "eos_id",
            self.eos_id,
            self.eos_id in (None, "model") or _is_int(self.eos_id) and self.eos_id > 0,
            '"model" (the model\'s eos_id), None or a positive token id (0 is padding)',
        )
        _require(
            "degeneration_penalty",
            self.degeneration_penalty,
            _is_real(self.degeneration_penalty) and 0 <= self.degeneration_penalty <= 1,
            "in [0, 1] (0 turns contrastive search off)",
        )
        _require(
            "plausibility_alpha",
            self.plausibility_alpha,
            _is_real(self.plausibility_alpha) and 0 < self.plausibility_alpha <= 1,
            "in (0, 1]",
        )
        _require(
            "amateur_temperature",
            self.amateur_temperature,
            _is_real(self.amateur_temperature) and self.amateur_temperature > 0,
            "a finite number > 0",
        )
        _require(
            "draft_tokens", self.draft_tokens, _is_int(self.draft_tokens) and self.draft_tokens >= 1, "an integer >= 1"
        )
        suppressed = self.suppress_tokens
        _require(
            "suppress_tokens",
            suppressed,
            isinstance(suppressed, (tuple, list)) and all(_is_int(i) and i >= 0 for i in suppressed),
            "a tuple of token ids >= 0",
        )
        object.__setattr__(self, "suppress_tokens", tuple(suppressed))  # gin and JSON give lists
        self._check_methods()

    def _check_methods(self):
        """Settings that belong to different methods, asked for together."""
        if self.suppress_tokens and (self.num_beams is not None or self.degeneration_penalty):
            raise ValueError(
                f"suppress_tokens={self.suppress_tokens} applies to greedy decoding and sampling; leave num_beams=None "
                "and degeneration_penalty=0."
            )
        if self.degeneration_penalty and (self.top_k < 2 or self.temperature > 0 or self.top_p < 1 or self.num_beams):
            raise ValueError(
                f"degeneration_penalty={self.degeneration_penalty} asks for contrastive search, which picks among "
                f"top_k >= 2 candidates without sampling: set top_k (e.g. 4), and leave temperature=0, top_p=1 "
                f"and num_beams=None."
            )
        if self.degeneration_penalty and (self.presence_penalty or self.frequency_penalty):
            raise ValueError(
                "Contrastive search penalises repetition through its degeneration_penalty; leave "
                "presence_penalty and frequency_penalty at 0."
            )
        if self.num_beams is not None and (self.temperature > 0 or self.top_k or self.top_p < 1):
            raise ValueError(
                f"num_beams={self.num_beams} asks for beam search, which does not sample: leave "
                "temperature=0, top_k=0 and top_p=1, or num_beams=None to sample."
            )


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _require(name: str, value, ok: bool, requirement: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} must be {requirement}.")


class Generation(NamedTuple):
    tokens: jax.Array  # [batch, max_new_tokens]: generated tokens, EOS included, 0 after it
    scores: jax.Array  # [batch]: see the module docstring
    # [batch]: speculative decoding's rounds (target forward passes) until the row was done; else None.
    rounds: jax.Array | None = None
