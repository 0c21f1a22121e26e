"""T5 relative-position buckets: exact agreement with Hugging Face, and the kernels' step form."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention.relpos import relative_position_bucket, relpos_steps

CONFIGS = [(32, True, 128), (32, False, 128), (8, True, 20), (64, False, 50), (6, True, 5)]
DISTANCES = np.arange(-700, 700)


@pytest.mark.parametrize("num_buckets,bidirectional,max_distance", CONFIGS)
def test_buckets_match_hugging_face(num_buckets, bidirectional, max_distance):
    torch = pytest.importorskip("torch")
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    expected = t5.T5Attention._relative_position_bucket(
        torch.tensor(DISTANCES), bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    ).numpy()
    actual = relative_position_bucket(
        DISTANCES, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    np.testing.assert_array_equal(np.asarray(actual), expected)


@pytest.mark.parametrize("num_buckets,bidirectional,max_distance", CONFIGS)
def test_steps_reproduce_table_lookup_up_to_a_constant(num_buckets, bidirectional, max_distance):
    table = np.random.RandomState(0).randn(3, num_buckets)
    buckets = np.asarray(
        relative_position_bucket(
            DISTANCES, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
        )
    )
    steps = relpos_steps(num_buckets, bidirectional, max_distance)
    code = np.asarray(steps.distance_code(jnp.asarray(DISTANCES)))
    weights = np.asarray(steps.weights(jnp.asarray(table)))
    stepped = sum(np.where(code[None] >= t, weights[:, k : k + 1], 0.0) for k, t in enumerate(steps.thresholds))
    expected = table[:, buckets]
    np.testing.assert_allclose(stepped - stepped[:, :1], expected - expected[:, :1], atol=1e-5)
    assert len(steps.thresholds) <= num_buckets - 1
