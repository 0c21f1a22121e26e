"""`t5lite compile`: a run's real train step, compiled ahead of time for a TPU topology.

libtpu describes any TPU topology without its chips, so a CPU-only machine can lower and compile
the sharded step (Pallas kernels included) for, say, a v5p-256 slice and read off what each chip
would hold: arguments (train state and batch), outputs, XLA's temporaries and code. That answers
"does this model fit there, with this mesh?" before anyone pays for the pod.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax

from pallas_kernels.backend import compiling_for
from t5lite import hardware
from t5lite.models import abstract_params, active_param_count, param_count, pipeline
from t5lite.sharding import BATCH_LOGICAL, abstract_with_shardings
from t5lite.train import loop
from t5lite.train.distillation import teacher_for
from t5lite.train.spec import RunSpec

TOPOLOGY_EXAMPLES = "v4:2x2x2, v5e:2x2, v5e:4x4, v5p:2x2x2, v5p:4x4x8, v6e:4x4"


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """Per-device memory and FLOPs of one compiled train step (`error`: why it did not compile)."""

    topology: str
    device_kind: str
    mesh: dict[str, int]
    hbm_bytes: int
    memory: dict[str, int] = dataclasses.field(default_factory=dict)  # from XLA's memory analysis
    optimizer_state_bytes: int = 0  # per device: the optimizer's statistics, part of the arguments
    reference_bytes: int = 0  # per device: the frozen models' parameters (a teacher, a reference, a reward model)
    xla_flops: float | None = None  # XLA's cost analysis, per device (each loop body counted once)
    pallas_kernels: int = 0  # Mosaic kernel calls in the compiled step
    model_flops: float = 0.0  # the exact model count (t5lite.models.flops), per device
    params: int = 0
    active_params: int = 0  # per token: mixtures of experts count the experts a token uses
    pipeline: tuple[int, int, int] | None = None  # stages, microbatches, repeats: with a `stage` axis
    error: str | None = None

    @property
    def bytes_per_device(self) -> int:
        m = self.memory
        return m["argument"] + m["output"] - m["alias"] + m["temp"] + m["code"] if m else 0

    @property
    def fits(self) -> bool:
        return self.error is None and self.bytes_per_device <= self.hbm_bytes

    def summary(self) -> str:
        mesh = " ".join(f"{axis}={size}" for axis, size in self.mesh.items())
        lines = [
            f"topology      {self.topology}: {self.num_devices} x {self.device_kind}, mesh {mesh}",
            f"parameters    {self.params / 1e6:,.1f}M ({self.active_params / 1e6:,.1f}M active per token)",
        ]
        if self.pipeline:
            stages, microbatches, repeats = self.pipeline
            schedule = f"circular, {repeats} chunks per stage" if repeats > 1 else "GPipe"
            lines.append(
                f"pipeline      {stages} stages, {microbatches} microbatches, {schedule}: each stage idles "
                f"{self.bubble:.0%} of the step (the bubble)"
            )
        if self.error is None:
            m = {key: format_bytes(value) for key, value in self.memory.items()}
            frozen = f"; frozen models {format_bytes(self.reference_bytes)}" if self.reference_bytes else ""
            lines += [
                f"per device    arguments {m['argument']} (state + batch; optimizer statistics "
                f"{format_bytes(self.optimizer_state_bytes)}{frozen}), outputs {m['output']} ({m['alias']} of "
                f"them in the arguments' buffers), temporaries {m['temp']}, code {m['code']}",
                f"total         {format_bytes(self.bytes_per_device)} of {format_bytes(self.hbm_bytes)} HBM: "
                f"{'fits' if self.fits else 'DOES NOT FIT'} "
                f"({self.bytes_per_device / self.hbm_bytes:.0%})",
                f"step FLOPs    {self.model_flops:.3g} per device (XLA's cost analysis, which counts a "
                f"scanned layer once: {self.xla_flops or 0:.3g})",
                f"Pallas calls  {self.pallas_kernels} Mosaic kernel call sites in the compiled step",
            ]
        else:
            lines += [f"DOES NOT FIT  {self.error}"]
        return "\n".join(lines)

    @property
    def bubble(self) -> float:
        return pipeline.bubble_fraction(*self.pipeline) if self.pipeline else 0.0

    @property
    def num_devices(self) -> int:
        return math.prod(self.mesh.values())


def shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs carrying their shardings."""
    return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def format_bytes(num_bytes: int) -> str:
    """In the largest unit that keeps a leading digit: 0.50 GiB, 12.3 MiB, 4.0 KiB."""
    if num_bytes >= hardware.GIB / 10:
        return f"{num_bytes / hardware.GIB:.2f} GiB"
    if num_bytes >= 2**20 / 10:
        return f"{num_bytes / 2**20:.1f} MiB"
    return f"{num_bytes / 2**10:.1f} KiB"


