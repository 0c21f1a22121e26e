"""What t5lite knows of accelerators: peak bf16 FLOP/s (for MFU) and HBM per chip (for `t5lite compile`),
keyed by chip name (`chip_name` reads it off a `jax.Device` or its `device_kind`); whether a machine
has any; and how to keep native libraries' start-up notices about them off the console."""

from __future__ import annotations

import contextlib
import os
import pathlib
import sys

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


_GOOGLE = "0x1ae0"  # PCI vendor of TPU chips
_GPU_VENDORS = ("0x10de", "0x1002")  # NVIDIA, AMD; their display and 3D controllers are PCI class 0x03
_ACCELERATOR_DEVICE_FILES = ("nvidia*", "accel*", "vfio/*", "kfd")


def no_accelerator_here(root: pathlib.Path = pathlib.Path("/")) -> bool:
    """Whether this Linux machine plainly has no TPU or GPU: none on the PCI bus and no device files.
    Anywhere this cannot be told (another OS, no sysfs), False."""
    pci = root / "sys/bus/pci/devices"
    if not pci.is_dir():
        return False
    for device in pci.iterdir():
        vendor, kind = (_read(device / name) for name in ("vendor", "class"))
        if vendor == _GOOGLE or vendor in _GPU_VENDORS and kind.startswith("0x03"):
            return False
    return not any(any((root / "dev").glob(pattern)) for pattern in _ACCELERATOR_DEVICE_FILES)


def _read(path: pathlib.Path) -> str:
    return path.read_text().strip() if path.is_file() else ""


@contextlib.contextmanager
def native_stderr_silenced():
    """Meanwhile, what native libraries write to the process's stderr (fd 2) is dropped: TensorFlow's
    import notices (oneDNN, CUDA) and libtpu's complaint that it finds no TPU, neither an error.
    Python exceptions still propagate, and print once this is over."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
