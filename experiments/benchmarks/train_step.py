"""One training step of t5lite vs Hugging Face PyTorch, same model, same shapes, alternating.

    python experiments/benchmarks/train_step.py [--model t5_1_1/small] [--scan 1 0] [--remat none]

t5lite's `train_step` (jitted, state donated, AdamW) against `transformers`'
`T5ForConditionalGeneration` (or `LlamaForCausalLM`) with `torch.optim.AdamW`, float32, dropout
off, random tokens. The two steps alternate in one process, so both see the same machine load;
medians of `--repeats` steps, tokens/s counts encoder + decoder tokens. torch gets as many threads
as the machine has cores, as XLA:CPU uses. Ratio > 1: t5lite is faster.
"""

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import device_description, report

from t5lite.interop.hf import hf_config_from
from t5lite.models import get_config
from t5lite.train.optimizers import optimizer
from t5lite.train.step import init_state, train_step


def batch_of(config, batch_size, inputs_length, targets_length, seed=0):
    """Random tokens in seqio's feature names; decoder inputs are the targets shifted right."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(2, config.vocab_size, (batch_size, targets_length), dtype=np.int32)
    batch = {
        "decoder_target_tokens": targets,
        "decoder_input_tokens": np.concatenate([np.zeros_like(targets[:, :1]), targets[:, :-1]], axis=1),
        "decoder_loss_weights": np.ones_like(targets),
    }
    if config.is_encoder_decoder:
        batch["encoder_input_tokens"] = rng.integers(2, config.vocab_size, (batch_size, inputs_length), dtype=np.int32)
    return batch


def t5lite_step(config, batch, learning_rate=1e-4):
    """A callable running one donated, jitted train step on `batch` (the state stays inside)."""
    tx = optimizer("adamw", learning_rate=learning_rate)
    step = jax.jit(
        lambda state, batch, rng: train_step(state, batch, rng, config=config, tx=tx, schedule=lambda s: learning_rate),
        donate_argnums=(0,),
    )
    holder = [init_state(config, tx, jax.random.PRNGKey(0))]
    batch = jax.device_put({k: jnp.asarray(v) for k, v in batch.items()})
    rng = jax.random.PRNGKey(1)

    def run():
        holder[0], metrics = step(holder[0], batch, rng)
        jax.block_until_ready(metrics["loss"])

    return run


def torch_step(config, batch, learning_rate=1e-4):
    import torch
    import transformers

    torch.manual_seed(0)
    hf_config = hf_config_from(config)
    if config.is_encoder_decoder:
        model = transformers.T5ForConditionalGeneration(hf_config)
        model.set_input_embeddings(model.shared)
        inputs = {
            "input_ids": torch.from_numpy(batch["encoder_input_tokens"]).long(),
            "decoder_input_ids": torch.from_numpy(batch["decoder_input_tokens"]).long(),
        }
    else:
        model = transformers.LlamaForCausalLM(hf_config)
        inputs = {"input_ids": torch.from_numpy(batch["decoder_input_tokens"]).long()}
    labels = torch.from_numpy(batch["decoder_target_tokens"]).long()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)

    def run():
        logits = model(**inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return run


def torch_on_all_cores() -> str:
    """Gives torch a thread per core, as XLA:CPU uses; returns the line that says so."""
    import torch

    torch.set_num_threads(os.cpu_count())
    threads = torch.get_num_threads()
    return f"device: {device_description()}, {os.cpu_count()} cores; torch {torch.__version__}, {threads} threads"


def alternate(runs: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each callable, called in turn `repeats` times after one warm-up call each."""
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="t5_1_1/small", help="a named config (t5lite.models.get_config)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--inputs_length", type=int, default=256)
    p.add_argument("--targets_length", type=int, default=64)
    p.add_argument("--scan", type=int, nargs="+", default=[1, 0], help="scan_layers values to compare")
    p.add_argument("--remat", default="none", help="ModelConfig.remat_policy")
    p.add_argument("--dtype", default="float32", help="t5lite's compute dtype; PyTorch stays float32")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--csv", default="train_step_benchmark.csv")
    args = p.parse_args()
    print(torch_on_all_cores())
    base = get_config(args.model).replace(dropout_rate=0.0, param_dtype="float32")
    rows = []
    for scan in args.scan:
        config = base.replace(dtype=args.dtype, scan_layers=bool(scan), remat_policy=args.remat)
        batch = batch_of(config, args.batch, args.inputs_length, args.targets_length)
        tokens = args.batch * (args.targets_length + (args.inputs_length if config.is_encoder_decoder else 0))
        seconds = alternate({"t5lite": t5lite_step(config, batch), "torch": torch_step(base, batch)}, args.repeats)
        rows.append(
            {
                "model": args.model,
                "scan_layers": bool(scan),
                "remat": args.remat,
                "dtype": args.dtype,
                "t5lite_tokens_per_s": tokens / seconds["t5lite"],
                "torch_tokens_per_s": tokens / seconds["torch"],
                "ratio": seconds["torch"] / seconds["t5lite"],
            }
        )
    report(rows, args.csv)


if __name__ == "__main__":
    main()
