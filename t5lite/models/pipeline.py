"""Pipeline parallelism: a scanned layer stack split over the `stage` axis of the mesh.

Each of the S stages holds L / S of the stack's layers (the stacked parameters split along their
`layers` axis). The batch is cut into M microbatches that flow stage to stage (a collective
permute around the ring each iteration), so all stages work at once except during the fill and
drain: the bubble. With R repeats (the circular, or interleaved, schedule) the stack is cut into
R·S chunks, stage s holds chunks s, S + s, 2S + s, ..., and a microbatch goes round the ring R
times; the bubble shrinks from (S-1)/(M+S-1) (GPipe) to (S-1)/(R·M+S-1).

Microbatch m holds the rows m, M + m, 2M + m, ... of the batch, so each (data, fsdp, expert)
shard keeps its own rows: entering the stages gathers the batch over `stage` alone, and leaving
them sums the outputs (only stage 0's are not zero) over it. The attention masks and position
tables the layers take are cut the same way and read by each stage for the microbatch it works
on; only activations travel between stages.

Checkpoints keep the stack's layer order whatever the stages: a stage's chunks are gathered in
the step (circular schedules move parameters between stages; GPipe does not). With a remat
policy, each iteration keeps only its inputs for the backward pass: the stacked residuals of every
iteration, bubble included, would otherwise outweigh what the policy saves.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from t5lite.config import ModelConfig
from t5lite.layers.attention_spec import SHARED_FIELDS

STAGE = "stage"  # the mesh axis
MICROBATCHES = (None, "batch", "length", "embed")  # [M, batch / M, length, embed]


def mesh_stages() -> int:
    """Stages of the mesh in context (1 without one, or without a `stage` axis)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty or STAGE not in mesh.axis_names else mesh.shape[STAGE]


def microbatches(config: ModelConfig, stages: int) -> int:
    return config.pipeline_microbatches or stages


def bubble_fraction(stages: int, microbatches: int, repeats: int) -> float:
    """The share of a step each stage idles: S - 1 of the R·M + S - 1 iterations."""
    return (stages - 1) / (repeats * microbatches + stages - 1)


def check_schedule(config: ModelConfig, stages: int) -> None:
    """Raises a ValueError saying what to change when `config` cannot run on `stages` stages."""
    if stages == 1:
        return
    chunks = stages * config.pipeline_repeats
    if not config.scan_layers:
        raise ValueError(f"A mesh with stage={stages} pipelines scanned layers; set ModelConfig.scan_layers=True.")
    if config.moe.num_experts:
        raise ValueError(
            f"Mixtures of experts do not run in pipeline stages yet (stage={stages}); use MeshShape.expert and "
            f"fsdp for them."
        )
    for stack, depth in config.layer_stacks.items():
        if depth % chunks:
            raise ValueError(
                f"The {stack}'s {depth} layers cannot be cut into stage={stages} x pipeline_repeats="
                f"{config.pipeline_repeats} equal chunks; choose a stage count and repeats whose product divides "
                f"{depth}."
            )
    if config.pipeline_repeats > 1 and microbatches(config, stages) < stages:
        raise ValueError(
            f"A circular schedule (pipeline_repeats={config.pipeline_repeats}) needs at least one microbatch per "
            f"stage: pipeline_microbatches={config.pipeline_microbatches} < stage={stages}."
        )


