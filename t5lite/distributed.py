"""Joining a multi-process run (TPU pod slices, GPU clusters): `jax.distributed` from flags or
the cluster's environment, before anything touches a device."""

from __future__ import annotations

import os

import jax


def cluster_environment() -> str | None:
    """The multi-process launcher JAX can read its settings from, if this process runs under one."""
    env = os.environ
    if int(env.get("SLURM_NTASKS", "1")) > 1:
        return "SLURM"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    if "," in env.get("TPU_WORKER_HOSTNAMES", "") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "TPU pod"
    return None


def initialize(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Starts JAX's multi-controller runtime; True if this process is part of a multi-process run.

    With all three arguments (`--coordinator_address host:port --num_processes N --process_id i`)
    the run is set up by hand; without them JAX reads SLURM, Open MPI or TPU-pod settings from the
    environment, and a lone process stays single-process. On CPUs, processes talk through gloo.
    """
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    if any(value is not None for value in given.values()):
        missing = [f"--{name}" for name, value in given.items() if value is None]
        if missing:
            raise ValueError(
                f"A hand-set multi-process run needs --coordinator_address, --num_processes and "
                f"--process_id together; {', '.join(missing)} missing."
            )
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id={process_id} must be in [0, --num_processes={num_processes}).")
    elif cluster_environment() is None:
        return False
    if "cpu" in os.environ.get("JAX_PLATFORMS", "").split(","):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True
