"""Dense layers' matmul with its own backward rule (t5lite.layers.dense.contract): the gradients of
`lax.dot_general`, and rematerialisation policies still keep its output."""

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.ad_checkpoint import print_saved_residuals

from t5lite.layers.dense import contract
from t5lite.models.transformer import REMAT_POLICIES


def _dot_general(x, kernel, in_axes):
    return lax.dot_general(x, kernel, ((tuple(range(x.ndim - in_axes, x.ndim)), tuple(range(in_axes))), ((), ())))


@pytest.mark.parametrize(
    "x_shape,kernel_shape,in_axes",
    [((6, 5), (5, 7), 1), ((2, 3, 8), (8, 4, 3), 1), ((2, 3, 4, 5), (4, 5, 6), 2)],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_values_and_gradients_are_dot_generals(x_shape, kernel_shape, in_axes, dtype):
    rng = np.random.default_rng(0)
    x, kernel = (jnp.asarray(rng.standard_normal(s), dtype) for s in (x_shape, kernel_shape))
    cotangent = jnp.asarray(rng.standard_normal(_dot_general(x, kernel, in_axes).shape), dtype)
    ours, ours_vjp = jax.vjp(lambda x, k: contract(x, k, in_axes), x, kernel)
    theirs, theirs_vjp = jax.vjp(lambda x, k: _dot_general(x, k, in_axes), x, kernel)
    np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(theirs, np.float32))
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
    for mine, reference in zip(ours_vjp(cotangent), theirs_vjp(cotangent)):
        assert mine.dtype == reference.dtype and mine.shape == reference.shape
        np.testing.assert_allclose(np.asarray(mine, np.float32), np.asarray(reference, np.float32), rtol=tolerance)


@pytest.mark.parametrize("policy", ["dots", "dots_with_no_batch_dims"])
def test_remat_policies_keep_dense_outputs(policy):
    x, w1, w2 = jnp.ones((4, 8)), jnp.ones((8, 16)), jnp.ones((16, 8))

    def two_layers(x, w1, w2):
        return jnp.sum(jnp.tanh(contract(jnp.tanh(contract(x, w1, 1)), w2, 1)))

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        print_saved_residuals(jax.checkpoint(two_layers, policy=REMAT_POLICIES[policy]), x, w1, w2)
    kept = [line for line in printed.getvalue().splitlines() if "named 'dense'" in line]
    assert [line.split()[0] for line in kept] == ["f32[4,16]", "f32[4,8]"], printed.getvalue()
