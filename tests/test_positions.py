import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.t5.modeling_t5 import T5Attention

from t5lite.layers import positions


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (8, 20), (64, 256)])
def test_relative_bucket_matches_hugging_face(bidirectional, num_buckets, max_distance):
    offsets = np.arange(-600, 601)
    expected = T5Attention._relative_position_bucket(
        torch.tensor(offsets), bidirectional, num_buckets, max_distance
    ).numpy()
    ours = positions.relative_position_bucket(jnp.asarray(offsets), bidirectional, num_buckets, max_distance)
    np.testing.assert_array_equal(np.asarray(ours), expected)


@pytest.mark.parametrize("scaling, factor", [("none", 1.0), ("linear", 4.0), ("ntk", 4.0)])
def test_rope_scores_depend_only_on_relative_offset(scaling, factor):
    head_dim = 16
    q, k = jax.random.normal(jax.random.PRNGKey(0), (2, head_dim))
    inv_freq = positions.rope_frequencies(head_dim, 10_000.0, scaling, factor)

    def score(q_pos, k_pos):
        rotate = lambda x, p: positions.apply_rope(
            x[None, None, None], *positions.rope_cos_sin(jnp.array([[p]]), inv_freq)
        )
        return float(jnp.sum(rotate(q, q_pos) * rotate(k, k_pos)))

    for offset in (0, 3, 17):
        scores = [score(start + offset, start) for start in (0, 5, 123, 1000)]
        np.testing.assert_allclose(scores, scores[0], rtol=1e-4, atol=1e-4)
    assert abs(score(10, 0) - score(3, 0)) > 1e-3  # and do depend on the offset


def test_rope_scaling_frequencies():
    base = np.asarray(positions.rope_frequencies(64, 10_000.0))
    np.testing.assert_allclose(base, 10_000.0 ** (-np.arange(0, 64, 2) / 64), rtol=1e-6)
    np.testing.assert_allclose(positions.rope_frequencies(64, 10_000.0, "linear", 4.0), base / 4, rtol=1e-6)
    ntk = np.asarray(positions.rope_frequencies(64, 10_000.0, "ntk", 4.0))
    assert ntk[0] == base[0]  # the highest frequency is untouched
    np.testing.assert_allclose(ntk[-1], base[-1] / 4, rtol=1e-5)  # the lowest is stretched by the factor


def test_alibi_slopes_are_the_papers_geometric_sequence():
    np.testing.assert_allclose(positions.alibi_slopes(8), [2.0 ** -(i + 1) for i in range(8)])
    slopes16 = positions.alibi_slopes(16)
    np.testing.assert_allclose(slopes16[1:] / slopes16[:-1], 2**-0.5)
    np.testing.assert_allclose(slopes16[0], 2**-0.5)
    # Not a power of two: the 8-head slopes, then every other slope of the 16-head sequence.
    np.testing.assert_allclose(
        positions.alibi_slopes(12), list(positions.alibi_slopes(8)) + [2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5]
    )


def test_alibi_bias_is_minus_slope_times_distance():
    bias = positions.alibi_bias(jnp.arange(5)[None], jnp.arange(5)[None], 4)
    slopes = positions.alibi_slopes(4)
    assert bias.shape == (1, 4, 5, 5)
    np.testing.assert_allclose(bias[0, 2, 4, 1], -slopes[2] * 3)
    np.testing.assert_allclose(bias[0, :, 3, 3], 0.0)


def test_sinusoidal_embedding_formula():
    emb = np.asarray(positions.sinusoidal_embedding(jnp.array([[0, 7]]), 8))
    freqs = 10_000.0 ** (-np.arange(0, 8, 2) / 8)
    np.testing.assert_allclose(emb[0, 1], np.concatenate([np.sin(7 * freqs), np.cos(7 * freqs)]), rtol=1e-5)
    np.testing.assert_allclose(emb[0, 0], [0, 0, 0, 0, 1, 1, 1, 1])
