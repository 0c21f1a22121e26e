"""Compiles the pre-training step of large configs for TPU topologies (on a CPU-only machine,
through libtpu) and prints per-chip memory as a Markdown table: the one at the top of
experiments/compile/results.md, which the README's sharding section quotes.

    python experiments/compile/compile_table.py
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import tqdm  # noqa: E402

from t5lite import cli  # noqa: E402
from t5lite.train import aot  # noqa: E402
from t5lite.train.spec import RunSpec  # noqa: E402

RUNS = {
    "t5_1_1": "runs/pretrain_span_corruption.gin",
    "switch": "runs/pretrain_span_corruption.gin",
    "llama": "runs/pretrain_lm.gin",
}
# T5's final models trained on 2048 sequences a step (the pre-training file's default is T5X's 128).
BINDINGS = {"t5_1_1": ["train.batch_size = 2048"], "switch": ["train.batch_size = 2048"], "llama": []}
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
    ("t5_1_1/xxl", "pipeline", "v5p:4x4x8"),
    ("llama/7b", "pipeline", "v5p:4x4x4"),
    ("llama/7b", "pipeline", "v5p:4x4x8"),
    ("switch/base_128", "expert_fsdp", "v5p:2x2x4"),
]


def main() -> None:
    print(
        "| model | run | sharding | topology | mesh | state + batch | of it optimizer state | temporaries | "
        "total / HBM per chip | fits |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model, sharding, topology in tqdm.tqdm(CASES, file=sys.stderr):
        family = model.split("/")[0]
        run = RUNS[family]
        cli.parse_gin([f"models/{model}.gin", run, f"sharding/{sharding}.gin"], BINDINGS[family])
        report = aot.compile_train_step(topology, RunSpec.from_gin())
        mesh = " ".join(f"{axis}={size}" for axis, size in report.mesh.items() if size > 1)
        if report.pipeline:
            mesh += f" (microbatches={report.pipeline[1]} repeats={report.pipeline[2]}: bubble {report.bubble:.0%})"
        optimizer_state = aot.format_bytes(report.optimizer_state_bytes)
        if report.error:
            memory = ("-", optimizer_state, "-", report.error.split(": ", 1)[-1])
        else:
            m = {key: aot.format_bytes(value) for key, value in report.memory.items()}
            memory = (
                m["argument"],
                optimizer_state,
                m["temp"],
                f"{aot.format_bytes(report.bytes_per_device)} / {aot.format_bytes(report.hbm_bytes)}",
            )
        print(
            f"| {model} | {run.split('/')[-1]} | {sharding} | {topology} | {mesh} | {' | '.join(memory)} | "
            f"{'yes' if report.fits else 'no'} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
