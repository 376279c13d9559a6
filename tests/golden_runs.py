"""Small fixed-seed runs of every method whose results are pinned in ``tests/data/golden.json``.

The file was written by ``python tests/golden_runs.py --write`` before the method contract was reshaped
(one plan per iteration, one mask-commit path); ``tests/test_golden.py`` runs the same runs and requires
identical results, so any change of behaviour in the core shows up as a named difference.

Each run records, bit for bit: the per-epoch losses, the sha256 of every final mask and of the final
weights, and the training-FLOPs ledger (totals and per phase and product, both charging rules).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "data" / "golden.json"

#: Options that put every phase of each method inside a 2-epoch digits run of 22 steps per epoch.
ENGINE_RUNS: dict[str, dict[str, Any]] = {
    "dense": {},
    "static": {},
    "asp": {},
    "sr_ste": {},
    "rigl_nm": {"delta_t": 4},
    "lma": {"delta_t": 4},
    "bame": {"delta_t": 4},
    "bame_bi": {"delta_t": 4},
    "bi_mask": {"perm_interval": 5},
    "lbc": {},
    "maxq": {},
}
#: Extra engine runs: other optimizers and options of the BAME family.
VARIANTS: dict[str, dict[str, Any]] = {
    "bame-adamw": {"method": "bame", "optimizer": "adamw", "lr": 0.003, "method_options": {"delta_t": 4}},
    "bame-nesterov-sparse-gradual": {"method": "bame", "nesterov": True,
                                     "method_options": {"delta_t": 3, "gradual_grad": "sparse", "freeze": "or"}},
    "rigl_nm-every-block": {"method": "rigl_nm", "method_options": {"delta_t": 4, "mode": "every_block"}},
    "maxq-per-block-iteration": {"method": "maxq", "method_options": {"incremental": "per_block",
                                                                     "granularity": "iteration"}},
    "lbc-iteration": {"method": "lbc", "method_options": {"granularity": "iteration", "t_f": 0.8}},
}


def digest(tensor: torch.Tensor) -> str:
    t = tensor.detach().cpu().contiguous()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool
                          else t.numpy().tobytes()).hexdigest()[:16]


def engine_run(name: str, overrides: dict[str, Any], root: Path) -> dict[str, Any]:
    from bame import config
    from bame.engine import fit

    base = {"dataset": "digits", "width": 0.5, "nm": "1:4", "epochs": 2, "batch_size": 64, "seed": 7,
            "device": "cpu"}
    cfg = config.build({**base, **overrides})
    out = root / name
    summary = fit(cfg, out)
    from safetensors.torch import load_file

    tensors = load_file(out / "model.safetensors")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = ("train_flops", "train_flops_hw", "dense_train_flops", "test_flops_ratio")
    return {
        "losses": [[m["train_loss"], m["test_loss"]] for m in metrics],
        "masks": {k: digest(v) for k, v in sorted(tensors.items()) if k.endswith(".mask")},
        "weights": digest(torch.cat([v.flatten().float() for k, v in sorted(tensors.items())
                                     if not k.endswith(".mask")])),
        "flops": {k: summary[k] for k in keys},
        "flops_by_phase": summary["flops_by_phase"],
        "stats": {row["name"]: {k: row.get(k) for k in ("updates", "total_flips", "last_flips")}
                  for row in summary["layers"] if row["sparse"]},
    }


class Mixer(nn.Module):
    """A tiny transformer-style block: every Linear is sparse-eligible (widths divide by 16)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.fc2(F.gelu(self.fc1(self.norm(h))))
        return self.head(h.mean(dim=1))


def loop_run(method: str, optimizer: str, steps: int = 40) -> dict[str, Any]:
    """A user's own loop (no engine): every step's loss, final masks and weights."""
    import bame

    torch.manual_seed(3)
    model = Mixer()
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    options = {"delta_t": 5} if method in ("bame", "lma", "rigl_nm", "bame_bi") else {}
    sp = bame.sparsify(model, opt, method, "2:8", total_steps=steps, verbose=False, **options)
    losses = []
    for t in range(steps):
        gen = torch.Generator().manual_seed(100 + t)
        x, y = torch.randn(8, 5, 16, generator=gen), torch.randint(0, 4, (8,), generator=gen)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {"losses": losses, "masks": {k: digest(v) for k, v in sp.masks().items()},
            "weights": digest(torch.cat([p.detach().flatten() for p in model.parameters()]))}


LOOP_RUNS = {f"loop-{m}-{o}": (m, o) for m in ("bame", "sr_ste", "static", "rigl_nm", "bame_bi")
             for o in ("sgd", "adamw")}


def all_runs(names: list[str] | None = None) -> dict[str, Any]:
    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, options in ENGINE_RUNS.items():
            if names is None or name in names:
                out[name] = engine_run(name, {"method": name, "method_options": options}, Path(tmp))
        for name, overrides in VARIANTS.items():
            if names is None or name in names:
                out[name] = engine_run(name, overrides, Path(tmp))
    for name, (method, optimizer) in LOOP_RUNS.items():
        if names is None or name in names:
            out[name] = loop_run(method, optimizer)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"write {GOLDEN.relative_to(ROOT)}")
    args = parser.parse_args()
    runs = all_runs()
    text = json.dumps(runs, indent=1, sort_keys=True)
    if args.write:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text + "\n")
    else:
        sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
