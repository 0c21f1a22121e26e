"""Flash attention in interpret mode on the CPU against a float64 reference: values and gradients."""

import jax.numpy as jnp
import numpy as np
import pytest
from kernel_testing import CASES, TOLERANCE, Case, kernel_vjp, reference_vjp, rel_err

from pallas_kernels.flash_attention import api, flash_attention

# (case, dtype, backend): every case through the TPU kernel, a covering subset through the GPU one.
RUNS = [(name, jnp.float32, "interpret") for name in CASES] + [
    ("causal_relpos_bidirectional", jnp.bfloat16, "interpret"),
    ("mqa_packed_alibi", jnp.bfloat16, "interpret"),
    ("gqa_prefix_relpos_unidirectional", jnp.float32, "gpu_interpret"),
    ("mqa_packed_alibi", jnp.float32, "gpu_interpret"),
    ("cross_pairs_bias_offset", jnp.float32, "gpu_interpret"),
    ("window_sinks", jnp.bfloat16, "gpu_interpret"),
]


@pytest.mark.parametrize("name,dtype,backend", RUNS, ids=lambda x: getattr(x, "__name__", str(x)))
def test_matches_float64_reference(name, dtype, backend):
    case = CASES[name]
    out, grads = kernel_vjp(case, dtype, backend)
    ref_out, ref_grads = reference_vjp(case, dtype)
    tol = TOLERANCE[dtype]
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert rel_err(out, ref_out) < tol
    assert set(grads) == set(ref_grads) and len(grads) >= 3
    for n in grads:
        assert grads[n].shape == ref_grads[n].shape, n
        assert rel_err(grads[n], ref_grads[n]) < tol, n


def test_fully_masked_rows_are_zero():
    case = CASES["mqa_packed_alibi"]
    a = case.arrays(jnp.float32)
    out = flash_attention(a["q"], a["k"], a["v"], **case.options(a), block_q=16, block_k=16, backend="interpret")
    np.testing.assert_array_equal(np.asarray(out[0, -4:]), 0.0)  # padding queries (segment 0)
    assert np.abs(np.asarray(out[0, :-4])).min(axis=-1).max() > 0


@pytest.mark.parametrize("backend", ["interpret", "gpu_interpret"])
def test_every_output_element_is_written(backend):
    """The interpreter fills outputs with NaN before the kernel runs; none may survive.

    Runs the kernels on their padded operands, with dead tiles (window, segments), padding
    rows and columns, and every optional output (weight and bias gradients).
    """
    case = Case("poison", B=2, T=37, S=45, H=4, KVH=2, segments="pair", window=12, alibi=True, bias=True)
    a = case.arrays(jnp.float32)
    args = api.prepare(
        a["q"], a["k"], a["v"], **_full_options(case.options(a)), block_q=16, block_k=16, backend=backend
    )
    module, interpret = api.kernels(args.backend)
    ops = args.ops._replace(weights=args.weights, bias=args.bias)
    assert np.asarray(args.tables.live).min() == 0  # some tiles really are skipped
    out, lse = module.forward(args.cfg, args.q, args.k, args.v, ops, args.tables, interpret=interpret)
    do = jnp.ones_like(out)
    delta = jnp.sum(do * out, axis=-1, keepdims=True)
    dq, dw, dbias = module.backward_dq(
        args.cfg, args.q, args.k, args.v, do, lse, delta, ops, args.tables, interpret=interpret
    )
    dk, dv = module.backward_dkv(
        args.cfg, args.q, args.k, args.v, do, lse, delta, ops, args.tables, interpret=interpret
    )
    for name, x in dict(out=out, lse=lse, dq=dq, dw=dw, dbias=dbias, dk=dk, dv=dv).items():
        assert np.isfinite(np.asarray(x, np.float32)).all(), name


def _full_options(opts):
    keys = (
        "causal",
        "segment_ids",
        "prefix_length",
        "relpos_bias",
        "alibi_slopes",
        "bias",
        "window",
        "sinks",
        "q_positions",
        "kv_positions",
        "sm_scale",
    )
    return {k: opts.get(k, {"causal": False, "sinks": 0}.get(k)) for k in keys}


def test_default_blocks_match_small_blocks():
    """The default (one block per axis here) and tiled runs agree."""
    case = CASES["causal_relpos_bidirectional"]
    a = case.arrays(jnp.float32)
    tiled = flash_attention(a["q"], a["k"], a["v"], **case.options(a), block_q=16, block_k=16, backend="interpret")
    whole = flash_attention(a["q"], a["k"], a["v"], **case.options(a), backend="auto")
    assert rel_err(tiled, whole) < 1e-6


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(k=np.zeros((2, 8, 3, 16))), "multiple of kv heads"),
        (dict(q=np.zeros((2, 8, 16))), "must be \\[batch, length, heads, head_dim\\]"),
        (dict(backend="cuda"), "unknown backend"),
        (dict(sinks=2), "sinks only make sense"),
        (dict(segment_ids=np.ones((2, 9), np.int32)), "segment_ids must be"),
        (dict(relpos_bias=(np.zeros((3, 32)), True, 128)), "relpos_bias table"),
        (dict(relpos_bias=(np.zeros((4, 32)), True, 8)), "max_distance"),
        (dict(alibi_slopes=np.zeros(3)), "alibi_slopes"),
        (dict(bias=np.zeros((2, 4, 8, 9))), "bias must be"),
        (dict(block_q=24, backend="gpu_interpret"), "power of two"),
    ],
)
def test_bad_arguments_raise_value_error(change, message):
    args = dict(
        q=np.zeros((2, 8, 4, 16), np.float32),
        k=np.zeros((2, 8, 2, 16), np.float32),
        v=np.zeros((2, 8, 2, 16), np.float32),
    )
    args.update(change)
    q, k, v = (jnp.asarray(args.pop(n), jnp.float32) for n in ("q", "k", "v"))
    if k.shape != v.shape:
        v = k
    with pytest.raises(ValueError, match=message):
        flash_attention(q, k, v, **args)
