"""Post-training quantisation methods side by side on one trained run: validation perplexity,
bytes of the quantised weights, and greedy decoding speed.

    make demo   # or any `t5lite train` run
    python experiments/quantization/compare.py --checkpoint=demo_run

Prints the table and writes it to `--out` as results.csv and results.md (the README's table).
Calibration (GPTQ, AWQ, SmoothQuant) uses the run's first training batches, as `t5lite quantize`
does. Decode tokens/s is only meaningful on an accelerator; the table names the device.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import pathlib
import time

import jax
import numpy as np
from flax import traverse_util

from t5lite import decoding, inference
from t5lite.models import build
from t5lite.quantization.calibration import calibrate, family_of
from t5lite.quantization.weights import quantize_weights

RECIPES = {
    "float": None,
    "int8 (RTN)": dict(method="int8"),
    "LLM.int8()": dict(method="llm_int8"),
    "SmoothQuant W8A8": dict(method="smoothquant"),
    "GPTQ int8": dict(method="gptq"),
    "int4 RTN g32": dict(method="int8", bits=4, group_size=32),
    "GPTQ int4 g32": dict(method="gptq", bits=4, group_size=32),
    "AWQ int4 g32": dict(method="awq", bits=4, group_size=32),
    "int4 RTN per channel": dict(method="int8", bits=4),
    "GPTQ int4 per channel": dict(method="gptq", bits=4),
    "AWQ int4 per channel": dict(method="awq", bits=4),
}
COLUMNS = ["method", "perplexity", "change %", "dense weight MiB", "decode tokens/s"]


def dense_weight_bytes(params) -> int:
    """Bytes of the attention and MLP kernels (what quantisation shrinks), scales included."""
    return sum(
        value.nbytes
        for path, value in traverse_util.flatten_dict(params).items()
        if family_of(path) and path[-1] in ("kernel", "kernel_scale", "kernel_zero", "input_scale")
    )


def decode_tokens_per_s(run: inference.Run, inputs, new_tokens: int) -> float:
    """Greedy tokens per second over a batch, after a first call that compiles."""
    options = decoding.DecodingOptions(max_new_tokens=new_tokens, eos_id=None)
    key = "encoder_input_tokens" if run.kind == "encoder_decoder" else "prompt_tokens"
    generate = lambda: decoding.generate(run.model, run.params, options=options, **{key: inputs})  # noqa: E731
    jax.block_until_ready(generate().tokens)
    start = time.perf_counter()
    jax.block_until_ready(generate().tokens)
    return inputs.shape[0] * new_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a training run's --model_dir")
    parser.add_argument("--batches", type=int, default=20, help="validation batches for perplexity")
    parser.add_argument("--calibration_batches", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent))
    args = parser.parse_args()

    run = inference.load_run(args.checkpoint)
    print(f"Calibrating on {args.calibration_batches} training batches of {run.task} ...", flush=True)
    calibration = inference.calibration_batches(run, args.calibration_batches)
    stats = calibrate(run.model.config, run.params, calibration)
    if run.kind == "encoder_decoder":
        inputs = np.asarray(calibration[0]["encoder_input_tokens"])
    else:  # prompts: the first 16 target tokens of each row
        inputs = np.asarray(calibration[0]["decoder_target_tokens"])[:, :16]
    rows = []
    for name, recipe in RECIPES.items():
        quantized = run
        if recipe:
            config, params = quantize_weights(run.model.config, run.params, stats=stats, **recipe)
            quantized = dataclasses.replace(run, model=build(config), params=params)
        perplexity = inference.validation_metrics(quantized, args.batches)["perplexity"]
        rows.append(
            {
                "method": name,
                "perplexity": perplexity,
                "dense weight MiB": dense_weight_bytes(quantized.params) / 2**20,
                "decode tokens/s": decode_tokens_per_s(quantized, inputs, args.new_tokens),
            }
        )
        rows[-1]["change %"] = 100 * (perplexity / rows[0]["perplexity"] - 1)
        print(
            f"{name:<22} perplexity {perplexity:8.3f} ({rows[-1]['change %']:+.2f}%)  "
            f"{rows[-1]['dense weight MiB']:.3f} MiB  {rows[-1]['decode tokens/s']:.0f} tokens/s",
            flush=True,
        )
    write(rows, pathlib.Path(args.out), run, args)


def write(rows: list[dict], out: pathlib.Path, run: inference.Run, args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    device = jax.devices()[0].device_kind
    lines = [
        f"{run.model.config.architecture} run `{pathlib.Path(args.checkpoint).name}` (step {run.step}, task "
        f"`{run.task}`), perplexity over {args.batches} validation batches, greedy decoding of "
        f"{args.new_tokens} tokens for {run.batch_size} rows on {device}.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + " --- |" * len(COLUMNS),
    ]
    lines += [
        f"| {r['method']} | {r['perplexity']:.3f} | {r['change %']:+.2f} | {r['dense weight MiB']:.3f} | "
        f"{r['decode tokens/s']:.0f} |"
        for r in rows
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"Wrote {out / 'results.csv'} and {out / 'results.md'}")


if __name__ == "__main__":
    main()
