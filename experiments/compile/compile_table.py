"""Compiles the pre-training step of large configs for TPU topologies (on a CPU-only machine,
through libtpu) and prints per-chip memory as a Markdown table: the README's sharding section.

    python experiments/compile/compile_table.py > experiments/compile/results.md
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import tqdm  # noqa: E402

from t5lite import cli  # noqa: E402
from t5lite.train import aot  # noqa: E402

RUNS = {"t5_1_1": "runs/pretrain_span_corruption.gin", "switch": "runs/pretrain_span_corruption.gin",
        "llama": "runs/pretrain_lm.gin"}
CASES = [  # model, sharding, topology: from one copy per chip to splitting it 256 ways
    ("t5_1_1/xl", "data_parallel", "v5e:16x16"),
    ("t5_1_1/xl", "fsdp", "v5e:16x16"),
    ("t5_1_1/xl", "fsdp", "v5p:4x4x4"),
    ("t5_1_1/xxl", "fsdp", "v5e:16x16"),
    ("t5_1_1/xxl", "fsdp", "v5p:4x4x8"),
    ("t5_1_1/xxl", "fsdp_tensor", "v5p:4x4x8"),
    ("llama/7b", "fsdp", "v5p:2x2x4"),
    ("llama/7b", "fsdp", "v5p:4x4x4"),
    ("llama/7b", "fsdp_tensor", "v5p:4x4x4"),
    ("llama/7b", "fsdp", "v6e:16x16"),
    ("switch/base_128", "expert_fsdp", "v5p:2x2x4"),
]


def main() -> None:
    print("| model | run | sharding | topology | mesh | state + batch | temporaries | total / HBM per chip | fits |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model, sharding, topology in tqdm.tqdm(CASES, file=sys.stderr):
        run = RUNS[model.split("/")[0]]
        cli.parse_gin([f"models/{model}.gin", run, f"sharding/{sharding}.gin"], [])
        report = aot.compile_train_step(topology, aot.train_arguments())
        mesh = " ".join(f"{axis}={size}" for axis, size in report.mesh.items() if size > 1)
        if report.error:
            memory = ("-", "-", report.error.split(": ", 1)[-1])
        else:
            m = {key: aot.format_bytes(value) for key, value in report.memory.items()}
            memory = (m["argument"], m["temp"],
                      f"{aot.format_bytes(report.bytes_per_device)} / {aot.format_bytes(report.hbm_bytes)}")
        print(f"| {model} | {run.split('/')[-1]} | {sharding} | {topology} | {mesh} | {' | '.join(memory)} | "
              f"{'yes' if report.fits else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
