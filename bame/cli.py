"""The ``bame`` command line."""

from __future__ import annotations

import argparse
import sys

import bame


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bame", description="Efficient N:M sparse training for PyTorch.")
    parser.add_argument("--version", action="version", version=f"bame {bame.__version__}")
    parser.parse_args(argv)
    parser.print_help(sys.stdout)
    return 0
