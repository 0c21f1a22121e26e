"""The MLP's activations: GELU's tanh form with its own derivative rule (t5lite.layers.mlp.gelu_tanh)."""

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from t5lite.layers.mlp import gelu_tanh


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gelu_tanh_values_are_jax_gelu_bit_for_bit(dtype):
    x = jnp.linspace(-8.0, 8.0, 4097, dtype=jnp.float32).astype(dtype)
    np.testing.assert_array_equal(np.asarray(gelu_tanh(x)), np.asarray(jax.nn.gelu(x, approximate=True)))
    np.testing.assert_array_equal(
        np.asarray(jax.jit(gelu_tanh)(x)), np.asarray(jax.jit(lambda x: jax.nn.gelu(x, approximate=True))(x))
    )


def test_gelu_tanh_gradient_matches_pytorch_in_float64():
    torch = pytest.importorskip("torch")
    x = np.linspace(-8.0, 8.0, 4097, dtype=np.float32)
    ours = jax.grad(lambda x: jnp.sum(gelu_tanh(x)))(jnp.asarray(x))
    reference = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    torch.nn.functional.gelu(reference, approximate="tanh").sum().backward()
    autodiff = jax.grad(lambda x: jnp.sum(jax.nn.gelu(x, approximate=True)))(jnp.asarray(x))
    exact = reference.grad.numpy()
    # float32 loses the tails (1 - tanh² cancels near ±1) as autodiff of the formula does: no worse.
    assert np.abs(np.asarray(ours) - exact).max() <= np.abs(np.asarray(autodiff) - exact).max() + 1e-7
    np.testing.assert_allclose(np.asarray(ours), exact, atol=4e-6)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(autodiff), atol=1e-6)


def _saved_arrays(fn, *args) -> int:
    """How many arrays of the arguments' shape the backward pass of `fn` keeps."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        print_saved_residuals(fn, *args)
    shape = "[" + ",".join(map(str, args[0].shape)) + "]"
    return sum(shape in line for line in printed.getvalue().splitlines())


def test_gated_gelu_backward_keeps_three_arrays_not_seven():
    a = b = jnp.ones((4, 16))
    ours = _saved_arrays(lambda a, b: jnp.sum(gelu_tanh(a) * b), a, b)
    formula = _saved_arrays(lambda a, b: jnp.sum(jax.nn.gelu(a, approximate=True) * b), a, b)
    assert ours == 3, ours  # b, gelu(a) and gelu'(a)
    assert formula == 7, formula
