"""The training input pipeline on this host: resuming it, and how fast it runs.

    python experiments/benchmarks/input_pipeline.py resume [--positions 0 1000 10000] [--csv resume.csv]
    python experiments/benchmarks/input_pipeline.py throughput [--seconds 30] [--csv throughput.csv]

`resume`: the tiny span-corruption run's stream (128/32 tokens, 16 rows a batch, seed 0) is read
once from the start, its state saved on the way at each position p; then, for each p, a fresh
stream restores that state and the time to its first batch is measured, against replaying p
batches (what resuming cost before runs saved their input state: the time the first read took
to reach p). Each restored stream's first batch is checked to equal the one the first read gave.

`throughput`: examples and tokens per second one process produces for T5 span corruption 512/114
(batches of 128) and causal LM 2048 (batches of 32) on the embedded corpus, packed, after the
first batch; next to it, the sequences per second a v5p host (4 chips) consumes training
t5_1_1/base at 50% MFU, and the llama/1b step on LM 2048 likewise.
"""

import argparse
import pathlib
import tempfile
import time

import numpy as np
from common import report

from t5lite import hardware
from t5lite.data import DataStream
from t5lite.models import flops, get_config

TINY_RUN = dict(
    name="t5lite_corpus_span_corruption", kind="encoder_decoder", lengths={"inputs": 128, "targets": 32}, batch=16
)
THROUGHPUT_RUNS = [  # name, model kind, task lengths, batch, the model a v5p host would train on it
    ("t5lite_corpus_span_corruption", "encoder_decoder", {"inputs": 512, "targets": 114}, 128, "t5_1_1/base"),
    ("t5lite_corpus_lm", "decoder", {"targets": 2048}, 32, "llama/1b"),
]
V5P_HOST_CHIPS, MFU = 4, 0.5


def stream(name, kind, lengths, batch):
    return DataStream(name, split="train", task_feature_lengths=lengths, batch_size=batch, model_kind=kind, seed=0)


def first_batch_seconds(make, prepare):
    start = time.perf_counter()
    s = make()
    prepare(s)
    batch = next(s)
    return time.perf_counter() - start, batch


def resume(positions, directory: pathlib.Path):
    make = lambda: stream(TINY_RUN["name"], TINY_RUN["kind"], TINY_RUN["lengths"], TINY_RUN["batch"])  # noqa: E731
    first, reading, replay, batches = make(), 0.0, {}, {}
    for p in sorted(positions):
        start = time.perf_counter()
        while first.position < p:
            next(first)
            if first.position % 1000 == 0:
                print(f"  read {first.position} batches", flush=True)
        reading += time.perf_counter() - start
        replay[p] = reading  # what reaching p costs without a saved state
        first.save(str(directory / f"state_{p}"))
        batches[p] = next(first)
    rows = []
    for p in positions:
        seconds, batch = first_batch_seconds(make, lambda s, p=p: s.restore(str(directory / f"state_{p}"), p))
        assert all(np.array_equal(batch[k], batches[p][k]) for k in batch), f"restored stream differs at {p}"
        rows.append({"position": p, "restored_s": seconds, "replayed_s": replay[p] + seconds})
    for row in rows:
        row["restored_vs_p0"] = row["restored_s"] / rows[0]["restored_s"]
    return rows


def throughput(seconds):
    rows = []
    for name, kind, lengths, batch, model in THROUGHPUT_RUNS:
        s = stream(name, kind, lengths, batch)
        next(s)
        count, tokens, start = 0, 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            b = next(s)
            count += batch
            tokens += sum(int(np.sum(v > 0)) for k, v in b.items() if k.endswith("_segment_ids"))
        elapsed = time.perf_counter() - start
        config = get_config(model)
        encoder = lengths["inputs"] if kind == "encoder_decoder" else 0
        per_sequence = flops.training_flops_per_sequence(config, encoder, lengths["targets"])
        needed = V5P_HOST_CHIPS * hardware.PEAK_BF16_FLOPS["tpu_v5p"] * MFU / per_sequence
        rows.append(
            {
                "task": f"{name} {'/'.join(map(str, lengths.values()))}",
                "rows/s": count / elapsed,
                "tokens/s": tokens / elapsed,
                "v5p_host_model": model,
                "v5p_host_rows/s": needed,
                "fed_share": count / elapsed / needed,
            }
        )
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["resume", "throughput"])
    parser.add_argument("--positions", type=int, nargs="+", default=[0, 1000, 10000])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--csv", default=None)
    args = parser.parse_args()
    if args.what == "resume":
        with tempfile.TemporaryDirectory() as directory:
            rows = resume(args.positions, pathlib.Path(directory))
    else:
        rows = throughput(args.seconds)
    report(rows, args.csv or f"{args.what}.csv")


if __name__ == "__main__":
    main()
