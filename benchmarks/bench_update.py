"""The cost of one BAME mask update (LMA + OBF) over every sparse layer of ResNet-50, against one
ResNet-50 training step.

For each N:M pattern, a real BAME sparsifier is attached to a copy of torchvision's ResNet-50 (the
default layer policy: every conv but the stem, fc dense; about 23.5 M sparse weights) and every sparse
weight gets a fixed random dense gradient. Two candidates per pattern:

* ``pure``: the pure functions, exactly as ``Sparsifier.evolve`` calls them, per layer:
  ``bame.nm.to_blocks`` of W, G and B, ``bame.lma.propose``, ``bame.obf.restrict`` (nothing written back;
  the time of each part is also reported);
* ``method``: ``Sparsifier.evolve`` itself on the real sparsifier, which also writes the mask,
  zeroes changed weights and their momentum, and records statistics.

The dense training step (forward, backward, SGD step) of ResNet-50 at ``--step-batch`` 224x224 images is
one more candidate of the same round-robin, so the share ``update / step`` is a ratio measured within one
process, interleaved, as medians. Amortised over delta_t = 100 steps it is ``update / (100 * step)``.

    python benchmarks/bench_update.py --repeats 5 --out results/bench_update.json
    python benchmarks/bench_update.py --quick --out /tmp/bench_update.json
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from collections import defaultdict
from typing import Any

import common
import torch
import torch.nn.functional as F

import bame
from bame import lma, models, obf
from bame.nm import to_blocks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(ap, "results/bench_update.json", default_repeats=5)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--patterns", default="1:16,2:4,1:4", help="comma-separated N:M patterns")
    ap.add_argument("--model", default="resnet50", help="an ImageNet model of bame.models")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--step-batch", type=int, default=32, help="batch of the timed training step")
    args = ap.parse_args(argv)
    args.methods = args.methods or "bame"
    return args


class Update:
    """One pattern's sparsifier and the two update candidates."""

    def __init__(self, base: torch.nn.Module, method: str, nm: str) -> None:
        self.model = copy.deepcopy(base)
        opt = torch.optim.SGD(self.model.parameters(), lr=common.LR, momentum=common.MOMENTUM,
                              weight_decay=common.WEIGHT_DECAY)
        self.sp = bame.sparsify(self.model, opt, method, nm, total_steps=common.TOTAL_STEPS, verbose=False,
                                **common.harness_for(method).options)
        g = torch.Generator().manual_seed(2)
        grads = [torch.randn(layer.shape, generator=g) * 1e-2 for layer in self.sp.layers]
        for layer, grad in zip(self.sp.layers, grads):
            layer.weight.grad = grad.clone()
        opt.step()  # t = 0 is an update iteration: creates the momentum buffers, as in training
        for layer, grad in zip(self.sp.layers, grads):
            layer.weight.grad = grad  # dense G again (the step masked it in place)
        self.sp.pop_events()
        self.t = common.harness_for(method).update_t or common.DELTA_T
        self.parts: dict[str, list[float]] = defaultdict(list)  # per call of pure(): ms of each part

    def weights(self) -> int:
        return sum(layer.mask.numel() for layer in self.sp.layers)

    def pure(self) -> None:
        """LMA + OBF via the pure functions, as ``Sparsifier.evolve`` calls them."""
        method, parts = self.sp.method, {"blocks": 0.0, "lma": 0.0, "obf": 0.0}
        o = method.options
        for layer in self.sp.layers:
            t0 = time.perf_counter()
            w = to_blocks(layer.weight.detach(), layer.m, layer.group_axis)  # (K, M)
            g = to_blocks(layer.weight.grad, layer.m, layer.group_axis)  # (K, M)
            old = to_blocks(layer.mask, layer.m, layer.group_axis)  # (K, M)
            t1 = time.perf_counter()
            proposal = lma.propose(w, g, old, method.n, self.sp.lr_of(layer.weight))
            t2 = time.perf_counter()
            obf.restrict(old, proposal, w, layer.state("osc"), o.gamma, o.alpha, o.beta, o.freeze)
            t3 = time.perf_counter()
            parts["blocks"] += t1 - t0
            parts["lma"] += t2 - t1
            parts["obf"] += t3 - t2
        for k, v in parts.items():
            self.parts[k].append(v * 1e3)

    def method(self) -> None:
        """``Sparsifier.evolve`` on every layer (mask write, zeroing, statistics included)."""
        for layer in self.sp.layers:
            self.sp.evolve(self.t, layer, layer.weight.grad)
        self.sp.pop_events()


