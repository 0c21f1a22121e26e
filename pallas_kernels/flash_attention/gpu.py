"""Triton (GPU) kernels: one program per query block (forward, dq) or key block (dk/dv).

A program loops over the other axis itself, only across the span of live blocks given by the
block tables, and skips dead tiles inside the span with `lax.cond`. Triton has no scalar
prefetch or scratch, so tables are ordinary inputs and running state is the loop carry.
"""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels.flash_attention import tile as tl
from pallas_kernels.flash_attention.operands import KV_SIDE, Q_SIDE

_F32 = jnp.float32
NUM_WARPS = 4
NUM_STAGES = 2


def _inputs(cfg, key_major, q_side, kv_side, ops, extra):
    """Names, arrays and BlockSpecs over grid (b, head, block).

    Query-major grids (b, h, qi) get one query block and whole key axes; key-major grids
    (b, kvh, ki) get one key block and, for the group's query heads, whole query axes.
    """
    names, arrays, specs = [], [], []

    def add(name, x, block, index):
        names.append(name)
        arrays.append(x)
        specs.append(pl.BlockSpec(block, index) if block else pl.BlockSpec())

    T, S = q_side[0][1].shape[2], kv_side[0][1].shape[2]
    bq, bk, G = cfg.block_q, cfg.block_k, cfg.group
    for name, x in q_side:
        if key_major:
            add(name, x, (None, G, T, x.shape[-1]), lambda b, kvh, ki: (b, kvh, 0, 0))
        else:
            add(name, x, (None, None, bq, x.shape[-1]), lambda b, h, qi: (b, h, qi, 0))
    for name, x in kv_side:
        if key_major:
            add(name, x, (None, None, bk, x.shape[-1]), lambda b, kvh, ki: (b, kvh, ki, 0))
        else:
            add(name, x, (None, None, S, x.shape[-1]), lambda b, h, qi: (b, jax.lax.div(h, G), 0, 0))
    for name, x in ops.present(Q_SIDE):
        add(name, x, (None, T, 1) if key_major else (None, bq, 1), lambda b, _, i: (b, 0 if key_major else i, 0))
    for name, x in ops.present(KV_SIDE):
        add(name, x, (None, 1, bk) if key_major else (None, 1, S), lambda b, _, i: (b, 0, i if key_major else 0))
    if ops.bias is not None:
        per_b, per_h = (n > 1 for n in ops.bias.shape[:2])
        if key_major:
            block = (None, G if per_h else 1, T, bk)
            index = lambda b, kvh, ki: (b if per_b else 0, kvh if per_h else 0, 0, ki)  # noqa: E731
        else:
            block = (None, None, bq, S)
            index = lambda b, h, qi: (b if per_b else 0, h if per_h else 0, qi, 0)  # noqa: E731
        add("bias", ops.bias, block, index)
    if ops.weights is not None:
        add("weights", ops.weights, None, None)
    for name, x in extra:
        add(name, x, None, None)
    return names, arrays, specs


def _call(kernel, grid, inputs, outputs, interpret):
    """pallas_call `kernel(r)` where `r` maps input and output names to refs."""
    names, arrays, in_specs = inputs
    all_names = names + [o[0] for o in outputs]

    def body(*refs):
        kernel(dict(zip(all_names, refs)))

    return pl.pallas_call(
        body,
        grid=grid,
        in_specs=in_specs,
        out_specs=[o[1] for o in outputs],
        out_shape=[o[2] for o in outputs],
        compiler_params=pltr.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
        interpret=interpret,
    )(*arrays)


def _out(name, shape, dtype, block, index):
    return name, pl.BlockSpec(block, index), jax.ShapeDtypeStruct(shape, dtype)


def _prefix(r, b):
    return r["prefix"][b] if "prefix" in r else None


def _weight(r, h):
    return (lambda k: r["weights"][h, k]) if "weights" in r else None


def _extras(ops, tables, span):
    extra = [("live", tables.live), ("span", span)]
    return extra + ([("prefix", ops.prefix)] if ops.prefix is not None else [])


