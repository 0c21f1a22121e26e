"""`t5lite <command>`: the command-line entry point."""

from __future__ import annotations

import argparse
import pathlib
import sys


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t5lite", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("convert", help=convert.__doc__, description=convert.__doc__)
    p.add_argument("source", help="a t5lite checkpoint or a Hugging Face save_pretrained directory")
    p.add_argument("dest", help="a new or empty directory")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype recorded in an imported t5lite config")
    p.set_defaults(run=convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"t5lite {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
