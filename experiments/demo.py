"""`make demo`: a researcher's loop end to end on a plain CPU, with no network.

1. the model zoo and logit parity with Hugging Face;
2. a SentencePiece vocabulary trained on the embedded corpus (`t5lite vocab`);
3. a small T5 trained with span corruption (`t5lite train --gin_file=runs/t5_tiny_span_corruption.gin`);
4. validation perplexity and sample decodes (`t5lite eval`, `t5lite generate`);
5. a Markdown report with a PNG loss curve in the run directory.
"""

from __future__ import annotations

import argparse
import itertools
import pathlib
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seqio  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from t5lite import cli, data, decoding, inference  # noqa: E402
from t5lite.interop import hf  # noqa: E402
from t5lite.models import named_configs, param_count  # noqa: E402
from t5lite.train.metrics import read_metrics  # noqa: E402

RUN_GIN = "runs/t5_tiny_span_corruption.gin"


def zoo_and_parity() -> None:
    configs = named_configs()
    width = 2 + max(map(len, configs))
    print(f"{'named config':<{width}}{'architecture':<17}{'parameters':>15}")
    for name, config in configs.items():
        print(f"{name:<{width}}{config.architecture:<17}{param_count(config):>15,}")
    torch.manual_seed(0)
    t5_config = transformers.T5Config(
        vocab_size=128,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
    )
    t5_config.tie_word_embeddings = False
    t5 = transformers.T5ForConditionalGeneration(t5_config).eval()
    t5.set_input_embeddings(t5.shared)
    x, y = np.random.RandomState(0).randint(1, 128, (2, 24)), np.random.RandomState(1).randint(1, 128, (2, 16))
    model, params = hf.from_torch(t5)
    with torch.no_grad():
        expected = t5(input_ids=torch.tensor(x), decoder_input_ids=torch.tensor(y)).logits.numpy()
    ours = np.asarray(model.apply({"params": params}, x, y, enable_dropout=False))
    print(f"\nT5 v1.1 imported from Hugging Face: max |logits - HF| = {np.abs(ours - expected).max():.1e}\n")


def plot_loss(model_dir: pathlib.Path) -> pathlib.Path:
    train = read_metrics(model_dir / "train_metrics.jsonl")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in train], [r["loss"] - r["z_loss"] for r in train], label="train")
    evals = model_dir / "eval_metrics.jsonl"
    if evals.is_file():
        rows = read_metrics(evals)
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], "o-", label="validation")
    ax.set(xlabel="step", ylabel="cross entropy (nats/token)", title="t5_1_1/tiny, span corruption")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = model_dir / "loss.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sample_decodes(run: inference.Run, count: int = 4) -> list[tuple[str, str, str]]:
    """Greedy decodes of validation examples with at least two masked spans (one-span examples
    are mostly a sentence's final word)."""
    task = seqio.get_mixture_or_task(run.task)
    vocab = run.vocabulary
    first_sentinel = vocab.vocab_size - vocab.extra_ids
    dataset = task.get_dataset(run.task_feature_lengths, split="validation", shuffle=False, seed=0)
    examples = itertools.islice(
        (ex for ex in dataset.as_numpy_iterator() if np.sum(ex["inputs"] >= first_sentinel) >= 2), count
    )
    pairs = [(vocab.decode(ex["inputs"].tolist()), vocab.decode(ex["targets"].tolist())) for ex in examples]
    options = decoding.DecodingOptions(max_new_tokens=run.task_feature_lengths["targets"])
    predictions = inference.generate_texts(run, [inputs for inputs, _ in pairs], options)
    return [(inputs, target, prediction) for (inputs, target), prediction in zip(pairs, predictions)]


def write_report(model_dir: pathlib.Path, results: dict, samples, seconds: float, vocab_path) -> pathlib.Path:
    last = read_metrics(model_dir / "train_metrics.jsonl")[-1]
    first = read_metrics(model_dir / "train_metrics.jsonl")[0]
    lines = [
        "# t5lite demo run",
        "",
        f"t5_1_1/tiny trained with span corruption on the embedded corpus for {last['step']} steps "
        f"({seconds / 60:.1f} min on this machine). Vocabulary: `{vocab_path}`.",
        "",
        "| | first logged step | last logged step |",
        "| --- | --- | --- |",
        f"| train loss | {first['loss']:.3f} | {last['loss']:.3f} |",
        f"| train token accuracy | {first['accuracy']:.3f} | {last['accuracy']:.3f} |",
        f"| tokens/s | | {last.get('tokens_per_s', float('nan')):,.0f} |",
        f"| MFU (vs. measured CPU matmul peak) | | {last.get('mfu', float('nan')):.1%} |",
        "",
        f"Validation: perplexity **{results['validation']['perplexity']:.1f}**, "
        f"token accuracy {results['validation']['accuracy']:.3f}.",
        "",
        "![loss curve](loss.png)",
        "",
        "## Sample decodes (greedy)",
        "",
    ]
    for inputs, target, prediction in samples:
        lines += [f"- **input**: {inputs}", f"  - **target**: {target}", f"  - **model**: {prediction}"]
    path = model_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", default="demo_run")
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    model_dir = pathlib.Path(args.model_dir).absolute()

    zoo_and_parity()
    vocab_path = data.build_vocabulary()
    print(f"Vocabulary: {vocab_path} ({data.default_vocabulary().vocab_size} ids with sentinels)\n")
    start = time.perf_counter()
    code = cli.main(
        [
            "train",
            f"--gin_file={RUN_GIN}",
            f"--model_dir={model_dir}",
            f"--gin.train.num_steps={args.steps}",
            "--gin.train.log_every=25",
            f"--gin.train.eval_every={args.steps // 2}",
        ]
    )
    if code:
        raise SystemExit(code)
    seconds = time.perf_counter() - start
    run = inference.load_run(model_dir)
    results = inference.evaluate_run(run, num_batches=10, max_examples=16)
    samples = sample_decodes(run)
    print(
        f"\nValidation perplexity {results['validation']['perplexity']:.1f}, "
        f"token accuracy {results['validation']['accuracy']:.3f}\n"
    )
    for inputs, target, prediction in samples:
        print(f"input : {inputs}\ntarget: {target}\nmodel : {prediction}\n")
    plot_loss(model_dir)
    report = write_report(model_dir, results, samples, seconds, vocab_path)
    print(f"Report: {report} (with {model_dir / 'loss.png'})")


if __name__ == "__main__":
    main()
