"""Preference optimisation on (prompt, chosen, rejected) triples: DPO against a frozen reference.

A pair batch holds the chosen responses in its first half of rows and the rejected ones in the
second, each after its prompt (the encoder's input, or a prefix-LM decoder's prefix); a row's
score is the log-probability of its response tokens. `toy_pairs` makes a small preference set
from the built-in instruction data: the right answer is chosen over a near miss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import seqio

from t5lite.config import ModelConfig
from t5lite.data.instructions import TEMPLATE, builtin_examples
from t5lite.models import build
from t5lite.models.params import merge_params, split_params
from t5lite.train.losses import dpo, sequence_log_probs
from t5lite.train.step import TrainState, model_features


def near_miss(response: str) -> str:
    """A plausible wrong answer: the other parity, the next number, or one word short."""
    if response in ("even", "odd"):
        return "odd" if response == "even" else "even"
    if response.isdigit():
        return str(int(response) + 1)
    return " ".join(response.split()[:-1])


def toy_pairs(split: str = "train") -> list[dict[str, str]]:
    return [{"prompt": TEMPLATE.format(instruction=r["instruction"]), "chosen": r["response"],
             "rejected": near_miss(r["response"])} for r in builtin_examples(split)]


def pair_batch(pairs, vocabulary: seqio.Vocabulary, config: ModelConfig, prompt_length: int,
               response_length: int) -> dict[str, np.ndarray]:
    """Model features of the chosen rows, then the rejected rows; prompts keep their ends."""
    rows = [(p["prompt"], p[side]) for side in ("chosen", "rejected") for p in pairs]
    eos = vocabulary.eos_id
    prompts = [vocabulary.encode(prompt)[-(prompt_length - 1):] + [eos] for prompt, _ in rows]
    responses = [vocabulary.encode(response)[:response_length - 1] + [eos] for _, response in rows]
    if config.is_encoder_decoder:
        targets = _pad(responses, response_length)
        return {"encoder_input_tokens": _pad(prompts, prompt_length), "decoder_target_tokens": targets,
                "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
                "decoder_loss_weights": (targets > 0).astype(np.int32)}
    length = prompt_length + response_length
    sequences = [p + r for p, r in zip(prompts, responses)]
    targets = _pad(sequences, length)
    weights = np.zeros_like(targets)
    prefix = np.zeros_like(targets)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        weights[i, len(p):len(p) + len(r)] = 1
        prefix[i, :len(p)] = 1
    return {"decoder_target_tokens": targets, "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
            "decoder_loss_weights": weights, "decoder_causal_attention": prefix}


def _pad(rows, length: int) -> np.ndarray:
    out = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


def response_log_probs(config: ModelConfig, params, batch) -> jax.Array:
    logits = build(config).apply({"params": params}, **model_features(config, batch), enable_dropout=False)
    return sequence_log_probs(logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"])


def dpo_step(state: TrainState, batch, reference_params, *, config: ModelConfig, tx: optax.GradientTransformation,
             beta: float = 0.1, trainable: str | None = None):
    """(new state, metrics): one DPO update of the `trainable` parameters (all when None). Metrics:
    the mean loss, the mean implicit reward margin and the share of pairs it ranks right."""
    reference = jax.lax.stop_gradient(response_log_probs(config, reference_params, batch))
    params, frozen = split_params(state.params, trainable)

    def loss_fn(p):
        policy = response_log_probs(config, merge_params(p, frozen), batch)
        half = policy.shape[0] // 2
        losses, margins = dpo(policy[:half], policy[half:], reference[:half], reference[half:], beta)
        return jnp.mean(losses), margins

    (loss, margins), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, state.opt_state, params)
    new_params = merge_params(optax.apply_updates(params, updates), frozen)
    metrics = {"loss": loss, "margin": jnp.mean(margins), "pair_accuracy": jnp.mean(margins > 0)}
    return TrainState(step=state.step + 1, params=new_params, opt_state=opt_state), metrics
