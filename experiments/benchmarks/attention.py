"""Attention forward and forward+backward: Pallas flash attention vs XLA vs jax.nn.dot_product_attention.

    python experiments/benchmarks/attention.py [--lengths 512 1024 ...] [--csv out.csv]

Each length runs without and with a T5 relative-position bias (the Pallas kernel computes it
in-kernel from the [H, 32] table; the others get the materialised [1, H, T, T] bias). Reports
median time, TFLOP/s (causal halves the FLOPs, backward counts 2.5x forward), the ratio of the
Pallas time to each alternative (< 1 means Pallas is faster), and XLA's compiled scratch bytes.
"""

import argparse

import jax
import jax.numpy as jnp
from common import device_description, on_accelerator, report, temp_bytes, time_call

from pallas_kernels.flash_attention import attention_reference, flash_attention
from pallas_kernels.flash_attention.reference import attention_bias


def _impls(causal, with_bias):
    """name -> fn(q, k, v, table) producing [B, T, H, D]."""

    def t5(table):
        return (table, True, 128) if with_bias else None

    def dense_bias(q, table):
        if not with_bias:
            return None
        T = q.shape[1]
        pos = jnp.arange(T)[None]
        return attention_bias(pos, pos, q.shape[2], relpos_bias=t5(table)).astype(q.dtype)

    scale = 1.0 if with_bias else None
    impls = {
        "pallas": lambda q, k, v, table: flash_attention(q, k, v, causal=causal, relpos_bias=t5(table), sm_scale=scale),
        "xla": lambda q, k, v, table: attention_reference(
            q, k, v, causal=causal, relpos_bias=t5(table), sm_scale=scale
        ),
        "jax.nn": lambda q, k, v, table: jax.nn.dot_product_attention(
            q,
            k,
            v,
            bias=dense_bias(q, table),
            is_causal=causal,
            scale=scale,
            implementation="cudnn" if jax.default_backend() == "gpu" else None,
        ),
    }
    return impls


def _fwd_bwd(fn):
    def run(q, k, v, table):
        loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32))  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, table)

    return run


def main():
    accel = on_accelerator()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384] if accel else [128, 256]
    )
    p.add_argument("--batch", type=int, default=2 if accel else 1)
    p.add_argument("--heads", type=int, default=16 if accel else 2)
    p.add_argument("--head-dim", type=int, default=64 if accel else 32)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeats", type=int, default=10 if accel else 2)
    p.add_argument("--csv", default="attention_benchmark.csv")
    args = p.parse_args()
    print(f"device: {device_description()}")
    dtype = jnp.dtype(args.dtype)
    rows = []
    for T in args.lengths:
        key = jax.random.split(jax.random.PRNGKey(0), 4)
        shape = (args.batch, T, args.heads, args.head_dim)
        q, k, v = (jax.random.normal(kk, shape, dtype) for kk in key[:3])
        table = jax.random.normal(key[3], (args.heads, 32), jnp.float32)
        flops = 4 * args.batch * T * T * args.heads * args.head_dim * (0.5 if args.causal else 1.0)
        for with_bias in (False, True):
            for mode, factor in (("fwd", 1.0), ("fwd+bwd", 3.5)):
                times = {}
                for name, fn in _impls(args.causal, with_bias).items():
                    fn = fn if mode == "fwd" else _fwd_bwd(fn)
                    try:
                        seconds = time_call(jax.jit(fn), q, k, v, table, repeats=args.repeats)
                        scratch = temp_bytes(fn, q, k, v, table)
                    except Exception as e:  # e.g. cuDNN rejecting a shape: report, keep going
                        print(f"  {name} {mode} T={T} bias={with_bias}: {type(e).__name__}: {str(e)[:120]}")
                        continue
                    times[name] = seconds
                    rows.append(
                        {
                            "T": T,
                            "t5_bias": with_bias,
                            "pass": mode,
                            "impl": name,
                            "ms": seconds * 1e3,
                            "tflops": flops * factor / seconds / 1e12,
                            "scratch_mb": scratch / 2**20,
                        }
                    )
                for row in rows[len(rows) - len(times) :]:
                    for other in ("xla", "jax.nn"):
                        both = other in times and "pallas" in times
                        row[f"pallas/{other}"] = times["pallas"] / times[other] if both else float("nan")
    report(rows, args.csv)


if __name__ == "__main__":
    main()
