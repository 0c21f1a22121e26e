"""Ahead-of-time TPU compilation (v5e via libtpu) and CUDA/Triton lowering on a CPU-only machine."""

import functools
import os

# Only compiling here, never touching a chip: let several test processes (pytest -n) load libtpu.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

TPU_TOPOLOGY = "v5e:2x2"


@functools.cache
def tpu_devices():
    """The topology's devices, or skip when libtpu is missing (it is in the test extras)."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        pytest.skip("libtpu is not installed: pip install libtpu (needed to compile TPU kernels ahead of time)")
    from jax.experimental import topologies

    return topologies.get_topology_desc(platform="tpu", topology_name=TPU_TOPOLOGY).devices


def compile_for_tpu(fn, *shapes, specs=None, out_specs=None):
    """Compiled HLO text of `fn` for one v5e chip or, given one PartitionSpec per argument (and
    `out_specs`), for the whole topology with `fn` running per shard under shard_map."""
    devices = tpu_devices()
    if specs is None:
        mesh, specs = Mesh(np.array(devices[:1]), ("data",)), [P()] * len(shapes)
    else:
        mesh = Mesh(np.array(devices), ("data",))
        fn = jax.shard_map(fn, mesh=mesh, in_specs=tuple(specs), out_specs=out_specs, check_vma=False)
    args = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, p)) for s, p in zip(shapes, specs)]
    return jax.jit(fn).lower(*args).compile().as_text()


def lower_for_cuda(fn, *shapes):
    """StableHLO text of `fn` lowered for CUDA (Pallas runs the Triton lowering here)."""
    return jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()


TPU_KERNEL = "tpu_custom_call"
TRITON_KERNEL = "xla.gpu.triton"
