"""``bame export``: a run's weights as plain N:M safetensors or in compressed N:M form."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a run's weights (dense or compressed N:M)",
                       description="Write a run's final weights as safetensors: 'dense' holds plain N:M "
                       "weights; 'compressed' holds kept values + in-block indices (bame.load_compressed).")
    p.add_argument("run_dir", type=Path, help="a finished run directory")
    p.add_argument("--format", choices=("dense", "compressed"), default="compressed")
    p.add_argument("--out", type=Path, help="output file (default: RUN_DIR/model.FORMAT.safetensors)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from bame.export import export

    result = export(args.run_dir, args.format, args.out)
    print(f"{result['path']}: {result['bytes'] / 1e6:.3f} MB, {result['ratio']:.3f}x the dense weights "
          f"({result['dense_tensor_bytes'] / 1e6:.3f} MB)")
    return 0
