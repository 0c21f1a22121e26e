"""Meshes, logical axis rules, and the shardings of parameters, train states and batches.

Layers name their axes logically (`embed`, `heads`, `mlp`, ...); a mesh has the physical axes
`data`, `stage`, `fsdp`, `tensor` and `expert`. The rules map one onto the other, so data
parallelism, FSDP (ZeRO-3: weights and optimizer state split, gathered layer by layer), tensor
parallelism (Megatron-style splits of heads and MLP units), pipeline parallelism (layers split
into stages, `t5lite.models.pipeline`) and their mixes differ only in `MeshShape`:

    batch                                  -> data, fsdp, expert, stage
    layers                                 -> stage
    expert_batch                           -> data, fsdp
    embed                                  -> fsdp
    heads, kv_heads, mlp, joined_kv, vocab,
    expert_mlp                             -> tensor
    expert                                 -> expert

Flax applies the rules in order and never uses a mesh axis twice in one array, so activations
[batch, length, embed] split their batch over fsdp while weights split `embed` over it.
Expert parallelism: tokens dispatched to experts [expert, expert_batch, capacity, embed] move
the `expert` mesh axis from their groups to their experts (an all-to-all), so each device runs
only its own experts; their groups stay split over data and fsdp, which is why `expert_batch`
comes before `embed`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import numpy as np
from flax import traverse_util
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels import backend as kernel_backend
from t5lite.config import ModelConfig, divisors
from t5lite.models import abstract_params, param_axes, pipeline
from t5lite.models.params import split_params

MESH_AXES = ("data", "stage", "fsdp", "tensor", "expert")
# `stage` last: the rows of one (data, fsdp, expert) shard are then whole within it, so entering
# the pipeline gathers them over `stage` alone.
BATCH_AXES = ("data", "fsdp", "expert", "stage")
BATCH_LOGICAL = ("batch", "length")


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Devices per mesh axis; one axis may be -1: all the devices the others leave.

    `slices` > 1 is a multi-slice TPU run: the `data` axis is split over that many slices,
    which talk over the data-centre network, while the other axes stay within a slice.
    """

    data: int = -1
    stage: int = 1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1
    slices: int = 1

    def sizes(self, num_devices: int) -> dict[str, int]:
        """Each mesh axis's size on `num_devices` devices; a clear error when they cannot fit."""
        sizes = {axis: getattr(self, axis) for axis in MESH_AXES}
        bad = {axis: size for axis, size in sizes.items() if not isinstance(size, int) or size == 0 or size < -1}
        if bad:
            raise ValueError(f"Mesh axis sizes must be positive integers, or -1 for the rest; got {bad}.")
        free = [axis for axis, size in sizes.items() if size == -1]
        if len(free) > 1:
            raise ValueError(f"Only one mesh axis may be -1 (all remaining devices), but {' and '.join(free)} are.")
        fixed = math.prod(size for size in sizes.values() if size != -1)
        if free and num_devices % fixed == 0:
            sizes[free[0]] = num_devices // fixed
        if math.prod(sizes.values()) != num_devices:
            given = ", ".join(f"{axis}={getattr(self, axis)}" for axis in MESH_AXES)
            raise ValueError(
                f"The mesh axes ({given}) need {'a multiple of ' if free else ''}{fixed} devices, but "
                f"there are {num_devices}. Choose sizes that multiply to {num_devices}, or set one "
                f"axis to -1."
            )
        if not isinstance(self.slices, int) or self.slices < 1 or sizes["data"] % self.slices:
            raise ValueError(
                f"MeshShape.slices={self.slices} must be a positive integer dividing the data axis "
                f"(data={sizes['data']}): each slice holds an equal part of it."
            )
        return sizes


GinMeshShape = gin.external_configurable(MeshShape, name="MeshShape", module="t5lite")


