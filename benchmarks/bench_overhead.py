"""What masking costs: BAME's ordinary step against dense training, eager and compiled, and attached inference
against the squashed model.

The targets of the torch.compile issue, measured on torchvision's ResNet-18 (32x32 inputs, 10 classes) and
``vit_tiny`` (32x32 images, 4x4 patches), at batch 128 and 8:

* eager: BAME's ordinary step (evolution phase, t = 101, dense storage: masked-dense products) at most 1.05x
  dense at batch 128 and at most 1.10x at batch 8;
* compiled (``torch.compile``, inductor): at most 1.03x compiled dense at both batches;
* inference: a model still attached to its sparsifier, in eval mode under ``torch.no_grad()``, at most 1.02x
  the squashed model (plain modules holding the N:M weights).

Each (model, batch) runs its candidates interleaved (:func:`common.time_round_robin`), median of ``--repeats``
after ``--warmup`` rounds (the first compiled calls compile). The A/A line (``dense again``: a second copy of
the dense model) is the run's noise floor. The inference candidates run in a round robin of their own
(``--inference-repeats``, 41 by default). On this kind of host, two module objects computing with the very same
tensors differ by up to 4% at batch 8, consistently within a process (where each object's Python state and
the activations landed), which is larger than the target's margin. So the inference part times
``--inference-objects`` attached objects and as many squashed ones (3 each by default), all computing with one
set of tensors (:func:`share_tensors`: what is left differs only by code), and compares the means of the two
groups; the spread inside the squashed group is the A/A line. ``squashed copy`` (tensors of its own) shows
what where the weights landed in memory does by itself.

    python benchmarks/bench_overhead.py --repeats 10 --out results/bench_overhead.json
    python benchmarks/bench_overhead.py --models resnet18,vit_tiny --parts inference --out results/inference.json
    python benchmarks/bench_overhead.py --quick --out /tmp/bench_overhead.json
"""

from __future__ import annotations

import argparse
import copy
import os
from collections.abc import Callable
from typing import Any

import common
import torch
import torch.nn.functional as F
from torch import nn

import bame
from bame import models
from bame.masking import is_attached, raw_weight

TARGETS = {("eager", 128): 1.05, ("eager", 8): 1.10, ("compiled", 128): 1.03, ("compiled", 8): 1.03}
INFERENCE_TARGET = 1.02


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(ap, "results/bench_overhead.json", default_repeats=10)
    ap.add_argument("--models", default="resnet18,vit_tiny", help="comma-separated: resnet18, vit_tiny")
    ap.add_argument("--batches", default="128,8", help="comma-separated batch sizes")
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds (compilation happens here)")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend ('none': skip compiled)")
    ap.add_argument("--nm", default="2:4")
    ap.add_argument("--parts", default="train,inference", help="comma-separated: train, inference")
    ap.add_argument("--inference-repeats", type=int, default=41,
                    help="timed rounds of the inference candidates (their own round robin: a batch-8 forward "
                         "varies by about 5%% from round to round on a shared host)")
    ap.add_argument("--inference-objects", type=int, default=3,
                    help="module objects per inference kind (attached, squashed), all on the same tensors: "
                         "their means are compared, averaging out where each object landed in memory")
    ap.add_argument("--inference-plain", action="store_true",
                    help="also time as many attached objects run as plain modules (their user's classes, the raw "
                         "weight): whether a gap follows the attached code or the objects")
    args = ap.parse_args(argv)
    if args.quick:
        args.batches, args.repeats, args.warmup = "2", min(args.repeats, 2), 1
        args.inference_repeats = min(args.inference_repeats, 2)
        args.inference_objects = min(args.inference_objects, 2)
    return args


def build(name: str, quick: bool) -> nn.Module:
    torch.manual_seed(0)
    if name == "resnet18":
        import torchvision

        if quick:  # one BasicBlock per stage
            return torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1],
                                                    num_classes=10)
        return torchvision.models.resnet18(num_classes=10)
    if name == "vit_tiny":
        return models.create("vit_tiny", num_classes=10, image_size=32, patch_size=4, **({"depth": 1} if quick else {}))
    raise SystemExit(f"bench_overhead: unknown model {name!r} (resnet18, vit_tiny)")


def trainee(base: nn.Module, sparse: bool, nm: str, backend: str | None) -> tuple[Callable[..., Any], Any, Any]:
    """A copy of ``base`` with SGD, BAME attached (dense storage) if ``sparse``, compiled if ``backend``."""
    model = copy.deepcopy(base).train()
    opt = torch.optim.SGD(model.parameters(), lr=common.LR, momentum=common.MOMENTUM, weight_decay=common.WEIGHT_DECAY)
    sp = None
    if sparse:
        sp = bame.sparsify(model, opt, "bame", nm, total_steps=common.TOTAL_STEPS, verbose=False, **common.EVOLUTION)
    net = torch.compile(model, backend=backend) if backend else model
    return net, opt, sp


