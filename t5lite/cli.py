"""`t5lite <command>`: the command-line entry point."""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys

from t5lite import config


def convert(args: argparse.Namespace) -> None:
    """A Hugging Face `save_pretrained` directory (weights, config.json, tokenizer) becomes a t5lite run
    directory that generate, eval and train.init_from take; a t5lite run (its latest or --step
    checkpoint, LoRA merged) becomes a save_pretrained directory with its tokenizer. The direction is
    read off SOURCE."""
    from t5lite import conversion

    source, dest = pathlib.Path(args.source), pathlib.Path(args.dest)
    if dest.exists() and any(dest.iterdir()):
        raise ValueError(f"Destination {dest} is not empty; convert writes into a new or empty directory.")
    if (source / "config.json").is_file():
        config = conversion.import_run(source, dest, dtype=args.dtype)
        print(f"Wrote a t5lite run ({config.architecture}) to {dest}: try `t5lite generate --model_dir={dest}`")
    elif (source / "t5lite_config.json").is_file():
        tokenizer = conversion.export_run(source, dest, args.step, trust=args.trust_run)
        print(f"Wrote a Hugging Face model to {dest} {tokenizer}")
    else:
        raise FileNotFoundError(
            f"{source} is neither a t5lite run or checkpoint (t5lite_config.json) nor a Hugging Face "
            f"save_pretrained directory (config.json)."
        )


def parse_gin(files: list[str], bindings: list[str]) -> None:
    """Registers t5lite's configurables, then parses gin files and `--gin.NAME=VALUE` bindings."""
    import t5lite.data  # noqa: F401  (registers tasks and data configurables)
    import t5lite.train.loop  # noqa: F401  (registers train, optimizer, learning_rate_schedule)

    config.parse_gin(files, bindings)


def train(args: argparse.Namespace) -> int:
    """Trains (or resumes) the model a gin config describes, writing everything into --model_dir.
    SIGTERM or Ctrl-C stops it after the current step with a checkpoint (exit code 0 or 130)."""
    from t5lite import distributed
    from t5lite.train.loop import train as train_loop

    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    parse_gin(args.gin_file, args.gin_bindings + (["train.progress = False"] if args.quiet else []))
    train_loop(args.model_dir, allow_config_change=args.allow_config_change)
    return 0


def compile_step(args: argparse.Namespace) -> int:
    """Compiles the train step a gin config describes for a TPU topology, on any machine, and reports
    per-chip memory and FLOPs. Exits 1 if the step does not fit the chips' HBM."""
    from t5lite.train import aot
    from t5lite.train.spec import RunSpec

    parse_gin(args.gin_file, args.gin_bindings)
    report = aot.compile_train_step(args.topology, RunSpec.from_gin())
    print(report.summary())
    return 0 if report.fits else 1


def evaluate(args: argparse.Namespace) -> None:
    """Validation perplexity and every metric of the run's task (or --task's, or the --metrics named),
    printed and written to eval_<step>[_int8_<families>][_<task>][_<metrics>].json in --model_dir.
    With --compare RUN_A RUN_B instead: which run's greedy outputs a judge prefers, example by example."""
    import json

    from t5lite import data, inference

    if args.compare:
        return _compare(args)
    _refuse_flags(args, ("judge", "judge_dir", "output"), "go with --compare")
    if args.metrics is not None:
        data.check_metric_names(args.metrics)
    run = inference.load_run(args.model_dir, args.step, args.int8_weights, args.trust_run)
    results = inference.evaluate_run(
        run, args.batches, args.max_examples, task=args.task, metrics=args.metrics, seed=args.seed
    )
    out = pathlib.Path(args.model_dir) / _eval_file(run.step, args)
    out.write_text(json.dumps(results, indent=2))
    print(f"Step {run.step}:")
    for group, values in {"validation": results["validation"], **results["metrics"]}.items():
        for name, value in values.items():
            print(f"  {f'{group}/{name}':<40} {value:10.4f}")
    print(f"Wrote {out}")


def _eval_file(step: int, args: argparse.Namespace) -> str:
    """eval_<step>[_int8_<families>][_<task>][_<metrics>].json: each kind of evaluation of a step keeps its own file."""
    name = f"eval_{step}"
    if args.int8_weights:
        name += "_int8_" + "_".join(args.int8_weights)
    if args.task:
        name += f"_{args.task}"
    if args.metrics:
        name += "_" + "-".join(args.metrics)
    return name + ".json"


