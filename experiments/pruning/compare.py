"""Pruning methods side by side on one trained run: validation perplexity at sparsities 0.25,
0.5 and 0.75, beside the dense model and int8 / GPTQ quantisation of the same run.

    t5lite train --gin_file=runs/t5_tiny_span_corruption.gin --gin.train.num_steps=300 --model_dir=/tmp/prune_base
    python experiments/pruning/compare.py --checkpoint=/tmp/prune_base

Prints a markdown table and writes it to `--out`/results.md with the command used. Calibration
(Wanda, structured, GPTQ) uses the run's first training batches, as `t5lite prune` and
`t5lite quantize` do. No fine-tuning after pruning: these are one-shot numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

import numpy as np
from flax import traverse_util

from t5lite import inference
from t5lite.models import build, param_count
from t5lite.pruning.weights import prunable, prune_weights
from t5lite.quantization.calibration import calibrate
from t5lite.quantization.weights import quantize_weights

SPARSITIES = (0.25, 0.5, 0.75)
QUANTIZED = {
    "int8 (RTN)": dict(method="int8"),
    "GPTQ int8": dict(method="gptq"),
    "GPTQ int4 g32": dict(method="gptq", bits=4, group_size=32),
}
COLUMNS = ["method", "sparsity", "perplexity", "change %", "parameters", "nonzero attention+MLP weights"]


def nonzero_kernel_weights(config, params) -> int:
    flat = traverse_util.flatten_dict(params, sep="/")
    return sum(int(np.count_nonzero(np.asarray(v))) for p, v in flat.items() if prunable(p, ("attention", "mlp")))


def recipes():
    yield "dense", None, None
    for name, recipe in QUANTIZED.items():
        yield name, None, ("quantize", recipe)
    for method in ("magnitude", "wanda", "structured"):
        for sparsity in SPARSITIES:
            yield method, sparsity, ("prune", dict(method=method, sparsity=sparsity))
    yield "2:4", 0.5, ("prune", dict(method="2:4", sparsity=0.5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a training run's --model_dir")
    parser.add_argument("--batches", type=int, default=20, help="validation batches for perplexity")
    parser.add_argument("--calibration_batches", type=int, default=8)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent))
    args = parser.parse_args()

    run = inference.load_run(args.checkpoint)
    print(f"Calibrating on {args.calibration_batches} training batches of {run.task} ...", flush=True)
    stats = calibrate(run.model.config, run.params, inference.calibration_batches(run, args.calibration_batches))
    rows = []
    for name, sparsity, (action, recipe) in ((n, s, r or (None, None)) for n, s, r in recipes()):
        config, params = run.model.config, run.params
        if action == "quantize":
            config, params = quantize_weights(config, params, stats=stats, **recipe)
        elif action == "prune":
            config, params = prune_weights(config, params, stats=stats, **recipe)
        changed = dataclasses.replace(run, model=build(config), params=params)
        perplexity = inference.validation_metrics(changed, args.batches)["perplexity"]
        row = {"method": name, "sparsity": sparsity, "perplexity": perplexity, "parameters": param_count(config)}
        row["change %"] = 100 * (perplexity / rows[0]["perplexity"] - 1) if rows else 0.0
        row["nonzero attention+MLP weights"] = nonzero_kernel_weights(config, params) if action != "quantize" else None
        rows.append(row)
        print(f"{name:<16} {sparsity or '':<5} perplexity {perplexity:9.3f} ({row['change %']:+.1f}%)", flush=True)
    write(rows, pathlib.Path(args.out), run, args)


def write(rows: list[dict], out: pathlib.Path, run: inference.Run, args) -> None:
    import jax

    out.mkdir(parents=True, exist_ok=True)
    command = "python experiments/pruning/compare.py " + " ".join(sys.argv[1:])
    lines = [
        f"{run.model.config.architecture} run `{pathlib.Path(args.checkpoint).name}` (step {run.step}, task "
        f"`{run.task}`), perplexity over {args.batches} validation batches on {jax.devices()[0].device_kind}; "
        f"one-shot, no fine-tuning after pruning. Calibration: {args.calibration_batches} training batches.",
        "",
        f"`{command}`",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + " --- |" * len(COLUMNS),
    ]
    for r in rows:
        nonzero = r["nonzero attention+MLP weights"]
        lines.append(
            f"| {r['method']} | {r['sparsity'] if r['sparsity'] is not None else '-'} | {r['perplexity']:.2f} | "
            f"{r['change %']:+.1f} | {r['parameters']:,} | {'-' if nonzero is None else f'{nonzero:,}'} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"Wrote {out / 'results.md'}")


if __name__ == "__main__":
    main()
