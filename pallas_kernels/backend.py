"""Backend names shared by the kernels, and what `backend="auto"` picks."""

import contextlib
import contextvars

import jax

# "interpret" runs the TPU kernel through the Pallas interpreter (any platform);
# "gpu_interpret" does the same for the GPU (Triton) kernel.
BACKENDS = ("auto", "tpu", "gpu", "interpret", "gpu_interpret")

_target_platform = contextvars.ContextVar("target_platform", default=None)


def platform():
    """The platform kernels are built for: JAX's default one, or the target of an
    ahead-of-time compilation (`compiling_for`)."""
    return _target_platform.get() or jax.default_backend()


@contextlib.contextmanager
def compiling_for(target):
    """Within this context "auto" picks kernels for `target` ("tpu", "gpu"), e.g. while lowering
    for a TPU topology on a CPU-only machine."""
    token = _target_platform.set(target)
    try:
        yield
    finally:
        _target_platform.reset(token)


def resolve(backend, allowed=BACKENDS, cpu="interpret"):
    """A concrete backend name from `allowed`; "auto" follows `platform()` (TPU, GPU, else `cpu`)."""
    if backend not in allowed:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(allowed)}")
    if backend != "auto":
        return backend
    return {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}.get(platform(), cpu)


def is_gpu(backend):
    return backend in ("gpu", "gpu_interpret")


def is_interpret(backend):
    return backend in ("interpret", "gpu_interpret")