def _compare(args: argparse.Namespace) -> None:
    """`t5lite eval --compare`: judges both runs' outputs, prints a table and writes the judgments and ratings."""
    import json

    from t5lite import comparison, inference

    _refuse_flags(args, ("step", "int8_weights", "metrics"), "apply to --model_dir; --compare reads each run's latest")
    if args.judge and args.judge_dir:
        raise ValueError("Judge by a metric (--judge) or by a reward model (--judge_dir), not both.")
    names = comparison.run_names(*args.compare)
    judge = None if args.judge_dir else comparison.metric_judge(args.judge or "exact_match")
    runs = [inference.load_run(directory, trust=args.trust_run) for directory in args.compare]
    if args.judge_dir:
        reward_run = inference.load_run(args.judge_dir, trust=args.trust_run)
        judge = comparison.reward_judge(reward_run, pathlib.Path(args.judge_dir).name)
    result = comparison.compare_runs(
        *runs, judge, names=names, task=args.task, max_examples=args.max_examples, seed=args.seed
    )
    for key, directory in zip("ab", args.compare):
        result["runs"][key]["dir"] = str(pathlib.Path(directory).absolute())
    run_a, run_b = map(pathlib.Path, args.compare)
    out = pathlib.Path(args.output or run_a / f"compare_{run_a.name}_vs_{run_b.name}.json")
    out.write_text(json.dumps(result, indent=2))
    print(comparison.summary(result))
    print(f"Wrote {out}")


def _refuse_flags(args: argparse.Namespace, names: tuple[str, ...], why: str) -> None:
    """ValueError naming the given flags of `names`, which would otherwise be ignored."""
    given = [f"--{name}" for name in names if getattr(args, name)]
    if given:
        raise ValueError(f"{', '.join(given)} {why}.")