def train_step(net: Callable[..., Any], opt: Any, sp: Any, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One whole step; BAME's iteration is set to an ordinary evolution-phase one first (harness only)."""

    def run() -> None:
        if sp is not None:
            sp.step_count = common.DELTA_T + 1
            sp.prepare(sp.step_count)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()

    return run


def inference(net: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """Forwards under ``torch.no_grad()``: enough per timed call for about 64 samples (a batch-8 forward is a
    few milliseconds, near the timer's noise)."""
    calls = max(1, 64 // x.shape[0])

    def run() -> None:
        with torch.no_grad():
            for _ in range(calls):
                net(x)

    return run


def share_tensors(other: nn.Module, attached: nn.Module) -> None:
    """Make ``other`` (squashed, or another attached copy) compute with ``attached``'s very tensors: a sparse
    layer's raw weight (exactly zero where pruned in BAME's evolution phase, so equal to the squashed ``W * B``:
    checked), every other parameter and every buffer. Two separately allocated copies of one model differ by
    up to 6% at batch 8 on this machine (where their weights landed in memory); sharing the tensors leaves only
    the code and the module objects."""
    own = dict(attached.named_parameters()) | dict(attached.named_buffers())
    for name, tensor in list(other.named_parameters()) + list(other.named_buffers()):
        module_name, _, leaf = name.rpartition(".")
        raw = own.get(f"{module_name}.parametrizations.{leaf}.original", own.get(name))
        if raw is None or not torch.equal(raw, tensor):
            raise SystemExit(f"bench_overhead: {name} of the other model differs from the attached model's")
        tensor.data = raw.data  # the same storage (the Parameter object stays)


def as_plain(model: nn.Module) -> None:
    """Turn every attached layer of ``model`` back into its user's class computing with its raw weight, while
    the object keeps all it held attached (its parametrization modules and their buffers): the diagnostic
    ``infer plain`` kind, the attached objects with the squashed model's very code."""
    for module in model.modules():
        if is_attached(module):
            raw = raw_weight(module)
            module.__class__ = module._bame_base.__mro__[1]  # the parametrized class's base: the user's class
            module._parameters["weight"] = raw


def inference_candidates(base: nn.Module, x: torch.Tensor, nm: str, objects: int = 3,
                         plain: bool = False) -> dict[str, Callable[[], None]]:
    """``objects`` models attached to their sparsifier (BAME's masks, eval) and as many squashed (and, with
    ``plain``, as many attached ones run as plain modules: :func:`as_plain`), all on the first attached model's
    tensors, plus one squashed copy on tensors of its own."""
    # created alternately, so that no kind's objects sit together in memory
    names = ("infer attached", "infer squashed") + (("infer plain",) if plain else ())
    kinds = [(kind, i) for i in range(1, objects + 1) for kind in names]
    kinds.append(("infer squashed copy", 1))
    cands, first = {}, None
    for kind, number in kinds:
        squash = kind.startswith("infer squashed")
        model = copy.deepcopy(base).eval()  # the same weights, so the same masks
        sp = bame.sparsify(model, None, "bame", nm, total_steps=common.TOTAL_STEPS, verbose=False,
                           **common.EVOLUTION)
        sp.step_count = common.DELTA_T + 1
        sp.prepare(sp.step_count)
        if squash:
            sp.squash()
        if first is None:
            first = model
        elif kind != "infer squashed copy":
            share_tensors(model, first)
        if kind == "infer plain":
            as_plain(model)
        cands[kind if number == 1 else f"{kind} {number}"] = inference(model, x)
    return dict(sorted(cands.items()))  # each kind's objects together in the table


def group(ms: dict[str, float], kind: str) -> list[float]:
    """The median times of one inference kind's objects (``kind``, ``kind 2``, ...)."""
    return [v for k, v in ms.items() if k == kind or (k.startswith(kind + " ") and k[len(kind) + 1:].isdigit())]


def group_mean(ms: dict[str, float], kind: str) -> float:
    values = group(ms, kind)
    return sum(values) / len(values)


def measure(name: str, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    base = build(name, args.quick)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
    cands: dict[str, Callable[[], None]] = {}
    sparsifiers = []
    parts = {p.strip() for p in args.parts.split(",")}
    modes = ([("eager", None)] + ([("compiled", args.backend)] if args.backend != "none" else [])
             if "train" in parts else [])
    for mode, backend in modes:
        for label, sparse in (("dense", False), ("bame", True)):
            net, opt, sp = trainee(base, sparse, args.nm, backend)
            cands[f"{mode} {label}"] = train_step(net, opt, sp, x, y)
            if sp is not None:
                sparsifiers.append(sp)
    if modes:
        net, opt, sp = trainee(base, False, args.nm, None)
        cands["eager dense again"] = train_step(net, opt, sp, x, y)  # the A/A control
    infer = (inference_candidates(base, x, args.nm, args.inference_objects, args.inference_plain)
             if "inference" in parts else {})
    common.log(f"{name} batch {batch}: {len(cands)} training and {len(infer)} inference candidates")
    load = list(os.getloadavg())
    samples = common.time_round_robin(cands, args.repeats, args.warmup,
                                      on_round=lambda r: [s.pop_events() for s in sparsifiers]) if cands else {}
    if infer:
        samples.update(common.time_round_robin(infer, args.inference_repeats, args.warmup))
    ms = {k: common.median(v) for k, v in samples.items()}
    ratios = {f"{mode} bame/dense": ms[f"{mode} bame"] / ms[f"{mode} dense"] for mode, _ in modes}
    if modes:
        ratios["A/A eager dense again/dense"] = ms["eager dense again"] / ms["eager dense"]
    if "inference" in parts:
        # each kind's objects on the same tensors: the means of the two groups are compared (an object's
        # placement moves it by up to 4% at batch 8); the squashed group's spread is the floor
        squashed = group_mean(ms, "infer squashed")
        ratios["inference attached/squashed"] = group_mean(ms, "infer attached") / squashed
        floor = group(ms, "infer squashed")
        ratios["A/A inference squashed slowest/fastest"] = max(floor) / min(floor)
        ratios["placement: squashed copy/squashed"] = ms["infer squashed copy"] / squashed
        if args.inference_plain:
            ratios["diagnostic: plain/squashed"] = group_mean(ms, "infer plain") / squashed
    return {"model": name, "batch": batch, "ms": ms, "samples_ms": samples, "ratios": ratios,
            "loadavg": {"before": load, "after": list(os.getloadavg())}}


def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for rec in results:
        for (mode, batch), limit in TARGETS.items():
            key = f"{mode} bame/dense"
            if rec["batch"] == batch and key in rec["ratios"]:
                value = rec["ratios"][key]
                out.append({"target": f"{rec['model']} batch {batch} {mode} BAME ordinary step <= {limit}x dense",
                            "value": value, "limit": limit, "pass": bool(value <= limit)})
        if "inference attached/squashed" not in rec["ratios"]:
            continue
        value = rec["ratios"]["inference attached/squashed"]
        out.append({"target": f"{rec['model']} batch {rec['batch']} attached inference <= {INFERENCE_TARGET}x "
                              "squashed", "value": value, "limit": INFERENCE_TARGET,
                    "pass": bool(value <= INFERENCE_TARGET)})
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    common.apply_threads(args.threads)
    results = [measure(name.strip(), int(b), args) for name in args.models.split(",") if name.strip()
               for b in args.batches.split(",") if b.strip()]
    record = {"benchmark": "bench_overhead", "machine": common.machine_info(),
              "config": {"models": args.models, "batches": args.batches, "repeats": args.repeats,
                         "warmup": args.warmup, "backend": args.backend, "nm": args.nm, "quick": args.quick,
                         "parts": args.parts, "inference_repeats": args.inference_repeats,
                         "inference_objects": args.inference_objects, "inference_plain": args.inference_plain},
              "results": results, "targets": targets(results)}
    record["bame_source_end"] = common.check_source(record["machine"]["bame_source"])
    common.write_json(args.out, record)
    m = record["machine"]
    print(f"bench_overhead  torch {m['torch']}  threads {m['threads']}  cpu {m.get('cpu', '?')}  backend "
          f"{args.backend}  BAME {args.nm}, ordinary evolution step, dense storage")
    for rec in results:
        print(f"\n{rec['model']} batch {rec['batch']}")
        print(common.format_table(["candidate", "ms"], [[k, v] for k, v in rec["ms"].items()]))
        for k, v in rec["ratios"].items():
            print(f"  {k}: {v:.3f}x")
    print("\ntargets:")
    for t in record["targets"]:
        print(f"  [{'PASS' if t['pass'] else 'FAIL'}] {t['target']}: {t['value']:.3f}")
    return record


if __name__ == "__main__":
    main()