def make_mesh(shape: MeshShape, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh over `devices` (default: all devices of all processes), laid out along the
    physical interconnect where the platform has one (TPU torus, multi-slice)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = shape.sizes(len(devices))
    dims = tuple(sizes[axis] for axis in MESH_AXES)
    if shape.slices > 1:
        if getattr(devices[0], "slice_index", None) is None:
            raise ValueError(
                f"MeshShape.slices={shape.slices} needs multi-slice TPU devices, but these "
                f"{devices[0].platform} devices belong to no slice; set MeshShape.slices=1."
            )
        within_slice = (sizes["data"] // shape.slices,) + dims[1:]
        array = mesh_utils.create_hybrid_device_mesh(
            within_slice, (shape.slices,) + (1,) * (len(MESH_AXES) - 1), devices, allow_split_physical_axes=True
        )
    else:
        array = mesh_utils.create_device_mesh(dims, devices, allow_split_physical_axes=True)
    return Mesh(array, MESH_AXES)


def axis_rules(config: ModelConfig, mesh: Mesh) -> tuple[tuple[str, Any], ...]:
    """Logical -> mesh axis rules for `config` on `mesh`.

    Key/value heads split over `tensor` only when it divides them (GQA/MQA with few KV heads
    keeps the small K/V projections whole on every tensor device). Without pipeline stages no
    rule names `stage`, so shardings read the same as on a mesh without that axis.
    """
    staged = mesh.shape["stage"] > 1
    # expert_batch before embed: tokens dispatched to experts keep their groups split over data and fsdp.
    rules = [
        ("batch", BATCH_AXES if staged else tuple(axis for axis in BATCH_AXES if axis != "stage")),
        ("expert_batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("mlp", "tensor"),
        ("joined_kv", "tensor"),
        ("vocab", "tensor"),
        ("expert", "expert"),
        ("expert_mlp", "tensor"),
    ]
    if config.kv_heads % mesh.shape["tensor"] == 0:
        rules.append(("kv_heads", "tensor"))
    if staged:
        rules.append(("layers", "stage"))
    return tuple(rules)


@dataclasses.dataclass(frozen=True)
class Partitioner:
    """A mesh and the rules that place a model's arrays on it."""

    mesh: Mesh
    rules: tuple[tuple[str, Any], ...]
    pipeline_microbatches: int = 1  # what a pipeline cuts the batch into (1 without stages)

    @classmethod
    def create(cls, config: ModelConfig, shape: MeshShape, devices: Sequence[Any] | None = None) -> Partitioner:
        mesh = make_mesh(shape, devices)
        stages = mesh.shape["stage"]
        pipeline.check_schedule(config, stages)
        tensor = mesh.shape["tensor"]
        if config.num_heads % tensor:
            raise ValueError(
                f"The tensor axis (tensor={tensor}) must divide ModelConfig.num_heads="
                f"{config.num_heads}; choose MeshShape.tensor from {divisors(config.num_heads)}."
            )
        experts, moe = mesh.shape["expert"], config.moe
        if moe.num_experts and moe.num_experts % experts:
            raise ValueError(
                f"The expert axis (expert={experts}) must divide MoeConfig.num_experts="
                f"{moe.num_experts}: each device group holds whole experts. Choose MeshShape.expert "
                f"from {divisors(moe.num_experts)}."
            )
        if moe.dropless and experts > 1:
            raise ValueError(
                "MoeConfig.dropless=True sorts tokens by expert on each device and does not split "
                "experts over devices; set MeshShape.expert=1 or use capacity-based routing."
            )
        quant = config.weight_quant
        int8_kernels = config.int8_dense or (quant.families and quant.activations != "none")
        if int8_kernels and mesh.size > 1 and kernel_backend.platform() in ("tpu", "gpu"):
            raise ValueError(
                f"ModelConfig.int8_dense={config.int8_dense} / WeightQuantConfig.activations="
                f"{quant.activations!r} run Pallas int8 matmul kernels that are not sharded yet; "
                f"use one device, or weight-only int8 / no int8_dense on this mesh."
            )
        microbatches = pipeline.microbatches(config, stages) if stages > 1 else 1
        return cls(mesh, axis_rules(config, mesh), microbatches)

    @contextlib.contextmanager
    def context(self):
        """Where the model's logical sharding constraints take effect: trace and compile inside it."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def sharding(self, logical_axes: Sequence[str | None]) -> NamedSharding:
        return NamedSharding(self.mesh, nn.logical_to_mesh_axes(tuple(logical_axes), self.rules))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def batch_shards(self) -> int:
        """Devices the batch is split over (each holds batch_size / batch_shards rows)."""
        return math.prod(self.mesh.shape[axis] for axis in BATCH_AXES)

    def params(self, config: ModelConfig):
        """NamedShardings of the parameters, checked to divide every parameter evenly."""
        shapes = traverse_util.flatten_dict(abstract_params(config), sep="/")
        shardings = {}
        for path, axes in param_axes(config).items():
            self._check_divides(path, axes, shapes[path].shape)
            shardings[path] = self.sharding(axes)
        return traverse_util.unflatten_dict(shardings, sep="/")

    def state(self, abstract_state, param_shardings, trainable: str | None = None):
        """Shardings of a train state: parameters as given, optimizer statistics like the
        parameter they belong to (factored statistics keep the spec of the axes they keep),
        counters replicated. The optimizer state covers the `trainable` parameters."""
        params, shardings = (split_params(tree, trainable)[0] for tree in (abstract_state.params, param_shardings))
        params_def = jax.tree.structure(params)
        abstract_params, shardings = jax.tree.leaves(params), jax.tree.leaves(shardings)

        def place(subtree):
            if jax.tree.structure(subtree) != params_def:
                return self.replicated
            leaves = [
                _like_param(leaf, param, sharding)
                for leaf, param, sharding in zip(jax.tree.leaves(subtree), abstract_params, shardings)
            ]
            return jax.tree.unflatten(params_def, leaves)

        placed = jax.tree.map(place, abstract_state.opt_state, is_leaf=lambda x: jax.tree.structure(x) == params_def)
        return abstract_state.replace(step=self.replicated, params=param_shardings, opt_state=placed)

    def check_batch(self, batch_size: int, num_microbatches: int = 1) -> None:
        shards, rows = self.batch_shards, batch_size // num_microbatches
        if rows % shards:
            sizes = ", ".join(f"{axis}={self.mesh.shape[axis]}" for axis in BATCH_AXES)
            raise ValueError(
                f"The batch is split over {shards} devices ({sizes}), so each microbatch of "
                f"batch_size={batch_size} / num_microbatches={num_microbatches} rows must be a "
                f"multiple of {shards}. Change train.batch_size, num_microbatches or the mesh."
            )
        within_stage = self.pipeline_microbatches * shards // self.mesh.shape["stage"]
        if rows % within_stage:
            raise ValueError(
                f"The pipeline cuts each microbatch of {rows} rows into pipeline_microbatches="
                f"{self.pipeline_microbatches}, whose rows split over {shards // self.mesh.shape['stage']} "
                f"devices (data, fsdp, expert), so the rows must be a multiple of {within_stage}. Change "
                f"train.batch_size, num_microbatches, ModelConfig.pipeline_microbatches or the mesh."
            )

    def data_shard(self, batch_size: int, process_index: int | None = None) -> tuple[int, int]:
        """(index, count) of the data shard a process reads (batch_size / count rows a step).

        A process feeds the blocks of batch rows its devices hold, in row order; processes holding
        the same blocks (a tensor group spanning hosts) read the same shard.
        """
        process_index = jax.process_index() if process_index is None else process_index
        held: dict[int, set[int]] = {}
        for device, index in self.sharding(BATCH_LOGICAL).devices_indices_map((batch_size, 1)).items():
            held.setdefault(device.process_index, set()).add(index[0].indices(batch_size)[0])
        groups = sorted({frozenset(starts) for starts in held.values()}, key=min)
        if sum(map(len, groups)) != len(set().union(*groups)) or len(set(map(len, groups))) != 1:
            raise ValueError(
                f"On this mesh ({dict(self.mesh.shape)}) processes hold overlapping or unequal sets of "
                f"batch rows, so they cannot feed their own rows; change MeshShape (e.g. a smaller "
                f"tensor axis, kept within hosts)."
            )
        return groups.index(frozenset(held[process_index])), len(groups)

    def global_batch(self, local_batch: Mapping[str, np.ndarray], batch_size: int) -> dict[str, jax.Array]:
        """One global array of `batch_size` rows per feature from this process's rows: the blocks
        its devices hold, in row order (see `data_shard`)."""
        sharding = self.sharding(BATCH_LOGICAL)

        def assemble(value):
            shape = (batch_size, *value.shape[1:])
            rows = {
                device: index[0].indices(batch_size)[:2]
                for device, index in sharding.addressable_devices_indices_map(shape).items()
            }
            local = {start: i * (stop - start) for i, (start, stop) in enumerate(sorted(set(rows.values())))}
            arrays = [
                jax.device_put(value[local[start] : local[start] + stop - start], device)
                for device, (start, stop) in rows.items()
            ]
            return jax.make_array_from_single_device_arrays(shape, sharding, arrays)

        return {name: assemble(value) for name, value in local_batch.items()}

    def _check_divides(self, name: str, axes: Sequence[str | None], shape: Sequence[int]) -> None:
        spec = nn.logical_to_mesh_axes(tuple(axes), self.rules)
        for size, logical, mesh_axes in zip(shape, axes, spec):
            mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes or ()
            devices = math.prod(self.mesh.shape[axis] for axis in mesh_axes)
            if size % devices:
                split = ", ".join(f"{axis}={self.mesh.shape[axis]}" for axis in mesh_axes)
                raise ValueError(
                    f"Parameter {name} has {size} entries along its {logical!r} axis, which the mesh "
                    f"splits over {split} ({devices} devices); {devices} must divide {size}. Change "
                    f"the mesh or the model dimension."
                )


def abstract_with_shardings(tree, shardings):
    """ShapeDtypeStructs carrying their target shardings: what restore and AOT compile take."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _like_param(leaf, param, sharding: NamedSharding) -> NamedSharding:
    """The sharding of an optimizer statistic of `param`: the parameter's along every axis the
    statistic keeps whole (a factored statistic averages some axes down to size 1); replicated when
    it is shaped otherwise (a counter, a placeholder)."""
    if leaf.ndim != param.ndim or leaf.size == 1 < param.size:
        return NamedSharding(sharding.mesh, P())
    spec = tuple(sharding.spec) + (None,) * (param.ndim - len(sharding.spec))
    return NamedSharding(
        sharding.mesh, P(*(axes if kept == full else None for axes, kept, full in zip(spec, leaf.shape, param.shape)))
    )
