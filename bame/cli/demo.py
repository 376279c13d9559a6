"""``bame demo``: the main job on the embedded default dataset.

Trains a dense baseline, SR-STE and BAME at one N:M pattern, prints a comparison table (last-epoch
top-1, training-FLOPs ratio, wall time) and writes a plot. On the bundled digits it needs no download.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train dense, SR-STE and BAME on a bundled dataset and compare",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("--dataset", default="digits", choices=demo_datasets(),
                   help="a data set with defaults of its own (batch size, epochs, delta_t: bame train uses the "
                   "same ones) (default: digits)")
    p.add_argument("--nm", default="1:16", metavar="N:M", help="N:M pattern (default: 1:16)")
    p.add_argument("--methods", default="dense,sr_ste,bame", metavar="LIST",
                   help="comma-separated methods to compare (default: dense,sr_ste,bame)")
    p.add_argument("--epochs", type=int, metavar="N", help="train this many epochs (default: the data set's)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of every run (default: 0)")
    p.add_argument("--data-dir", metavar="DIR", help="where the dataset files are (fashion-mnist)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), metavar="DIR",
                   help="where the runs go (default: runs/demo)")
    p.set_defaults(run=run)


def demo_datasets() -> list[str]:
    """The data sets a demo runs on: those whose spec carries training defaults (small enough for a CPU)."""
    from bame import data

    return [name for name, spec in data.available().items() if spec.defaults]


def run(args: argparse.Namespace) -> int:
    import torch

    from bame import config, engine, methods, report

    # These models are tiny: one intra-op thread is as fast as two on an idle machine and many times
    # faster on a busy one, where spinning OpenMP threads fight over the cores.
    torch.set_num_threads(1)
    out = args.out / args.dataset
    runs = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        # The data set's defaults (bame.data.DatasetSpec.defaults), as bame train applies them.
        given = {"dataset": args.dataset, "method": method, "nm": args.nm, "seed": args.seed, "data_dir": args.data_dir}
        cfg = config.build_run(given, {"epochs": args.epochs} if args.epochs else {})
        pattern = args.nm if methods.get(method).uses_masks else "dense"
        print(f"== {method} ({pattern}) on {args.dataset} ==", flush=True)
        engine.fit(cfg, out / method, force=True)
        runs.append(report.read_run(out / method))
    print()
    print("\n".join(report.runs_table(runs)))
    figure = report.curves_figure(runs, out / "demo.png", title=f"{args.dataset}, N:M {args.nm}")
    print(f"\nplot: {figure}")
    return 0