def run(
    block: Callable,
    variables,
    x,
    args: tuple,
    *,
    config: ModelConfig,
    dropout_key: jax.Array | None = None,
):
    """The stack's layers applied to x [batch, length, embed] through the stages of the mesh.

    `variables` are the scanned layers' (every leaf stacked on a leading layer axis); `block(
    variables, x, args, rngs)` applies a consecutive chunk of them (a leading axis of L / (R·S)).
    `args` are the layers' other arguments; every array in them with one entry per batch row is
    cut into microbatches with x.
    """
    stages, repeats = mesh_stages(), config.pipeline_repeats
    num_micro = microbatches(config, stages)
    batch = x.shape[0]
    if batch % num_micro:
        raise ValueError(
            f"A batch of {batch} rows cannot be cut into pipeline_microbatches={num_micro}; choose a number of "
            f"microbatches that divides the rows each step feeds the model."
        )
    per_row = _per_row(args, batch)
    cut = lambda a: a.reshape(batch // num_micro, num_micro, *a.shape[1:]).swapaxes(0, 1)  # [M, batch / M, ...]
    xs = cut(x)
    args = jax.tree.map(lambda a, row: cut(a) if row else a, args, per_row)
    staged = jax.tree.map(lambda v: _by_stage(v, stages, repeats), variables)  # [S, R, L / (R·S), ...]

    def stage_loop(staged, xs, args, dropout_key):
        xs = nn.with_logical_constraint(xs, MICROBATCHES)
        chunks = jax.tree.map(lambda v: v[0], staged)  # this stage's [R, L / (R·S), ...]
        stage = lax.axis_index(STAGE)
        ring = [(s, (s + 1) % stages) for s in range(stages)]
        work = repeats * num_micro  # (repeat, microbatch) pairs each stage runs, one per iteration

        def run_chunk(chunks, repeat, inputs, micro, rngs):
            row_args = jax.tree.map(lambda a, row: a[micro] if row else a, args, per_row)
            return block(jax.tree.map(lambda v: v[repeat], chunks), inputs, row_args, rngs)

        if config.remat_policy != "none":  # keep only each iteration's inputs for the backward pass
            run_chunk = jax.checkpoint(run_chunk, policy=jax.checkpoint_policies.nothing_saveable)

        def iteration(carry, t):
            received, finished = carry  # from the previous stage; stage 0: the last stage's outputs
            item = t - stage  # the pair this stage runs now (none in the bubble)
            repeat, micro = jnp.clip(item // num_micro, 0, repeats - 1), item % num_micro
            fresh = jnp.where(repeat == 0, xs[micro], finished[micro])
            inputs = jnp.where(stage == 0, fresh, received)
            rngs = None
            if dropout_key is not None:
                rngs = {"dropout": jax.random.fold_in(jax.random.fold_in(dropout_key, repeat * stages + stage), micro)}
            outputs = run_chunk(chunks, repeat, inputs, micro, rngs)
            outputs = jnp.where((item >= 0) & (item < work), outputs, 0)  # bubble slots pass zeros
            received = lax.ppermute(outputs, STAGE, ring)
            done = t - (stages - 1)  # the pair the last stage finished, now on stage 0
            keep = (stage == 0) & (done >= 0) & (done < work)
            finished = jnp.where(keep, finished.at[done % num_micro].set(received), finished)
            return (received, nn.with_logical_constraint(finished, MICROBATCHES)), None

        start = (jnp.zeros_like(xs[0]), jnp.zeros_like(xs))
        (_, finished), _ = lax.scan(iteration, start, jnp.arange(work + stages - 1))
        return lax.psum(jnp.where(stage == 0, finished, 0), STAGE)

    with nn.logical_axis_rules(_rules_within_stages(nn.get_logical_axis_rules())):  # `stage` is manual inside
        out = jax.shard_map(
            stage_loop,
            in_specs=(P(STAGE), P(), P(), P()),
            out_specs=P(),
            axis_names={STAGE},
            check_vma=False,  # the flash kernel's shard_map within has no varying-axis types
        )(staged, xs, args, dropout_key)
    # Back to the rows' own sharding (stage included), else XLA may keep what follows replicated.
    return nn.with_logical_constraint(out.swapaxes(0, 1).reshape(x.shape), MICROBATCHES[1:])


def _by_stage(value, stages: int, repeats: int):
    """[L, ...] -> [S, R, L / (R·S), ...]: stage s's chunks s, S + s, ... of the stack, in order."""
    per_chunk = value.shape[0] // (stages * repeats)
    return value.reshape(repeats, stages, per_chunk, *value.shape[1:]).swapaxes(0, 1)


def _per_row(args, batch: int):
    """Which leaves of the layers' arguments hold one entry per batch row: all but scalars, a
    [1, ...] bias broadcast over rows, and an attention spec's per-head tables."""

    def per_row(path, leaf):
        shared = getattr(path[-1], "name", None) in SHARED_FIELDS
        return not shared and leaf.ndim > 0 and leaf.shape[0] == batch

    return jax.tree_util.tree_map_with_path(per_row, args)


def _rules_within_stages(rules):
    """The logical rules without the `stage` axis, which is manual inside the stages."""

    def without_stage(axes):
        if isinstance(axes, (tuple, list)):
            kept = tuple(axis for axis in axes if axis != STAGE)
            return kept or None
        return None if axes == STAGE else axes

    return tuple((name, without_stage(axes)) for name, axes in rules)