def dense_step(base: torch.nn.Module, batch: int, image_size: int):
    model = copy.deepcopy(base).train()
    opt = torch.optim.SGD(model.parameters(), lr=common.LR, momentum=common.MOMENTUM,
                          weight_decay=common.WEIGHT_DECAY)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, image_size, image_size, generator=g)
    y = torch.randint(0, 1000, (batch,), generator=g)

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return run


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.quick:
        args.model, args.image_size, args.step_batch = "resnet32", 32, 2  # 0.46M weights: a smoke run
        args.patterns, args.repeats, args.warmup = args.patterns.split(",")[0], 1, 0
    common.apply_threads(args.threads)
    method = common.method_names(args.methods)[0]
    machine = common.machine_info()
    load_before = list(os.getloadavg())
    torch.manual_seed(0)
    base = models.create(args.model, num_classes=1000, image_size=args.image_size)
    patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    updates = {nm: Update(base, method, nm) for nm in patterns}
    cands: dict[str, Any] = {"step": dense_step(base, args.step_batch, args.image_size)}
    for nm, u in updates.items():
        cands[f"{nm}/pure"] = u.pure
        cands[f"{nm}/method"] = u.method
    common.log(f"{len(cands)} candidates x {args.warmup + args.repeats} rounds")
    samples = common.time_round_robin(
        cands, args.repeats, args.warmup,
        on_round=lambda r: common.log(f"  round {r + 1}/{args.warmup + args.repeats}, load {os.getloadavg()[0]:.2f}"),
    )
    step_ms = common.median(samples["step"])
    result: dict[str, Any] = {
        "benchmark": "bench_update", "machine": machine,
        "config": {"repeats": args.repeats, "warmup": args.warmup, "model": args.model, "method": method,
                   "image_size": args.image_size, "step_batch": args.step_batch, "patterns": patterns,
                   "quick": args.quick, "delta_t": common.DELTA_T},
        "model_weights": sum(p.numel() for n, p in base.named_parameters() if n.endswith("weight") and p.dim() > 1),
        "step_ms": step_ms, "samples_ms": samples, "patterns": {},
        "loadavg": {"before": load_before, "after": list(os.getloadavg())},
    }
    result["bame_source_end"] = common.check_source(result["machine"]["bame_source"])
    for nm, u in updates.items():
        pure, meth = common.median(samples[f"{nm}/pure"]), common.median(samples[f"{nm}/method"])
        parts = {k: common.median(v[args.warmup:] or v) for k, v in u.parts.items()}
        result["patterns"][nm] = {
            "sparse_layers": len(u.sp.layers), "sparse_weights": u.weights(),
            "dense_layers": sorted(u.sp.dense_layers),
            "pure_ms": pure, "pure_parts_ms": parts, "method_ms": meth,
            "pure_share_of_step": pure / step_ms, "method_share_of_step": meth / step_ms,
            "pure_amortised_share": pure / (common.DELTA_T * step_ms),
            "method_amortised_share": meth / (common.DELTA_T * step_ms),
        }
    common.write_json(args.out, result)
    print_table(result)
    return result


def print_table(result: dict[str, Any]) -> None:
    m, c = result["machine"], result["config"]
    print(f"bench_update  {c['model']}  torch {m['torch']}  threads {m['threads']}  repeats {c['repeats']}  "
          f"loadavg {result['loadavg']['before'][0]:.2f} -> {result['loadavg']['after'][0]:.2f}")
    print(f"dense training step, batch {c['step_batch']} at {c['image_size']}px: {result['step_ms']:.0f} ms (median)")
    rows = []
    for nm, r in result["patterns"].items():
        p = r["pure_parts_ms"]
        rows.append([nm, r["sparse_layers"], f"{r['sparse_weights'] / 1e6:.2f}M", r["pure_ms"],
                     f"{p['blocks']:.0f}/{p['lma']:.0f}/{p['obf']:.0f}", r["method_ms"],
                     f"{100 * r['pure_share_of_step']:.1f}%", f"{100 * r['method_share_of_step']:.1f}%",
                     f"{100 * r['method_amortised_share']:.3f}%"])
    print(common.format_table(
        ["N:M", "layers", "weights", "LMA+OBF ms", "blocks/LMA/OBF", "evolve ms", "pure/step",
         "method/step", "method/(100 steps)"], rows))


if __name__ == "__main__":
    main()