def topology_devices(topology: str) -> list:
    """The devices of a TPU topology such as "v5p:4x4x8", described by libtpu (no TPU needed)."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # describing a topology never opens a chip
    try:
        import libtpu  # noqa: F401
    except ImportError as error:
        raise ValueError("Compiling for a TPU topology needs libtpu: pip install 't5lite[tpu]'.") from error
    from jax.experimental import topologies

    # v4 and v5p chips have two TensorCores that JAX drives as one device ("megacore").
    megacore = {"chip_config_name": "megacore"} if topology.split(":")[0] in ("v4", "v5p") else {}
    try:
        with hardware.native_stderr_silenced():  # libtpu logs an error line where no TPU is attached
            return list(topologies.get_topology_desc(platform="tpu", topology_name=topology, **megacore).devices)
    except Exception as error:  # libtpu reports bad names as runtime errors of several kinds
        raise ValueError(
            f"libtpu does not know the TPU topology {topology!r} ({error}). Name a chip generation "
            f"and its chip grid, e.g. {TOPOLOGY_EXAMPLES}."
        ) from None


def pipeline_schedule(partitioner, config) -> tuple[int, int, int] | None:
    stages = partitioner.mesh.shape["stage"]
    return (stages, partitioner.pipeline_microbatches, config.pipeline_repeats) if stages > 1 else None


def compile_train_step(topology: str, spec: RunSpec) -> CompileReport:
    """Compiles the train step `t5lite train` would run for `spec` (the frozen models it runs
    included: a distillation teacher, a DPO or RL reference, a reward model) for `topology`."""
    config = spec.model_config
    devices = topology_devices(topology)
    chip = hardware.chip_name(devices[0])
    if chip not in hardware.HBM_BYTES:
        raise ValueError(
            f"t5lite knows the HBM of {', '.join(hardware.HBM_BYTES)} chips, not of "
            f"{devices[0].device_kind!r} ({topology}); add it to t5lite.hardware.HBM_BYTES."
        )
    teacher = teacher_for(spec.distillation, config, spec.num_steps) if spec.distillation else None
    frozen = spec.frozen_configs(teacher.config if teacher else None)
    with compiling_for("tpu"):
        step = loop.TrainStep.for_run(spec, teacher, devices)
        partitioner = step.partitioner
        batch = {
            name: jax.ShapeDtypeStruct(
                (spec.batch_size, *shape[1:]), dtype, sharding=partitioner.sharding(BATCH_LOGICAL)
            )
            for name, (shape, dtype) in spec.data_stream().batch_spec.items()
        }
        key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
        rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=partitioner.replicated)
        references = tuple(
            abstract_with_shardings(abstract_params(c), shardings)
            for c, shardings in zip(frozen, step.frozen_shardings)
        )
        with partitioner.context():
            lowered = step.fn.lower(step.abstract_state, batch, rng, *references)
    report = CompileReport(
        topology=topology,
        device_kind=devices[0].device_kind,
        mesh=dict(partitioner.mesh.shape),
        hbm_bytes=hardware.HBM_BYTES[chip],
        params=param_count(config),
        active_params=active_param_count(config),
        optimizer_state_bytes=shard_bytes(step.abstract_state.opt_state),
        reference_bytes=shard_bytes(references),
        model_flops=spec.flops_per_step(teacher.config if teacher else None) / len(devices),
        pipeline=pipeline_schedule(partitioner, config),
    )
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        return dataclasses.replace(report, error=str(error).splitlines()[0])
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return dataclasses.replace(
        report,
        xla_flops=(cost or {}).get("flops"),
        pallas_kernels=compiled.as_text().count("tpu_custom_call"),
        memory={
            "argument": memory.argument_size_in_bytes,
            "output": memory.output_size_in_bytes,
            "alias": memory.alias_size_in_bytes,
            "temp": memory.temp_size_in_bytes,
            "code": memory.generated_code_size_in_bytes,
        },
    )
