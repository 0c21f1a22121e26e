"""What t5lite knows of accelerators: peak bf16 FLOP/s (for MFU) and HBM per chip (for `t5lite compile`),
keyed by chip name; `chip_name` reads it off a `jax.Device` or its `device_kind`."""

from __future__ import annotations

GIB = 2**30
# Advertised dense bf16 peak per chip / GPU (H100 and H200: SXM parts).
PEAK_BF16_FLOPS = {
    "tpu_v4": 275e12,
    "tpu_v5e": 197e12,
    "tpu_v5p": 459e12,
    "tpu_v6e": 918e12,
    "a100": 312e12,
    "h100": 989e12,
    "h200": 989e12,
}
# HBM per chip (per JAX device: v4 and v5p run their two cores as one "megacore" device).
HBM_BYTES = {"tpu_v4": 32 * GIB, "tpu_v5e": 16 * GIB, "tpu_v5p": 95 * GIB, "tpu_v6e": 32 * GIB}

# `jax.Device.device_kind` of each TPU; NVIDIA kinds carry memory sizes, so they match by substring.
_TPU_KINDS = {
    "tpu v4": "tpu_v4",
    "tpu v5 lite": "tpu_v5e",
    "tpu v5e": "tpu_v5e",
    "tpu v5": "tpu_v5p",
    "tpu v5p": "tpu_v5p",
    "tpu v6 lite": "tpu_v6e",
    "tpu v6e": "tpu_v6e",
}
_GPU_KINDS = ("a100", "h100", "h200")


def peak_flops_per_device(device) -> float | None:
    """Peak bf16 FLOP/s of a `jax.Device` or its `device_kind` ('TPU v5 lite', 'NVIDIA H100 80GB HBM3').

    None for devices not in `PEAK_BF16_FLOPS` (CPUs, other GPUs), so that callers can measure
    a peak or ask for one instead of reporting a made-up MFU.
    """
    name = chip_name(device)
    return None if name is None else PEAK_BF16_FLOPS[name]


def chip_name(device) -> str | None:
    """The key of a `jax.Device` (or its `device_kind`) in `PEAK_BF16_FLOPS`, e.g. "tpu_v5p"; None if unknown."""
    kind = getattr(device, "device_kind", device).strip().lower()
    return _TPU_KINDS.get(kind) or next((gpu for gpu in _GPU_KINDS if gpu in kind), None)
