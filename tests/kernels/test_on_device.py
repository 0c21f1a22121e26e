"""The Pallas kernels on this machine's GPU or TPU against the float64 references: every attention case
(causal, packed segments, prefix LM, T5 relative bias, ALiBi, windows, cross attention) in float32 and
bfloat16, values and gradients, with the kernel's default blocks; and the int8 matmul under every
scaling. experiments/benchmarks/device_check.sh runs this file. Without an accelerator it skips: the same
checks run in interpret mode in test_flash_attention_interpret.py and test_int8_matmul.py
(T5LITE_KERNEL_BACKEND=interpret runs this file on the CPU too)."""

import jax.numpy as jnp
import pytest
from kernel_testing import (
    CASES,
    SCALINGS,
    TOLERANCE,
    check_int8_matmul,
    device_backend,
    kernel_vjp,
    reference_vjp,
    rel_err,
)

BACKEND = device_backend()
pytestmark = pytest.mark.skipif(
    BACKEND is None,
    reason="needs a GPU or TPU; test_flash_attention_interpret.py and test_int8_matmul.py check the same "
    "kernels in interpret mode",
)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_flash_attention_matches_float64_reference(name, dtype):
    case = CASES[name]
    out, grads = kernel_vjp(case, dtype, BACKEND, block_q=None, block_k=None)
    ref_out, ref_grads = reference_vjp(case, dtype)
    errors = {"out": rel_err(out, ref_out)} | {f"d{n}": rel_err(grads[n], ref_grads[n]) for n in ref_grads}
    assert set(grads) == set(ref_grads)
    assert max(errors.values()) < TOLERANCE[dtype], errors


@pytest.mark.parametrize("name", sorted(SCALINGS))
def test_int8_matmul_matches_float64_reference(name):
    check_int8_matmul(name, BACKEND)
