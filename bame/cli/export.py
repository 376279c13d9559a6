"""``bame export``: N:M weights as plain safetensors or in compressed N:M form."""

from __future__ import annotations

import argparse
from pathlib import Path

from bame.nm import GROUP_AXES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export N:M weights (dense or compressed) of a run or a checkpoint",
                       description="Write N:M weights as safetensors: 'dense' holds plain N:M weights; 'compressed' "
                       "holds kept values + in-block indices (bame.export.load_compressed). SOURCE is a bame train "
                       "run directory, a checkpoint saved from your own loop as torch.save({'model': "
                       "model.state_dict(), 'sparsifier': sparsifier.state_dict()}, path) (or a plain state_dict, "
                       "whose N:M is read from its zeros), a Lightning .ckpt or a transformers checkpoint-N folder "
                       "written with bame's BameCallback.")
    p.add_argument("source", type=Path, metavar="SOURCE", help="run directory, checkpoint file or checkpoint-N folder")
    p.add_argument("--format", choices=("dense", "compressed"), default="compressed")
    p.add_argument("--out", type=Path, help="output file (default: FOLDER/model.FORMAT.safetensors for a folder, "
                   "CHECKPOINT.FORMAT.safetensors beside a file)")
    p.add_argument("--nm", help="N:M to compress with (default: the sparsifier state's, else inferred from the zeros)")
    p.add_argument("--group-axis", choices=GROUP_AXES, help="grouping axis of --nm (default cin), or the only one "
                   "the inference from zeros considers")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from bame.export import export

    result = export(args.source, args.out, format=args.format, nm=args.nm, group_axis=args.group_axis)
    print(f"{result['path']}: {result['bytes'] / 1e6:.3f} MB, {result['ratio']:.3f}x the dense weights "
          f"({result['dense_tensor_bytes'] / 1e6:.3f} MB)")
    return 0