def generate(args: argparse.Namespace) -> None:
    """Generates from a trained run for prompts given as arguments or in a file (one per line)."""
    from t5lite import decoding, inference

    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += [line for line in pathlib.Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("No prompts: pass --prompt TEXT (repeatable) or --prompts_file FILE.")
    if not all(prompt.strip() for prompt in prompts):
        raise ValueError("A --prompt is empty; give each prompt some text.")
    if args.temperature == 0 and (args.top_k and not args.degeneration_penalty or args.top_p < 1):
        raise ValueError(
            "--top_k and --top_p filter what is sampled; set --temperature > 0 (0 is greedy), or "
            "--degeneration_penalty for contrastive search among --top_k candidates."
        )
    options = decoding.DecodingOptions(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        num_beams=args.num_beams,
        degeneration_penalty=args.degeneration_penalty,
        plausibility_alpha=args.plausibility_alpha,
        amateur_temperature=args.amateur_temperature,
        draft_tokens=args.draft_tokens,
    )
    run = inference.load_run(args.model_dir, args.step, args.int8_weights, args.trust_run)
    helpers = {
        role: inference.load_run(directory, trust=args.trust_run)
        for role, directory in (("draft", args.draft_dir), ("amateur", args.amateur_dir))
        if directory
    }
    texts = prompts if args.raw_prompt else inference.prompts_for(run, prompts)
    if texts != prompts:
        print(f"(prompts go through {run.task}'s instruction template; --raw_prompt gives them as they are)\n")
    for prompt, output in zip(prompts, inference.generate_texts(run, texts, options, seed=args.seed, **helpers)):
        print(f"> {prompt}\n{output}\n")


def quantize(args: argparse.Namespace) -> None:
    """Quantises a trained run for inference into --output, which `t5lite eval` and `t5lite generate`
    take as --model_dir. int8: round to nearest; llm_int8: int8 weights, outlier features in float at
    run time; gptq, awq: calibrated weight-only; smoothquant: W8A8 with outliers moved into weights."""
    from t5lite import inference
    from t5lite.models import build
    from t5lite.quantization.calibration import calibrate
    from t5lite.quantization.weights import CALIBRATED, quantize_weights, quantized_config

    output = pathlib.Path(args.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"--output {output} is not an empty directory; quantize writes into a new or empty one.")
    run = inference.load_run(args.checkpoint, args.step, trust=args.trust_run)
    recipe = dict(
        method=args.method,
        bits=args.bits,
        group_size=args.group_size,
        families=args.families,
        zero_points=args.zero_points,
        percentile=args.percentile,
        format=args.format,
        double_quant=args.double_quant,
    )
    quantized_config(run.model.config, **recipe)  # refuses a bad recipe before calibrating
    stats = None
    if args.method in CALIBRATED:
        print(f"Calibrating on {args.calibration_batches} batches of {run.task} ...")
        stats = calibrate(
            run.model.config, run.params, inference.calibration_batches(run, args.calibration_batches), args.families
        )
    config, params = quantize_weights(
        run.model.config, run.params, stats=stats, smoothquant_alpha=args.smoothquant_alpha, **recipe
    )
    run = dataclasses.replace(run, model=build(config), params=params)
    inference.save_quantized(run, args.checkpoint, output, {**recipe, "smoothquant_alpha": args.smoothquant_alpha})
    kind = "NF4 (4-bit NormalFloat)" if args.format == "nf4" else f"{args.method} ({args.bits}-bit)"
    print(f"Wrote the {kind} model of {args.checkpoint} (step {run.step}) to {output}")


def prune(args: argparse.Namespace) -> None:
    """Prunes a trained run into --output, which `t5lite eval` and `t5lite generate` take as --model_dir.
    magnitude: the smallest |w| of each kernel; 2:4: the 2 largest of every 4 consecutive inputs;
    wanda: per output, the lowest |w|·‖X‖ on calibration inputs; structured: whole attention heads
    and MLP channels removed (a smaller model)."""
    from t5lite import inference
    from t5lite.models import build, param_count
    from t5lite.pruning.weights import CALIBRATED, check_recipe, prune_weights, sparsity_report
    from t5lite.quantization.calibration import calibrate

    output = pathlib.Path(args.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"--output {output} is not an empty directory; prune writes into a new or empty one.")
    run = inference.load_run(args.checkpoint, args.step, trust=args.trust_run)
    recipe = dict(method=args.method, sparsity=args.sparsity, families=args.families)
    check_recipe(run.model.config, **recipe)  # refuses a bad recipe before calibrating
    stats = None
    if args.method in CALIBRATED:
        print(f"Calibrating on {args.calibration_batches} batches of {run.task} ...")
        batches = inference.calibration_batches(run, args.calibration_batches)
        stats = calibrate(run.model.config, run.params, batches, args.families)
    config, params = prune_weights(run.model.config, run.params, stats=stats, **recipe)
    report = {**sparsity_report(config, params, args.families), "params_before": param_count(run.model.config)}
    report["params"] = param_count(config)
    pruned = dataclasses.replace(run, model=build(config), params=params)
    inference.save_quantized(pruned, args.checkpoint, output, {**recipe, **report}, about=inference.PRUNING_FILE)
    print(
        f"Wrote the {args.method} pruned model of {args.checkpoint} (step {run.step}) to {output}: "
        f"{report['kernel_sparsity']:.1%} of the {'/'.join(args.families)} kernel weights are zero; "
        f"{report['params']:,} parameters (from {report['params_before']:,})"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t5lite", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("convert", help=convert.__doc__, description=convert.__doc__)
    p.add_argument("source", help="a t5lite run (--model_dir of train) or a Hugging Face save_pretrained directory")
    p.add_argument("dest", help="a new or empty directory")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype of an imported model (default: %(default)s)")
    p.add_argument("--step", type=int, default=None, help="the run's checkpoint to export (default: the latest)")
    _trust_argument(p)
    p.set_defaults(run=convert)
    _train_arguments(commands.add_parser("train", help=train.__doc__, description=train.__doc__))
    p = commands.add_parser("compile", help=compile_step.__doc__, description=compile_step.__doc__)
    _gin_arguments(p)
    p.add_argument("--topology", required=True, help="a TPU topology, e.g. v5e:2x2 or v5p:4x4x8")
    p.set_defaults(run=compile_step)
    _eval_arguments(commands.add_parser("eval", help=evaluate.__doc__, description=evaluate.__doc__))
    _generate_arguments(commands.add_parser("generate", help=generate.__doc__, description=generate.__doc__))
    _quantize_arguments(commands.add_parser("quantize", help=quantize.__doc__, description=quantize.__doc__))
    _prune_arguments(commands.add_parser("prune", help=prune.__doc__, description=prune.__doc__))
    p = commands.add_parser("vocab", help="Trains (or finds in the cache) a SentencePiece vocabulary.")
    from t5lite.data import add_vocab_arguments, vocab_command

    add_vocab_arguments(p)
    p.set_defaults(run=vocab_command)
    from t5lite.scaling.commands import add_sweep_commands

    add_sweep_commands(commands)
    return parser


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    runs = p.add_mutually_exclusive_group(required=True)
    runs.add_argument("--model_dir", help="the run to evaluate")
    runs.add_argument(
        "--compare",
        nargs=2,
        metavar=("RUN_A", "RUN_B"),
        help="decode the validation inputs of the runs' task with both runs and judge each example "
        "(--judge, --judge_dir); writes RUN_A/compare_<A>_vs_<B>.json or --output",
    )
    p.add_argument("--step", type=int, default=None, help="a checkpoint step (default: the latest)")
    p.add_argument("--batches", type=int, default=20, help="validation batches for perplexity")
    p.add_argument("--max_examples", type=int, default=64, help="examples per task decoded for its metrics")
    p.add_argument(
        "--task",
        help="a registered task to evaluate on instead of the run's (same vocabulary), e.g. t5lite_corpus_choice",
    )
    p.add_argument(
        "--metrics",
        type=_families,
        default=None,
        help="comma-separated metrics to run instead of the task's: exact_match, bleu, rouge, squad, "
        "classification, pass_at_k (samples), rank_accuracy (ranks a multiple-choice task's choices)",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed of metrics that sample (default: %(default)s)")
    p.add_argument("--judge", help="--compare: the metric that scores each output (default: exact_match)")
    p.add_argument("--judge_dir", help="--compare: a reward model run (reward head) that scores each (input, output)")
    p.add_argument("--output", help="--compare: the JSON file to write")
    _int8_weights_argument(p)
    _trust_argument(p)
    p.set_defaults(run=evaluate)


def _quantize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a training run's --model_dir")
    p.add_argument("--step", type=int, default=None, help="a checkpoint step (default: the latest)")
    p.add_argument("--method", required=True, choices=["int8", "llm_int8", "gptq", "awq", "smoothquant"])
    p.add_argument("--bits", type=int, default=8, choices=[8, 4])
    p.add_argument("--group_size", type=int, default=None, help="a scale per this many inputs (default: per output)")
    p.add_argument("--zero_points", action="store_true", help="asymmetric ranges (weight-only methods)")
    p.add_argument(
        "--format",
        default="int",
        choices=["int", "nf4"],
        help="nf4: QLoRA's 4-bit NormalFloat levels (method int8, --bits=4, a --group_size)",
    )
    p.add_argument("--double_quant", action="store_true", help="the group scales in int8 (QLoRA's double quantisation)")
    p.add_argument("--families", type=_families, default=["attention", "mlp"], help="comma-separated: attention,mlp")
    p.add_argument("--calibration_batches", type=int, default=8, help="training batches for gptq, awq, smoothquant")
    p.add_argument(
        "--percentile",
        type=float,
        default=None,
        help="smoothquant: each input's range is this percentile of |x| (e.g. 99.9) instead of its abs-max",
    )
    p.add_argument("--smoothquant_alpha", type=float, default=0.5, help="share of the activation range moved")
    p.add_argument("--output", required=True, help="a new or empty directory")
    _trust_argument(p)
    p.set_defaults(run=quantize)


def _prune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a training run's --model_dir")
    p.add_argument("--step", type=int, default=None, help="a checkpoint step (default: the latest)")
    p.add_argument("--method", required=True, choices=["magnitude", "2:4", "wanda", "structured"])
    p.add_argument(
        "--sparsity",
        type=float,
        required=True,
        help="share of the weights (structured: of the heads and MLP channels) removed, in (0, 1); 2:4 is 0.5",
    )
    p.add_argument("--families", type=_families, default=["attention", "mlp"], help="comma-separated: attention,mlp")
    p.add_argument("--calibration_batches", type=int, default=8, help="training batches for wanda and structured")
    p.add_argument("--output", required=True, help="a new or empty directory")
    _trust_argument(p)
    p.set_defaults(run=prune)


def _generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_dir", required=True, help="a run: train's --model_dir, or convert's or quantize's output")
    p.add_argument("--step", type=int, default=None, help="a checkpoint step (default: the latest)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; may repeat")
    p.add_argument("--prompts_file", help="a file of prompts, one per line")
    p.add_argument(
        "--raw_prompt",
        action="store_true",
        help="give prompts as they are, not through the instruction template the run was trained with",
    )
    p.add_argument("--max_new_tokens", type=int, default=32, help="tokens to generate at most (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default); > 0 samples")
    p.add_argument(
        "--top_k", type=int, default=0, help="sample from the k likeliest tokens (0: all; needs temperature)"
    )
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (1: off; needs temperature)")
    p.add_argument("--num_beams", type=int, default=None, help="beam search with this many beams")
    p.add_argument(
        "--degeneration_penalty",
        type=float,
        default=0.0,
        help="contrastive search's alpha (e.g. 0.6) among the --top_k likeliest tokens (0: off)",
    )
    p.add_argument(
        "--amateur_dir", help="contrastive decoding against this weaker run (same vocabulary): its --model_dir"
    )
    p.add_argument(
        "--plausibility_alpha",
        type=float,
        default=0.1,
        help="contrastive decoding keeps tokens at least this fraction as likely as the top one (default: %(default)s)",
    )
    p.add_argument(
        "--amateur_temperature", type=float, default=1.0, help="the amateur's temperature (default: %(default)s)"
    )
    p.add_argument(
        "--draft_dir", help="speculative decoding with this smaller run (same vocabulary) as the draft: its --model_dir"
    )
    p.add_argument(
        "--draft_tokens", type=int, default=4, help="tokens the draft proposes per round (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    _int8_weights_argument(p)
    _trust_argument(p)
    p.set_defaults(run=generate)


def _train_arguments(p: argparse.ArgumentParser) -> None:
    _gin_arguments(p)
    p.add_argument("--model_dir", required=True, help="where checkpoints, metrics and the config go")
    p.add_argument("--coordinator_address", help="host:port of process 0, for a multi-process run set by hand")
    p.add_argument("--num_processes", type=int, help="processes in a multi-process run set by hand")
    p.add_argument("--process_id", type=int, help="this process's index in a multi-process run set by hand")
    p.add_argument(
        "--allow_config_change",
        action="store_true",
        help="resume even though the gin settings differ from the run's (optimizer, schedule, ...)",
    )
    p.add_argument(
        "--quiet", action="store_true", help="no progress bar or console lines (metrics files are written as always)"
    )
    p.set_defaults(run=train)


def _gin_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gin_file",
        action="append",
        default=[],
        help="a gin file (e.g. runs/t5_tiny_span_corruption.gin); may repeat. Any binding is set or overridden "
        "with --gin.NAME=VALUE, e.g. --gin.train.num_steps=100; VALUE is a Python literal, so quote "
        "strings: --gin.train.init_from=\"'/path/to/run'\"",
    )
    parser.set_defaults(gin_bindings=[])


def _trust_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust_run",
        action="store_true",
        help="open a run whose config.gin imports or calls code from outside t5lite (refused by default)",
    )


def _families(text: str) -> list[str]:
    return [family for family in text.split(",") if family]


def _int8_weights_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--int8_weights",
        type=_families,
        default=[],
        help="comma-separated dense families (attention,mlp) to run with int8 weights",
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Like argparse, but `--gin.NAME=VALUE` flags become gin bindings `NAME = VALUE` (T5X style)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    bindings = [a[len("--gin.") :].replace("=", " = ", 1) for a in argv if a.startswith("--gin.")]
    args = build_parser().parse_args([a for a in argv if not a.startswith("--gin.")])
    args.gin_bindings = bindings
    return args


def quiet_start() -> None:
    """Keeps start-up notices that are not errors off the console, so that an error line means one:
    libtpu (installed with the test extra) logs an error where there is no TPU, so a machine without
    accelerators runs on the CPU platform alone; TensorFlow's C++ side prints notices on import."""
    from t5lite import hardware

    if "JAX_PLATFORMS" not in os.environ and hardware.no_accelerator_here():
        os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with hardware.native_stderr_silenced():
        import tensorflow  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    from t5lite.train.preemption import Interrupted

    quiet_start()
    args = parse_args(argv)
    try:
        return args.run(args) or 0
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as error:
        print(f"t5lite {args.command}: error: {error}", file=sys.stderr)
        return 2
    except Interrupted as stop:  # a run (or a sweep's) stopped by SIGTERM / Ctrl-C, its checkpoint saved
        print(stop.message, file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print("Aborted; a run resumes from its last complete checkpoint.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
