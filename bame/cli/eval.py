"""``bame eval``: evaluate a run directory's (or a checkpoint's) model on the test split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bame.errors import CheckpointError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a trained run", description="Evaluate a run on its test split.")
    p.add_argument("path", type=Path, help="a run directory or its checkpoint.pt")
    p.add_argument("--data-dir", help="where the dataset files are")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from bame import checkpoint, config, distributed, engine

    path = args.path / checkpoint.CHECKPOINT if args.path.is_dir() else args.path
    if not path.exists():
        raise CheckpointError(f"{args.path}: no run directory or checkpoint there")
    state = checkpoint.load(path)
    if not isinstance(state.get("config"), dict):
        raise CheckpointError(f"checkpoint {path} holds no run config")
    saved = dict(state["config"])
    if args.data_dir:
        saved["data_dir"] = args.data_dir
    saved["device"] = args.device
    cfg = config.build(saved)
    info = distributed.init(cfg.device)
    run_ = engine.build(cfg, path.parent, info)
    engine.restore(run_, state)
    loss, top1 = engine.evaluate(run_.model, run_.test_loader, info, cfg.amp)
    result = {"path": str(args.path), "test_loss": loss, "top1": top1, "step": run_.sparsifier.step_count}
    print(json.dumps(result) if args.json else f"{args.path}: test top-1 {top1:.2f}%  loss {loss:.4f}  "
          f"(step {run_.sparsifier.step_count})")
    return 0
