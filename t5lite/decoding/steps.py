"""A model as a decoding step function over its KV cache, and the cache's batch rows."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from t5lite.decoding.search import Step
from t5lite.models import build
from t5lite.models.params import unstack_layers


def model_step(model: nn.Module, params, encoder_args: tuple, hidden: bool = False):
    """(cache or None, tokens [B, T], **features) -> (logits [B, T, V], cache); None allocates. With
    `hidden`, the first output is (logits, the final hidden states [B, T, D] they are made from)."""
    method = model.decode if encoder_args else None

    def apply(cache, tokens, **features):
        variables = {"params": params} if cache is None else {"params": params, "cache": cache}
        logits, mutated = model.apply(
            variables,
            *encoder_args,
            tokens,
            enable_dropout=False,
            decode=True,
            mutable=["cache", "intermediates"] if hidden else ["cache"],
            method=method,
            **features,
        )
        if hidden:
            logits = (logits, mutated["intermediates"]["decoder"]["final_hidden"][0])
        return logits, mutated["cache"]

    return apply


def one_token(apply) -> Step:
    def step(cache, token):
        logits, cache = apply(cache, token[:, None])
        return logits[:, 0], cache

    return step


def batch_axes(allocate, *inputs) -> list[int | None]:
    """The batch axis of each cache leaf (None for leaves shared by all rows, like the write
    position): the axis that grows when the batch does. Found from shapes, so that it holds for
    scanned and unrolled layers alike."""
    grown = [jax.ShapeDtypeStruct((x.shape[0] + 1, *x.shape[1:]), x.dtype) for x in inputs]
    small, large = (jax.tree.leaves(jax.eval_shape(allocate, *args)) for args in (inputs, grown))
    return [next((i for i, (a, b) in enumerate(zip(s.shape, l.shape)) if a != b), None) for s, l in zip(small, large)]


def reorder_rows(cache, index, axes):
    leaves, treedef = jax.tree.flatten(cache)
    return jax.tree.unflatten(
        treedef, [x if axis is None else jnp.take(x, index, axis=axis) for x, axis in zip(leaves, axes)]
    )


def rewound(cache, position):
    """The cache with its write position set back to `position`. Keys are attended by position, so
    what was written past it is masked until overwritten."""

    def reset(path, x):
        return jnp.asarray(position, x.dtype) if getattr(path[-1], "key", None) == "position" else x

    return jax.tree_util.tree_map_with_path(reset, cache)


def decoding_model(model: nn.Module) -> tuple[nn.Module, bool]:
    """(the model decoding runs, whether its parameters must be unstacked first). On the CPU a scanned
    model decodes with its layers unrolled: XLA:CPU copies each layer's weights and cache out of the
    stacked arrays at every token (a fifth of T5-small's greedy decoding time). On TPU and GPU, which
    read them in place, the stacked parameters stay (unstacking would hold a second copy of them)."""
    if not model.config.scan_layers or jax.default_backend() != "cpu":
        return model, False
    return build(model.config.replace(scan_layers=False)), True


def unstacked(params, config):
    flat = traverse_util.flatten_dict(params, sep="/")
    return traverse_util.unflatten_dict(unstack_layers(flat, config), sep="/")
