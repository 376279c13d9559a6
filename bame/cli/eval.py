"""``bame eval``: evaluate a run directory's (or a checkpoint's, or its weights') model on the test split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bame.errors import CheckpointError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a trained run", description="Evaluate a run on its test split.")
    p.add_argument("path", type=Path, metavar="PATH", help="a run directory, its checkpoint.pt, or a .safetensors "
                   "file of its weights (model.safetensors or a bame export) beside its config.yaml")
    p.add_argument("--data-dir", metavar="DIR", help="where the dataset files are (default: the run's)")
    p.add_argument("--device", default="auto", metavar="DEVICE", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.path.suffix == ".safetensors" and args.path.is_file():
        top1, loss, step = _eval_weights(args)
    else:
        top1, loss, step = _eval_checkpoint(args)
    result = {"path": str(args.path), "test_loss": loss, "top1": top1, "step": step}
    at = f"  (step {step})" if step is not None else ""
    print(json.dumps(result) if args.json else f"{args.path}: test top-1 {top1:.2f}%  loss {loss:.4f}{at}")
    return 0


def _config(saved: dict[str, Any], args: argparse.Namespace) -> Any:
    from bame import config

    saved = dict(saved)
    if args.data_dir:
        saved["data_dir"] = args.data_dir
    saved["device"] = args.device
    return config.build(saved)


def _eval_checkpoint(args: argparse.Namespace) -> tuple[float, float, int]:
    """A run directory or its ``checkpoint.pt``: the model with its sparsifier, as training evaluated it."""
    from bame import checkpoint, distributed, engine

    path = args.path / checkpoint.CHECKPOINT if args.path.is_dir() else args.path
    if not path.exists():
        raise CheckpointError(f"{args.path}: no run directory or checkpoint there")
    state = checkpoint.load(path)
    if not isinstance(state.get("config"), dict):
        raise CheckpointError(f"checkpoint {path} holds no run config")
    cfg = _config(state["config"], args)
    info = distributed.init(cfg.device)
    run_ = engine.build(cfg, path.parent, info)
    engine.restore(run_, state)
    loss, top1 = engine.evaluate(run_.model, run_.test_loader, info, cfg.amp)
    return top1, loss, run_.sparsifier.step_count


def _eval_weights(args: argparse.Namespace) -> tuple[float, float, int | None]:
    """A ``.safetensors`` file of a run's final weights (masks applied) or a bame export of them: a plain model
    rebuilt from the ``config.yaml`` beside it, which says which model and data set."""
    from bame import config, data, distributed, engine

    run_dir = args.path.parent
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{args.path}: no config.yaml beside it to rebuild the model and its data; pass "
                              "the run directory or its checkpoint.pt")
    cfg = _config(config.load_recipe(run_dir / "config.yaml"), args)
    info = distributed.init(cfg.device)
    model = engine.create_model(cfg)
    _load_weights(model, args.path)
    model.to(info.device)
    loader = data.build_loader(cfg.dataset, "test", batch_size=cfg.batch_size, data_dir=cfg.data_dir,
                               download=cfg.download, seed=cfg.seed, workers=cfg.workers, device=info.device)
    loss, top1 = engine.evaluate(model, loader, info, cfg.amp)
    summary = run_dir / "summary.json"
    step = json.loads(summary.read_text()).get("steps") if summary.is_file() else None
    return top1, loss, step


def _load_weights(model: Any, path: Path) -> None:
    """Load ``model.safetensors`` (weights and ``NAME.mask`` entries) or a bame export into a plain model."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from bame.export import read_export

    try:
        with safe_open(str(path), framework="pt") as f:
            exported = (f.metadata() or {}).get("format", "").startswith("bame-")
        tensors = read_export(path)[1] if exported else load_file(path)
    except CheckpointError:
        raise
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path} is not a safetensors file: {str(err).splitlines()[0]}") from None
    weights = {k: v for k, v in tensors.items() if not k.endswith(".mask")}  # the masks are applied already
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        details = " ".join(str(err).split())
        raise CheckpointError(f"{path} does not fit the model of its config.yaml: {details[:300]}") from None
