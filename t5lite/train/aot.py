"""`t5lite compile`: a run's real train step, compiled ahead of time for a TPU topology.

libtpu describes any TPU topology without its chips, so a CPU-only machine can lower and compile
the sharded step (Pallas kernels included) for, say, a v5p-256 slice and read off what each chip
would hold: arguments (train state and batch), outputs, XLA's temporaries and code. That answers
"does this model fit there, with this mesh?" before anyone pays for the pod.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
from typing import Any, Mapping

import gin
import jax

from pallas_kernels.backend import compiling_for
from t5lite.models import active_param_count, param_count
from t5lite.models.params import param_axes, trainable_pattern
from t5lite.scaling import flops
from t5lite.sharding import BATCH_LOGICAL
from t5lite.train import loop

GIB = 2 ** 30
# HBM per chip (per JAX device: v4 and v5p run their two cores as one "megacore" device).
HBM_BYTES = {"tpu_v4": 32 * GIB, "tpu_v5e": 16 * GIB, "tpu_v5p": 95 * GIB, "tpu_v6e": 32 * GIB}
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
    xla_flops: float | None = None  # XLA's cost analysis, per device (each loop body counted once)
    pallas_kernels: int = 0  # Mosaic kernel calls in the compiled step
    model_flops: float = 0.0  # the exact model count (t5lite.scaling.flops), per device
    params: int = 0
    active_params: int = 0  # per token: mixtures of experts count the experts a token uses
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
        lines = [f"topology      {self.topology}: {self.num_devices} x {self.device_kind}, mesh {mesh}",
                 f"parameters    {self.params / 1e6:,.1f}M ({self.active_params / 1e6:,.1f}M active per token)"]
        if self.error is None:
            m = {key: format_bytes(value) for key, value in self.memory.items()}
            lines += [f"per device    arguments {m['argument']} (state + batch; optimizer statistics "
                      f"{format_bytes(self.optimizer_state_bytes)}), outputs {m['output']} ({m['alias']} of them in "
                      f"the arguments' buffers), temporaries {m['temp']}, code {m['code']}",
                      f"total         {format_bytes(self.bytes_per_device)} of {format_bytes(self.hbm_bytes)} HBM: "
                      f"{'fits' if self.fits else 'DOES NOT FIT'} "
                      f"({self.bytes_per_device / self.hbm_bytes:.0%})",
                      f"step FLOPs    {self.model_flops:.3g} per device (XLA's cost analysis, which counts a "
                      f"scanned layer once: {self.xla_flops or 0:.3g})",
                      f"Pallas calls  {self.pallas_kernels} Mosaic kernel call sites in the compiled step"]
        else:
            lines += [f"DOES NOT FIT  {self.error}"]
        return "\n".join(lines)

    @property
    def num_devices(self) -> int:
        return math.prod(self.mesh.values())


def shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs carrying their shardings."""
    return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def format_bytes(num_bytes: int) -> str:
    return f"{num_bytes / GIB:.2f} GiB" if num_bytes >= GIB / 10 else f"{num_bytes / 2 ** 20:.1f} MiB"


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
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology, **megacore).devices)
    except Exception as error:  # libtpu reports bad names as runtime errors of several kinds
        raise ValueError(f"libtpu does not know the TPU topology {topology!r} ({error}). Name a chip generation "
                         f"and its chip grid, e.g. {TOPOLOGY_EXAMPLES}.") from None


def train_arguments() -> dict[str, Any]:
    """`train`'s keyword arguments as the parsed gin config binds them, defaults filled in."""
    parameters = inspect.signature(loop.train).parameters
    arguments = {name: p.default for name, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    arguments.update(gin.get_bindings(loop.train))
    missing = sorted(name for name, value in arguments.items() if value is gin.REQUIRED)
    if missing:
        raise ValueError(f"The gin config binds no {', '.join('train.' + name for name in missing)}; compile "
                         f"takes the same gin files as `t5lite train`.")
    return arguments


def compile_train_step(topology: str, arguments: Mapping[str, Any]) -> CompileReport:
    """Compiles the train step `arguments` (see `train_arguments`) describe for `topology`."""
    args = dict(arguments)
    config, lengths, batch_size = args["model_config"], args["task_feature_lengths"], args["batch_size"]
    kind = args["model_kind"] or ("encoder_decoder" if config.is_encoder_decoder else "decoder")
    loop.check_run(config, kind, lengths, batch_size, args["num_microbatches"], args["pack"])
    trainable = trainable_pattern(config, args["trainable"])
    devices = topology_devices(topology)
    chip = flops.chip_name(devices[0])
    if chip not in HBM_BYTES:
        raise ValueError(f"t5lite knows the HBM of {', '.join(HBM_BYTES)} chips, not of {devices[0].device_kind!r} "
                         f"({topology}); add it to t5lite.train.aot.HBM_BYTES.")
    with compiling_for("tpu"):
        tx = args["optimizer"](learning_rate=args["learning_rate"], param_axes=param_axes(config))
        step = loop.TrainStep.create(config, args["mesh_shape"], tx, args["learning_rate"], seed=args["seed"],
                                     batch_size=batch_size, num_microbatches=args["num_microbatches"],
                                     z_loss=args["z_loss"], label_smoothing=args["label_smoothing"],
                                     devices=devices, trainable=trainable)
        partitioner = step.partitioner
        stream = loop.data_stream(args["mixture_or_task_name"], kind, lengths, batch_size, split="train",
                                  pack=args["pack"], seed=args["seed"])
        batch = {name: jax.ShapeDtypeStruct((batch_size, *shape[1:]), dtype,
                                            sharding=partitioner.sharding(BATCH_LOGICAL))
                 for name, (shape, dtype) in stream.batch_spec.items()}
        key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
        rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=partitioner.replicated)
        with partitioner.context():
            lowered = step.fn.lower(step.abstract_state, batch, rng)
    encoder_length, decoder_length = loop.model_lengths(kind, lengths)
    report = CompileReport(
        topology=topology, device_kind=devices[0].device_kind, mesh=dict(partitioner.mesh.shape),
        hbm_bytes=HBM_BYTES[chip], params=param_count(config), active_params=active_param_count(config),
        optimizer_state_bytes=shard_bytes(step.abstract_state.opt_state),
        model_flops=batch_size * flops.training_flops_per_sequence(
            config, encoder_length, decoder_length, frozen_base=trainable is not None) / len(devices))
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        return dataclasses.replace(report, error=str(error).splitlines()[0])
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return dataclasses.replace(report, xla_flops=(cost or {}).get("flops"),
                               pallas_kernels=compiled.as_text().count("tpu_custom_call"), memory={
        "argument": memory.argument_size_in_bytes, "output": memory.output_size_in_bytes,
        "alias": memory.alias_size_in_bytes, "temp": memory.temp_size_in_bytes,
        "code": memory.generated_code_size_in_bytes})
