"""Mosaic TPU kernels: one grid step per (query block, key block) tile.

The reduction axis is the innermost ("arbitrary") grid axis and running state lives in VMEM
scratch. Block tables arrive by scalar prefetch: a dead tile's step is skipped with `pl.when`,
and its index map points at the block already loaded, so the pipeline issues no copy for it.
"""

import typing

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash_attention import tile as tl
from pallas_kernels.flash_attention.operands import KV_SIDE, Q_SIDE

_F32 = jnp.float32


class _Coords(typing.NamedTuple):
    """Blocks to load at one grid step."""

    b: typing.Any
    h: typing.Any
    kvh: typing.Any
    q_blk: typing.Any
    kv_blk: typing.Any


def _query_major(cfg, nq, nk):
    """Grid (b, h, qi, ki): forward and dq walk the key blocks of one query block."""

    def coords(b, h, qi, ki, live, fetch, prefix):
        return _Coords(b, h, jax.lax.div(h, cfg.group), qi, fetch[(b * nq + qi) * nk + ki])

    def here():
        b, h, qi, ki = (pl.program_id(i) for i in range(4))
        return b, h, qi, ki

    return coords, here


def _key_major(cfg, nq, nk):
    """Grid (b, kvh, ki, g, qi): dk/dv walk every query block of every head in the group."""

    def coords(b, kvh, ki, g, qi, live, fetch, prefix):
        return _Coords(b, kvh * cfg.group + g, kvh, fetch[(b * nk + ki) * nq + qi], ki)

    def here():
        b, kvh, ki, g, qi = (pl.program_id(i) for i in range(5))
        return b, kvh * cfg.group + g, qi, ki

    return coords, here


def _spec(block, coords, index):
    return pl.BlockSpec(block, lambda *grid: index(coords(*grid)))


def _inputs(cfg, coords, q_side, kv_side, ops):
    """Names, arrays and BlockSpecs of a kernel's inputs.

    q_side / kv_side: (name, [B, heads, len, d] array) pairs blocked along queries / keys.
    """
    names, arrays, specs = [], [], []

    def add(name, array, spec):
        names.append(name)
        arrays.append(array)
        specs.append(spec)

    for name, x in q_side:
        add(name, x, _spec((None, None, cfg.block_q, x.shape[-1]), coords, lambda c: (c.b, c.h, c.q_blk, 0)))
    for name, x in kv_side:
        add(name, x, _spec((None, None, cfg.block_k, x.shape[-1]), coords, lambda c: (c.b, c.kvh, c.kv_blk, 0)))
    for name, x in ops.present(Q_SIDE):
        add(name, x, _spec((None, cfg.block_q, 1), coords, lambda c: (c.b, c.q_blk, 0)))
    for name, x in ops.present(KV_SIDE):
        add(name, x, _spec((None, 1, cfg.block_k), coords, lambda c: (c.b, 0, c.kv_blk)))
    if ops.weights is not None:
        add("weights", ops.weights, pl.BlockSpec(memory_space=pltpu.SMEM))
    if ops.bias is not None:
        per_b, per_h = (n > 1 for n in ops.bias.shape[:2])
        index = lambda c: (c.b if per_b else 0, c.h if per_h else 0, c.q_blk, c.kv_blk)  # noqa: E731
        add("bias", ops.bias, _spec((None, None, cfg.block_q, cfg.block_k), coords, index))
    return names, arrays, specs


def _tile(cfg, r, b, qi, ki, prefix_ref):
    load = lambda name: r[name][...]  # noqa: E731  (blocks already hold exactly this tile)
    return tl.make_tile(cfg, qi * cfg.block_q, ki * cfg.block_k, load, load, prefix_ref[b])


def _weight(r, h):
    return (lambda k: r["weights"][h, k]) if "weights" in r else None


def _bias(r):
    return r["bias"][...] if "bias" in r else None


