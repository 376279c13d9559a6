"""``bame demo``: the main job on the embedded default dataset.

Trains a dense baseline, SR-STE and BAME at one N:M pattern, prints a comparison table (last-epoch
top-1, training-FLOPs ratio, wall time) and writes a plot. On the bundled digits it needs no download.
"""

from __future__ import annotations

import argparse
from pathlib import Path

#: Per dataset: epochs, batch, lr, and BAME's delta_t scaled so that its evolution phase sees about as
#: many mask updates (about 20) as a short run allows; the paper's 100 assumes ~58k iterations.
PRESETS = {
    "digits": {"epochs": 30, "batch_size": 64, "lr": 0.1, "weight_decay": 5e-4, "delta_t": 10},
    "fashion-mnist": {"epochs": 6, "batch_size": 128, "lr": 0.1, "weight_decay": 5e-4, "delta_t": 50},
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train dense, SR-STE and BAME on a bundled dataset and compare",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("--dataset", default="digits", choices=sorted(PRESETS))
    p.add_argument("--nm", default="1:16", help="N:M pattern (default 1:16)")
    p.add_argument("--methods", default="dense,sr_ste,bame", help="comma-separated methods to compare")
    p.add_argument("--epochs", type=int, help="override the preset's epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", help="where the dataset files are (fashion-mnist)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="where the runs go (default runs/demo)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from bame import config, engine, methods, report

    # These models are tiny: one intra-op thread is as fast as two on an idle machine and many times
    # faster on a busy one, where spinning OpenMP threads fight over the cores.
    torch.set_num_threads(1)
    preset = dict(PRESETS[args.dataset])
    delta_t = preset.pop("delta_t")
    if args.epochs:
        preset["epochs"] = args.epochs
    out = args.out / args.dataset
    runs = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        fields = {f.name for f in dataclasses.fields(methods.get(method).Options)}
        options = {"delta_t": delta_t} if "delta_t" in fields else {}
        cfg = config.build({**preset, "dataset": args.dataset, "method": method, "nm": args.nm, "seed": args.seed,
                            "data_dir": args.data_dir, "method_options": options})
        print(f"== {method} ({args.nm if method != 'dense' else 'dense'}) on {args.dataset} ==", flush=True)
        engine.fit(cfg, out / method, force=True)
        runs.append(report.read_run(out / method))
    print()
    print("\n".join(report.runs_table(runs)))
    figure = report.curves_figure(runs, out / "demo.png", title=f"{args.dataset}, N:M {args.nm}")
    print(f"\nplot: {figure}")
    return 0
