"""Greedy decoding of t5lite vs Hugging Face `generate()`, same weights, same shapes, alternating.

    python experiments/benchmarks/decode.py [--model t5_1_1/small] [--scan 1 0]

t5lite's `decoding.generate` (compiled while_loop with the KV cache) against `transformers`'
`generate()` (its KV cache, greedy, `min_new_tokens` so both write `--new_tokens` tokens) on the same
random-initialised weights (`t5lite.interop.hf.to_torch`), float32. Calls alternate in one process;
medians of `--repeats` calls; new tokens/s counts the generated tokens of all rows. The table also
says whether both produced the same tokens. Ratio > 1: t5lite is faster.
"""

import argparse

import jax
import numpy as np
from common import report
from train_step import alternate, torch_on_all_cores

from t5lite.decoding import DecodingOptions, generate
from t5lite.interop.hf import to_torch
from t5lite.models import build, get_config, init_params


def compare(config, tokens, new_tokens, repeats):
    """(seconds per call by name, the tokens each wrote [B, new_tokens])."""
    import torch

    model = build(config)
    params = init_params(config, jax.random.PRNGKey(0))
    hf_model = to_torch(model, params)
    options = DecodingOptions(max_new_tokens=new_tokens, eos_id=None)
    inputs = {"encoder_input_tokens": tokens} if config.is_encoder_decoder else {"prompt_tokens": tokens}
    out = {}

    def ours():
        out["t5lite"] = np.asarray(generate(model, params, options=options, **inputs).tokens)

    def theirs():
        with torch.no_grad():
            generated = hf_model.generate(
                torch.from_numpy(tokens).long(),
                attention_mask=torch.ones(tokens.shape, dtype=torch.long),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                num_beams=1,
            )
        out["torch"] = generated[:, -new_tokens:].numpy()

    return alternate({"t5lite": ours, "torch": theirs}, repeats), out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="t5_1_1/small", help="a named config (t5lite.models.get_config)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--inputs_length", type=int, default=256, help="encoder inputs, or the decoder's prompt")
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--scan", type=int, nargs="+", default=[1, 0], help="scan_layers values to compare")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--csv", default="decode_benchmark.csv")
    args = p.parse_args()
    print(torch_on_all_cores())
    base = get_config(args.model).replace(dropout_rate=0.0, dtype="float32", param_dtype="float32")
    tokens = np.random.default_rng(0).integers(2, base.vocab_size, (args.batch, args.inputs_length), dtype=np.int32)
    rows = []
    for scan in args.scan:
        seconds, out = compare(base.replace(scan_layers=bool(scan)), tokens, args.new_tokens, args.repeats)
        new = args.batch * args.new_tokens
        rows.append(
            {
                "model": args.model,
                "scan_layers": bool(scan),
                "t5lite_new_tokens_per_s": new / seconds["t5lite"],
                "torch_new_tokens_per_s": new / seconds["torch"],
                "ratio": seconds["torch"] / seconds["t5lite"],
                "same_tokens": bool(np.array_equal(out["t5lite"], out["torch"])),
            }
        )
    report(rows, args.csv)


if __name__ == "__main__":
    main()