def _run(cfg, body, walk, grid, nq, nk, inputs, live, fetch, prefix, outputs, scratch, semantics, interpret):
    """pallas_call `body(r, b, h, qi, ki, is_live, tile)` over `grid`.

    outputs: (name, BlockSpec, ShapeDtypeStruct); scratch: (name, shape) float32 VMEM buffers.
    `r` maps names to refs; `tile()` builds this step's tile coordinates.
    """
    in_names, arrays, in_specs = inputs
    names = in_names + [o[0] for o in outputs] + [s[0] for s in scratch]
    _, here = walk

    def kernel(live_ref, fetch_ref, prefix_ref, *refs):
        r = dict(zip(names, refs))
        b, h, qi, ki = here()
        is_live = live_ref[(b * nq + qi) * nk + ki] != 0
        body(r, b, h, qi, ki, is_live, lambda: _tile(cfg, r, b, qi, ki, prefix_ref))

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=grid,
        in_specs=in_specs,
        out_specs=[o[1] for o in outputs],
        scratch_shapes=[pltpu.VMEM(shape, _F32) for _, shape in scratch],
    )
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[o[2] for o in outputs],
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
        interpret=interpret,
    )(live, fetch, prefix, *arrays)


def _q_out(cfg, coords, shape, dtype, name):
    spec = _spec((None, None, cfg.block_q, shape[-1]), coords, lambda c: (c.b, c.h, c.q_blk, 0))
    return name, spec, jax.ShapeDtypeStruct(shape, dtype)


def _kv_out(cfg, coords, shape, dtype, name):
    spec = _spec((None, None, cfg.block_k, shape[-1]), coords, lambda c: (c.b, c.kvh, c.kv_blk, 0))
    return name, spec, jax.ShapeDtypeStruct(shape, dtype)


def forward(cfg, q, k, v, ops, tables, interpret=False):
    """(out [B, H, T, D], lse [B, H, T, 1] float32)."""
    B, H, T, D = q.shape
    nq, nk = T // cfg.block_q, k.shape[2] // cfg.block_k
    walk = _query_major(cfg, nq, nk)
    inputs = _inputs(cfg, walk[0], [("q", q)], [("k", k), ("v", v)], ops)

    def body(r, b, h, qi, ki, is_live, tile):
        @pl.when(ki == 0)
        def _init():
            r["m"][...] = jnp.full(r["m"].shape, tl.MASK_VALUE, _F32)
            r["l"][...] = jnp.zeros(r["l"].shape, _F32)
            r["acc"][...] = jnp.zeros(r["acc"].shape, _F32)

        @pl.when(is_live)
        def _step():
            carry = (r["m"][...], r["l"][...], r["acc"][...])
            m, l, acc = tl.forward_step(
                cfg, tile(), r["q"][...], r["k"][...], r["v"][...], _weight(r, h), _bias(r), carry
            )
            r["m"][...], r["l"][...], r["acc"][...] = m, l, acc

        @pl.when(ki == nk - 1)
        def _finish():
            out, lse = tl.forward_finish(r["m"][...], r["l"][...], r["acc"][...])
            r["out"][...] = out.astype(r["out"].dtype)
            r["lse"][...] = lse

    outputs = [_q_out(cfg, walk[0], q.shape, q.dtype, "out"), _q_out(cfg, walk[0], (B, H, T, 1), _F32, "lse")]
    scratch = [("m", (cfg.block_q, 1)), ("l", (cfg.block_q, 1)), ("acc", (cfg.block_q, D))]
    semantics = ("parallel", "parallel", "parallel", "arbitrary")
    return _run(
        cfg,
        body,
        walk,
        (B, H, nq, nk),
        nq,
        nk,
        inputs,
        tables.live,
        tables.kv_fetch,
        _prefix(ops, B),
        outputs,
        scratch,
        semantics,
        interpret,
    )