def _query_loop(cfg, r, b, h, qi, nq, nk, step, dead, carry):
    """Fold `step(ki, tile, carry)` over the live key blocks of query block qi.

    `dead(ki)` (side effects only) runs for dead blocks; with one, the loop spans all blocks.
    """

    def body(ki, carry):
        k0 = pl.multiple_of(ki * cfg.block_k, cfg.block_k)
        load_kv = lambda name: r[name][:, pl.ds(k0, cfg.block_k)]  # noqa: E731
        live = r["live"][(b * nq + qi) * nk + ki] != 0

        def on_live(c):
            t = tl.make_tile(cfg, qi * cfg.block_q, k0, lambda name: r[name][...], load_kv, _prefix(r, b))
            return step(ki, k0, t, c)

        def on_dead(c):
            if dead is not None:
                dead(k0)
            return c

        return jax.lax.cond(live, on_live, on_dead, carry)

    if dead is None:
        lo, hi = r["span"][2 * (b * nq + qi)], r["span"][2 * (b * nq + qi) + 1]
    else:
        lo, hi = 0, nk
    return jax.lax.fori_loop(lo, hi, body, carry)


def forward(cfg, q, k, v, ops, tables, interpret=False):
    """(out [B, H, T, D], lse [B, H, T, 1] float32)."""
    B, H, T, D = q.shape
    nq, nk = T // cfg.block_q, k.shape[2] // cfg.block_k
    inputs = _inputs(cfg, False, [("q", q)], [("k", k), ("v", v)], ops, _extras(ops, tables, tables.kv_span))

    def kernel(r):
        b, h, qi = (pl.program_id(i) for i in range(3))
        qb = r["q"][...]
        bias = (lambda k0: r["bias"][:, pl.ds(k0, cfg.block_k)]) if "bias" in r else (lambda k0: None)

        def step(ki, k0, t, carry):
            kb, vb = r["k"][pl.ds(k0, cfg.block_k), :], r["v"][pl.ds(k0, cfg.block_k), :]
            return tl.forward_step(cfg, t, qb, kb, vb, _weight(r, h), bias(k0), carry)

        init = (
            jnp.full((cfg.block_q, 1), tl.MASK_VALUE, _F32),
            jnp.zeros((cfg.block_q, 1), _F32),
            jnp.zeros((cfg.block_q, v.shape[-1]), _F32),
        )
        out, lse = tl.forward_finish(*_query_loop(cfg, r, b, h, qi, nq, nk, step, None, init))
        r["out"][...] = out.astype(r["out"].dtype)
        r["lse"][...] = lse

    outputs = [
        _out("out", q.shape, q.dtype, (None, None, cfg.block_q, D), lambda b, h, qi: (b, h, qi, 0)),
        _out("lse", (B, H, T, 1), _F32, (None, None, cfg.block_q, 1), lambda b, h, qi: (b, h, qi, 0)),
    ]
    return _call(kernel, (B, H, nq), inputs, outputs, interpret)


def backward_dq(cfg, q, k, v, do, lse, delta, ops, tables, interpret=False):
    """(dq, d weights [B, H, nq, K] or None, d bias [B, H, T, S] float32 or None)."""
    B, H, T, D = q.shape
    S = k.shape[2]
    nq, nk = T // cfg.block_q, S // cfg.block_k
    q_side = [("q", q), ("do", do), ("lse", lse), ("delta", delta)]
    inputs = _inputs(cfg, False, q_side, [("k", k), ("v", v)], ops, _extras(ops, tables, tables.kv_span))
    width = None if ops.weights is None else ops.weights.shape[-1]

    def kernel(r):
        b, h, qi = (pl.program_id(i) for i in range(3))
        qb, dob, lse_b, delta_b = r["q"][...], r["do"][...], r["lse"][...], r["delta"][...]

        def step(ki, k0, t, carry):
            dq, dw = carry
            kb, vb = r["k"][pl.ds(k0, cfg.block_k), :], r["v"][pl.ds(k0, cfg.block_k), :]
            bias = r["bias"][:, pl.ds(k0, cfg.block_k)] if "bias" in r else None
            _, ds = tl.backward_step(cfg, t, qb, kb, vb, dob, lse_b, delta_b, _weight(r, h), bias)
            if "dbias" in r:
                r["dbias"][:, pl.ds(k0, cfg.block_k)] = ds
            if width is not None:
                dw = dw + tl.positional_bias_grads(cfg, t, ds, width)
            return dq + tl.grad_dq(cfg, ds, kb), dw

        def dead(k0):
            r["dbias"][:, pl.ds(k0, cfg.block_k)] = jnp.zeros((cfg.block_q, cfg.block_k), _F32)

        init = (jnp.zeros((cfg.block_q, D), _F32), jnp.zeros((1, width or 1), _F32))
        dq, dw = _query_loop(cfg, r, b, h, qi, nq, nk, step, dead if "dbias" in r else None, init)
        r["dq"][...] = dq.astype(r["dq"].dtype)
        if width is not None:
            r["dw"][...] = dw

    index = lambda b, h, qi: (b, h, qi, 0)  # noqa: E731
    outputs = [_out("dq", q.shape, q.dtype, (None, None, cfg.block_q, D), index)]
    if width is not None:
        outputs.append(_out("dw", (B, H, nq, width), _F32, (None, None, 1, width), index))
    if ops.bias is not None:
        outputs.append(_out("dbias", (B, H, T, S), _F32, (None, None, cfg.block_q, S), index))
    named = dict(zip([o[0] for o in outputs], _call(kernel, (B, H, nq), inputs, outputs, interpret)))
    return named["dq"], named.get("dw"), named.get("dbias")


