"""int8 x int8 -> int32 Pallas matmul (per-channel scales, bf16 out) vs bf16 `jnp.dot`.

    python experiments/benchmarks/int8_matmul.py [--sizes 1024 2048 ...] [--csv out.csv]

Square M = N = K problems; reports median time, TOP/s (2*M*N*K), and int8 time / bf16 time
(< 1 means the int8 kernel is faster).
"""

import argparse

import jax
import jax.numpy as jnp
from common import device_description, on_accelerator, report, time_call

from pallas_kernels.int8_matmul import int8_matmul


def main():
    accel = on_accelerator()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192] if accel else [128, 256])
    p.add_argument("--repeats", type=int, default=10 if accel else 2)
    p.add_argument("--csv", default="int8_matmul_benchmark.csv")
    args = p.parse_args()
    print(f"device: {device_description()}")
    rows = []
    for n in args.sizes:
        ka, kb = jax.random.split(jax.random.PRNGKey(0))
        a = jax.random.randint(ka, (n, n), -127, 128, jnp.int8)
        b = jax.random.randint(kb, (n, n), -127, 128, jnp.int8)
        a_scale = jnp.full((n,), 0.01, jnp.float32)
        b_scale = jnp.full((n,), 0.02, jnp.float32)
        a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
        t_int8 = time_call(jax.jit(int8_matmul), a, b, a_scale, b_scale, repeats=args.repeats)
        t_bf16 = time_call(jax.jit(jnp.dot), a16, b16, repeats=args.repeats)
        ops = 2 * n**3
        rows.append(
            dict(
                size=n,
                int8_ms=t_int8 * 1e3,
                bf16_ms=t_bf16 * 1e3,
                int8_tops=ops / t_int8 / 1e12,
                bf16_tflops=ops / t_bf16 / 1e12,
                int8_over_bf16=t_int8 / t_bf16,
            )
        )
    report(rows, args.csv)


if __name__ == "__main__":
    main()
