"""A mixture-of-experts MLP against a dense MLP of the same active size, forward + backward.

    python experiments/benchmarks/moe.py [--experts 8 32] [--group_sizes 512 4096] [--csv moe.csv]

Rows: the dense MLP (what a token's one expert costs), capacity routing at factor 1.25 and 2.0
(one-hot dispatch/combine einsums; their cost grows with group size x experts x capacity), and
dropless routing (tokens sorted by expert through `lax.ragged_dot`). Columns: median ms, the
ratio to the dense MLP, and XLA's compiled scratch (peak memory beyond inputs and outputs).
"""

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
from common import device_description, on_accelerator, report, temp_bytes, time_call

from t5lite.layers.mlp import Mlp
from t5lite.layers.moe import MoeMlp


def _loss_and_grad(module, x):
    params = nn.unbox(module.init(jax.random.PRNGKey(0), x)["params"])

    def loss(p, x):
        return jnp.sum(module.apply({"params": p}, x, mutable=["moe"])[0].astype(jnp.float32))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params


def main():
    accel = on_accelerator()
    parser = argparse.ArgumentParser()
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64] if accel else [8, 32])
    parser.add_argument("--group_sizes", type=int, nargs="+", default=[512, 2048] if accel else [256, 1024])
    parser.add_argument("--batch", type=int, default=16 if accel else 4)
    parser.add_argument("--length", type=int, default=2048 if accel else 1024)
    parser.add_argument("--d_model", type=int, default=1024 if accel else 256)
    parser.add_argument("--d_ff", type=int, default=4096 if accel else 1024)
    parser.add_argument("--csv", default="moe.csv")
    args = parser.parse_args()
    dtype = jnp.bfloat16 if accel else jnp.float32
    print(
        f"device {device_description()}; batch {args.batch} x length {args.length}, d_model {args.d_model}, "
        f"d_ff {args.d_ff}, {jnp.dtype(dtype).name}, forward + backward"
    )
    x = jax.random.normal(jax.random.PRNGKey(1), (args.batch, args.length, args.d_model), dtype)
    dense_fn, dense_params = _loss_and_grad(Mlp(d_ff=args.d_ff, dtype=dtype), x)
    dense_ms = time_call(dense_fn, dense_params, x) * 1e3
    rows = [
        {
            "experts": 1,
            "group": "-",
            "routing": "dense mlp",
            "ms": dense_ms,
            "vs_dense": 1.0,
            "scratch_MiB": temp_bytes(dense_fn, dense_params, x) / 2**20,
        }
    ]
    for experts in args.experts:
        for group in args.group_sizes:
            variants = {
                "capacity 1.25": dict(capacity_factor=1.25),
                "capacity 2.0": dict(capacity_factor=2.0),
                "dropless": dict(dropless=True),
            }
            for routing, kwargs in variants.items():
                if routing == "dropless" and group != args.group_sizes[0]:
                    continue  # dropless routing has no groups
                layer = MoeMlp(num_experts=experts, d_ff=args.d_ff, group_size=group, dtype=dtype, **kwargs)
                fn, params = _loss_and_grad(layer, x)
                ms = time_call(fn, params, x) * 1e3
                rows.append(
                    {
                        "experts": experts,
                        "group": "-" if routing == "dropless" else group,
                        "routing": routing,
                        "ms": ms,
                        "vs_dense": ms / dense_ms,
                        "scratch_MiB": temp_bytes(fn, params, x) / 2**20,
                    }
                )
    report(rows, args.csv)


if __name__ == "__main__":
    main()