def backward_dkv(cfg, q, k, v, do, lse, delta, ops, tables, interpret=False):
    """(dk, dv), summed over the query heads that share each kv head."""
    B, H, T, D = q.shape
    KVH, S = k.shape[1], k.shape[2]
    nq, nk = T // cfg.block_q, S // cfg.block_k
    q_side = [("q", q), ("do", do), ("lse", lse), ("delta", delta)]
    inputs = _inputs(cfg, True, q_side, [("k", k), ("v", v)], ops, _extras(ops, tables, tables.q_span))
    per_head_bias = ops.bias is not None and ops.bias.shape[1] > 1

    def kernel(r):
        b, kvh, ki = (pl.program_id(i) for i in range(3))
        kb, vb = r["k"][...], r["v"][...]
        k0 = ki * cfg.block_k
        lo, hi = r["span"][2 * (b * nk + ki)], r["span"][2 * (b * nk + ki) + 1]

        def head(g, carry):
            h = kvh * cfg.group + g

            def body(qi, carry):
                q0 = pl.multiple_of(qi * cfg.block_q, cfg.block_q)
                rows = pl.ds(q0, cfg.block_q)

                def on_live(carry):
                    dk, dv = carry
                    t = tl.make_tile(
                        cfg, q0, k0, lambda name: r[name][rows, :], lambda name: r[name][...], _prefix(r, b)
                    )
                    qb, dob = r["q"][g, rows, :], r["do"][g, rows, :]
                    bias = r["bias"][g if per_head_bias else 0, rows, :] if "bias" in r else None
                    p, ds = tl.backward_step(
                        cfg, t, qb, kb, vb, dob, r["lse"][g, rows, :], r["delta"][g, rows, :], _weight(r, h), bias
                    )
                    return dk + tl.grad_dk(cfg, ds, qb), dv + tl.grad_dv(cfg, p, dob)

                live = r["live"][(b * nq + qi) * nk + ki] != 0
                return jax.lax.cond(live, on_live, lambda c: c, carry)

            return jax.lax.fori_loop(lo, hi, body, carry)

        init = (jnp.zeros((cfg.block_k, D), _F32), jnp.zeros((cfg.block_k, v.shape[-1]), _F32))
        dk, dv = jax.lax.fori_loop(0, cfg.group, head, init)
        r["dk"][...] = dk.astype(r["dk"].dtype)
        r["dv"][...] = dv.astype(r["dv"].dtype)

    index = lambda b, kvh, ki: (b, kvh, ki, 0)  # noqa: E731
    outputs = [
        _out("dk", k.shape, k.dtype, (None, None, cfg.block_k, D), index),
        _out("dv", v.shape, v.dtype, (None, None, cfg.block_k, v.shape[-1]), index),
    ]
    return tuple(_call(kernel, (B, KVH, nk), inputs, outputs, interpret))
