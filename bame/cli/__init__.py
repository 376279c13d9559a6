"""The ``bame`` command line: one module per subcommand, each with ``add_parser`` and ``run``."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

import bame
from bame.errors import BameError

#: Subcommand modules, in the order ``bame --help`` lists them.
COMMANDS = ("train", "sweep", "eval", "demo", "info", "flops", "report", "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bame", description="Efficient N:M sparse training for PyTorch.")
    parser.add_argument("--version", action="version", version=f"bame {bame.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"bame.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"bame.cli.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``bame`` and ``python -m bame``; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="bame: %(message)s", stream=sys.stderr)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for ``train --nproc`` to re-run the command
    if not getattr(args, "run", None):
        parser.print_help()
        return 0
    try:
        return int(args.run(args) or 0)
    except BameError as err:
        # Under DDP every rank reaches the same verdict (the engine makes sure): rank 0 says it once.
        if os.environ.get("RANK", "0") == "0":
            print(f"bame: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("bame: interrupted", file=sys.stderr)
        return 130
