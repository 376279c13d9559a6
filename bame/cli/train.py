"""``bame train``: train one run into a run directory (also under torchrun)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from bame.cli.options import add_config_flags, add_method_flags, resolve
from bame.config import TrainConfig
from bame.errors import ConfigError


def default_out(cfg: TrainConfig) -> Path:
    from bame import data

    model = cfg.model or data.get_spec(cfg.dataset).default_model
    return Path("runs") / f"{cfg.dataset}-{model}-{cfg.method}-{cfg.nm.replace(':', '_')}-s{cfg.seed}"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an N:M sparse network",
                       description="Train an N:M sparse network; writes config.yaml, metrics.jsonl, "
                       "summary.json, checkpoint.pt and model.safetensors into --out.")
    p.add_argument("--config", help="a YAML recipe (see recipes/); flags given here override it")
    p.add_argument("--out", type=Path, help="run directory (default: runs/DATASET-MODEL-METHOD-N_M-sSEED)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--force", action="store_true", help="overwrite a run already in --out")
    p.add_argument("--nproc", type=int, default=1, help="launch K processes with torchrun (DDP)")
    add_config_flags(p)
    add_method_flags(p)
    p.set_defaults(run=run)


def _launch(args: argparse.Namespace, argv: list[str]) -> int:
    """``--nproc K``: re-run this command under torchrun with K processes."""
    if args.nproc < 1:
        raise ConfigError("--nproc must be at least 1")
    rest, skip = [], False
    for i, token in enumerate(argv):
        if skip:
            skip = False
            continue
        if token == "--nproc":
            skip = True
            continue
        if token.startswith("--nproc="):
            continue
        rest.append(token)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "-m", "bame", *rest]
    return subprocess.call(cmd)


def run(args: argparse.Namespace) -> int:
    cfg = resolve(args)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        argv = sys.argv[1:]
        if "--out" not in " ".join(argv):
            argv += ["--out", str(default_out(cfg))]
        return _launch(args, argv)
    from bame.engine import fit

    out = args.out or default_out(cfg)
    summary = fit(cfg, out, resume=args.resume, force=args.force)
    if summary.get("top1") is not None and int(os.environ.get("RANK", "0")) == 0:
        print(f"done: top-1 {summary['top1']:.2f}% (best {summary['best_top1']:.2f}%), "
              f"training FLOPs {summary['train_flops_ratio']:.3f}x dense, {summary['wall_time_s']:.1f}s -> {out}")
    return 0
