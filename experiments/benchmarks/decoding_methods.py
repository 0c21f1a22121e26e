"""Decoding methods on two trained runs of one task: a model and a smaller one.

    python experiments/benchmarks/decoding_methods.py --work_dir=/tmp/decoding_runs   # trains both once

Speculative decoding (the smaller run drafts): tokens per target pass, time per call against greedy
decoding (alternating calls, medians) and whether the tokens are greedy's. Against degeneration,
contrastive search and contrastive decoding (the smaller run as the amateur) against greedy decoding:
distinct-n (unique n-grams / n-grams within each continuation, averaged over prompts; 1 means no
repeated n-gram) and how many continuations differ from greedy's. The prompts are the first
`--prompt_tokens` tokens of the task's validation texts. Runs: `--model_dir` and `--small_dir`, or
`--work_dir` to train both on the corpus LM task (llama_tiny_lm.gin: a 4-layer d_model 256 model and a
1-layer d_model 128 one).
"""

import argparse
import dataclasses
import itertools
import pathlib

import numpy as np
from common import report
from train_step import alternate

from t5lite import cli, inference
from t5lite.decoding import DecodingOptions, generate

RUNS = {  # name: gin bindings over runs/llama_tiny_lm.gin
    "model": ["ModelConfig.num_decoder_layers = 4", "ModelConfig.d_model = 256", "ModelConfig.d_ff = 768"],
    "small": ["ModelConfig.num_decoder_layers = 1"],
}


def train_runs(work_dir: pathlib.Path, steps: int) -> dict[str, pathlib.Path]:
    dirs = {}
    for name, bindings in RUNS.items():
        dirs[name] = work_dir / name
        flags = [f"--gin.{b.replace(' = ', '=')}" for b in [*bindings, f"train.num_steps = {steps}"]]
        args = ["train", "--gin_file=runs/llama_tiny_lm.gin", f"--model_dir={dirs[name]}", "--quiet", *flags]
        assert cli.main(args) == 0, f"training {name} failed"
    return dirs


def prompts(run: inference.Run, count: int, length: int) -> np.ndarray:
    """[count, length] token ids: the starts of the validation texts."""
    stream = run.spec.data_stream("validation", shuffle=False, repeat=False, seed=0)
    rows = [row for batch in stream for row in batch["decoder_target_tokens"] if np.count_nonzero(row) > length]
    return np.stack([row[:length] for row in itertools.islice(rows, count)]).astype(np.int32)


def distinct(tokens: np.ndarray, n: int, eos_id: int) -> float:
    """Mean over rows of unique n-grams / n-grams, up to each row's EOS."""
    shares = []
    for row in tokens.tolist():
        row = row[: row.index(eos_id)] if eos_id in row else row
        grams = [tuple(row[i : i + n]) for i in range(len(row) - n + 1)]
        if grams:
            shares.append(len(set(grams)) / len(grams))
    return float(np.mean(shares))


def speculative_rows(model, small, tokens, greedy, repeats) -> list[dict]:
    """Greedy decoding, speculative decoding with 2, 4 and 6 drafted tokens, and the small run alone:
    alternating calls, medians."""
    out = {}

    def call(name, run, options, **helpers):
        def decode():
            out[name] = generate(run.model, run.params, prompt_tokens=tokens, options=options, **helpers)
            out[name].tokens.block_until_ready()

        return decode

    calls = {"greedy": call("greedy", model, greedy)}
    for gamma in (2, 4, 6):
        options = dataclasses.replace(greedy, draft_tokens=gamma)
        calls[f"speculative, {gamma} drafted"] = call(gamma, model, options, draft=(small.model, small.params))
    calls["small run alone"] = call("small", small, greedy)
    seconds = alternate(calls, repeats)
    rows = []
    for (name, time), result in zip(seconds.items(), out.values()):
        passes = 1 + np.asarray(result.rounds).mean() if result.rounds is not None else greedy.max_new_tokens
        rows.append(
            {
                "batch": len(tokens),
                "method": name,
                "tokens per model pass": greedy.max_new_tokens / passes,
                "seconds": time,
                "speed-up": seconds["greedy"] / time,
                "greedy's tokens": np.array_equal(result.tokens, out["greedy"].tokens)
                if name != "small run alone"
                else "-",
            }
        )
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_dir", help="the model (target, expert)")
    p.add_argument("--small_dir", help="the smaller run (draft, amateur)")
    p.add_argument("--work_dir", help="train both here (once) instead")
    p.add_argument("--steps", type=int, default=1000, help="training steps of each run with --work_dir")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt_tokens", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--csv", default="decoding_methods.csv")
    args = p.parse_args()
    if args.work_dir:
        work_dir = pathlib.Path(args.work_dir)
        dirs = {name: work_dir / name for name in RUNS}
        if not all((d / "checkpoints").is_dir() for d in dirs.values()):
            dirs = train_runs(work_dir, args.steps)
        args.model_dir, args.small_dir = dirs["model"], dirs["small"]
    model, small = inference.load_run(args.model_dir), inference.load_run(args.small_dir)
    tokens = prompts(model, args.prompts, args.prompt_tokens)
    greedy = DecodingOptions(max_new_tokens=args.new_tokens, eos_id=None)
    rows = []
    for batch in (1, len(tokens)):
        rows += speculative_rows(model, small, tokens[:batch], greedy, args.repeats)
    report(rows, args.csv)
    rows, outputs = repetition_rows(model, small, tokens, greedy)
    report(rows, str(pathlib.Path(args.csv).with_suffix("")) + "_repetition.csv")
    for name, output in outputs.items():
        print(
            f"\n{name}: {model.vocabulary.decode(tokens[0].tolist())} || {model.vocabulary.decode(output[0].tolist())}"
        )


def repetition_rows(model, small, tokens, greedy) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Distinct-n of greedy decoding, contrastive search and contrastive decoding; their tokens."""
    methods = {
        "greedy": (greedy, {}),
        "contrastive search (alpha 0.6, k 4)": (dataclasses.replace(greedy, degeneration_penalty=0.6, top_k=4), {}),
        "contrastive decoding (alpha 0.1)": (greedy, {"amateur": (small.model, small.params)}),
    }
    rows, outputs = [], {}
    for name, (options, helpers) in methods.items():
        result = generate(model.model, model.params, prompt_tokens=tokens, options=options, **helpers)
        outputs[name] = np.asarray(result.tokens)
        rows.append(
            {
                "method": name,
                **{f"distinct-{n}": distinct(outputs[name], n, model.model.config.eos_id) for n in (1, 2, 3)},
                "differs from greedy": float(np.mean(np.any(outputs[name] != outputs["greedy"], axis=1))),
            }
        )
    return rows, outputs


if __name__ == "__main__":
    main()
