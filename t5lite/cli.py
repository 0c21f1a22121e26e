"""`t5lite <command>`: the command-line entry point."""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

from t5lite import config


def convert(args: argparse.Namespace) -> None:
    """Hugging Face `save_pretrained` directory <-> t5lite checkpoint; the direction is read off SOURCE."""
    from t5lite.interop import hf
    from t5lite.train import checkpoint

    source, dest = pathlib.Path(args.source), pathlib.Path(args.dest)
    if dest.exists() and any(dest.iterdir()):
        raise ValueError(f"Destination {dest} is not empty; convert writes into a new or empty directory.")
    if checkpoint.is_checkpoint(source):
        config, params = checkpoint.load_params(source)
        from t5lite.models import build
        hf.save_pretrained(build(config), params, dest)
        print(f"Wrote a Hugging Face model ({config.architecture}) to {dest}")
    elif (source / "config.json").is_file():
        model, params = hf.load_pretrained(source, dtype=args.dtype)
        checkpoint.save_params(dest, model.config, params)
        print(f"Wrote a t5lite checkpoint ({model.config.architecture}) to {dest}")
    else:
        raise FileNotFoundError(f"{source} is neither a t5lite checkpoint ({checkpoint.CONFIG_FILE}) nor a "
                                f"Hugging Face save_pretrained directory (config.json).")


def parse_gin(files: list[str], bindings: list[str]) -> None:
    """Registers t5lite's configurables, then parses gin files and `--gin.NAME=VALUE` bindings."""
    import t5lite.data  # noqa: F401  (registers tasks and data configurables)
    import t5lite.train.loop  # noqa: F401  (registers train, optimizer, learning_rate_schedule)

    config.parse_gin(files, bindings)


def train(args: argparse.Namespace) -> None:
    """Trains (or resumes) the model a gin config describes, writing everything into --model_dir."""
    from t5lite.train.loop import train as train_loop

    parse_gin(args.gin_file, args.gin_bindings)
    train_loop(args.model_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t5lite", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("convert", help=convert.__doc__, description=convert.__doc__)
    p.add_argument("source", help="a t5lite checkpoint or a Hugging Face save_pretrained directory")
    p.add_argument("dest", help="a new or empty directory")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype recorded in an imported t5lite config")
    p.set_defaults(run=convert)
    p = commands.add_parser("train", help=train.__doc__, description=train.__doc__)
    _gin_arguments(p)
    p.add_argument("--model_dir", required=True, help="where checkpoints, metrics and the config go")
    p.set_defaults(run=train)
    return parser


def _gin_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gin_file", action="append", default=[], help="a gin file; may repeat")
    parser.set_defaults(gin_bindings=[])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Like argparse, but `--gin.NAME=VALUE` flags become gin bindings `NAME = VALUE` (T5X style)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    bindings = [a[len("--gin."):].replace("=", " = ", 1) for a in argv if a.startswith("--gin.")]
    args = build_parser().parse_args([a for a in argv if not a.startswith("--gin.")])
    args.gin_bindings = bindings
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    args = parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as error:
        print(f"t5lite {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
