"""Backend names shared by the kernels, and what `backend="auto"` picks."""

import jax

# "interpret" runs the TPU kernel through the Pallas interpreter (any platform);
# "gpu_interpret" does the same for the GPU (Triton) kernel.
BACKENDS = ("auto", "tpu", "gpu", "interpret", "gpu_interpret")


def resolve(backend):
    """A concrete backend name; "auto" follows the default JAX platform (CPU -> "interpret")."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    return {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}.get(jax.default_backend(), "interpret")


def is_gpu(backend):
    return backend in ("gpu", "gpu_interpret")


def is_interpret(backend):
    return backend in ("interpret", "gpu_interpret")