def backward_dq(cfg, q, k, v, do, lse, delta, ops, tables, interpret=False):
    """(dq, d weights [B, H, 1, K] or None, d bias [B, H, T, S] float32 or None)."""
    B, H, T, D = q.shape
    nq, nk = T // cfg.block_q, k.shape[2] // cfg.block_k
    walk = _query_major(cfg, nq, nk)
    coords = walk[0]
    q_side = [("q", q), ("do", do), ("lse", lse), ("delta", delta)]
    inputs = _inputs(cfg, coords, q_side, [("k", k), ("v", v)], ops)

    def body(r, b, h, qi, ki, is_live, tile):
        @pl.when(ki == 0)
        def _init():
            r["dq_acc"][...] = jnp.zeros(r["dq_acc"].shape, _F32)

        if "dw" in r:

            @pl.when(jnp.logical_and(qi == 0, ki == 0))
            def _init_dw():
                r["dw"][...] = jnp.zeros(r["dw"].shape, _F32)

        @pl.when(is_live)
        def _step():
            t = tile()
            kb = r["k"][...]
            p, ds = tl.backward_step(
                cfg,
                t,
                r["q"][...],
                kb,
                r["v"][...],
                r["do"][...],
                r["lse"][...],
                r["delta"][...],
                _weight(r, h),
                _bias(r),
            )
            r["dq_acc"][...] += tl.grad_dq(cfg, ds, kb)
            if "dw" in r:
                r["dw"][...] += tl.positional_bias_grads(cfg, t, ds, r["dw"].shape[-1])
            if "dbias" in r:
                r["dbias"][...] = ds

        if "dbias" in r:

            @pl.when(jnp.logical_not(is_live))
            def _dead():
                r["dbias"][...] = jnp.zeros(r["dbias"].shape, _F32)

        @pl.when(ki == nk - 1)
        def _finish():
            r["dq"][...] = r["dq_acc"][...].astype(r["dq"].dtype)

    outputs = [_q_out(cfg, coords, q.shape, q.dtype, "dq")]
    if ops.weights is not None:
        width = ops.weights.shape[-1]
        spec = _spec((None, None, 1, width), coords, lambda c: (c.b, c.h, 0, 0))
        outputs.append(("dw", spec, jax.ShapeDtypeStruct((B, H, 1, width), _F32)))
    if ops.bias is not None:
        # Indexed by the step itself, not the fetched block: dead tiles get their zeros too.
        spec = pl.BlockSpec((None, None, cfg.block_q, cfg.block_k), lambda b, h, qi, ki, *_: (b, h, qi, ki))
        outputs.append(("dbias", spec, jax.ShapeDtypeStruct((B, H, T, k.shape[2]), _F32)))
    semantics = ("parallel", "parallel", "arbitrary", "arbitrary")
    results = _run(
        cfg,
        body,
        walk,
        (B, H, nq, nk),
        nq,
        nk,
        inputs,
        tables.live,
        tables.kv_fetch,
        _prefix(ops, B),
        outputs,
        [("dq_acc", (cfg.block_q, D))],
        semantics,
        interpret,
    )
    named = dict(zip([o[0] for o in outputs], results))
    return named["dq"], named.get("dw"), named.get("dbias")


def backward_dkv(cfg, q, k, v, do, lse, delta, ops, tables, interpret=False):
    """(dk, dv), summed over the query heads that share each kv head."""
    B, H, T, D = q.shape
    KVH, S = k.shape[1], k.shape[2]
    nq, nk = T // cfg.block_q, S // cfg.block_k
    walk = _key_major(cfg, nq, nk)
    coords = walk[0]
    q_side = [("q", q), ("do", do), ("lse", lse), ("delta", delta)]
    inputs = _inputs(cfg, coords, q_side, [("k", k), ("v", v)], ops)

    def body(r, b, h, qi, ki, is_live, tile):
        g = pl.program_id(3)

        @pl.when(jnp.logical_and(g == 0, qi == 0))
        def _init():
            r["dk_acc"][...] = jnp.zeros(r["dk_acc"].shape, _F32)
            r["dv_acc"][...] = jnp.zeros(r["dv_acc"].shape, _F32)

        @pl.when(is_live)
        def _step():
            qb, dob = r["q"][...], r["do"][...]
            p, ds = tl.backward_step(
                cfg, tile(), qb, r["k"][...], r["v"][...], dob, r["lse"][...], r["delta"][...], _weight(r, h), _bias(r)
            )
            r["dv_acc"][...] += tl.grad_dv(cfg, p, dob)
            r["dk_acc"][...] += tl.grad_dk(cfg, ds, qb)

        @pl.when(jnp.logical_and(g == cfg.group - 1, qi == nq - 1))
        def _finish():
            r["dk"][...] = r["dk_acc"][...].astype(r["dk"].dtype)
            r["dv"][...] = r["dv_acc"][...].astype(r["dv"].dtype)

    outputs = [_kv_out(cfg, coords, k.shape, k.dtype, "dk"), _kv_out(cfg, coords, v.shape, v.dtype, "dv")]
    scratch = [("dk_acc", (cfg.block_k, D)), ("dv_acc", (cfg.block_k, v.shape[-1]))]
    semantics = ("parallel", "parallel", "parallel", "arbitrary", "arbitrary")
    return _run(
        cfg,
        body,
        walk,
        (B, KVH, nk, cfg.group, nq),
        nq,
        nk,
        inputs,
        tables.live,
        tables.q_fetch,
        _prefix(ops, B),
        outputs,
        scratch,
        semantics,
        interpret,
    )


def _prefix(ops, batch):
    return ops.prefix if ops.prefix is not None else jnp.zeros((batch,), jnp.int32)
