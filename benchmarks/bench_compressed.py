"""Compressed N:M training against dense training: whole steps, peak memory, and a whole run.

The targets of compressed storage (``bame.sparsify(..., storage="compressed")``), measured here:

* ``mlp``: the transformer-style MLP stack (``--depth`` pre-norm blocks 1024 -> 4096 -> 1024, 256 token rows,
  every Linear sparse), whole training step (forward, backward, SGD step, mask upkeep) against dense
  training of the same model with the same optimizer: 1:16 >= 2.5x (static) and >= 2.3x (BAME, its update
  iteration amortised over delta_t = 100); 1:8 >= 1.6x; 1:4 >= 1.15x; 2:4 never below 0.97x.
* ``resnet32``: the paper's ResNet-32 (width 2) on CIFAR-shaped batches of 128 at 1:16, against dense in its
  fastest memory layout (NCHW or channels_last, whichever is faster here): >= 1.5x.
* ``vit``: ``vit_tiny`` (4x4 patches, 65 tokens per image, batch 128) at 1:16: >= 1.5x.
* ``memory``: peak training memory of the MLP at 1:16, each variant in a fresh process: <= 0.5x dense. The
  target is the training steps' own peak (after the first step, which switches to compressed storage; freed
  memory trimmed, the kernel's high-water mark reset); the peak with the dense model's construction and the
  switch is reported beside it (a compressed model is built dense first).
* ``run``: whole ``bame train`` runs (digits, the registry's ``mlp`` at ``--dim``/``--hidden``/``--depth``,
  16 tokens of 2x2 patches per image, batch 16 = 256 token rows per step, 3 epochs): BAME 1:16 with the
  paper's default schedule (t_i = T/3, t_f = 2T/3, delta_t = 100; the gradual phase, epoch 1, trains dense
  storage) and ``--storage compressed``, against the dense run: <= 0.65x its wall time. Runs alternate,
  the median of ``min(--repeats, 3)`` pairs decides; the per-epoch walls give each phase's ratio.

Every candidate of a part runs interleaved (:func:`common.time_round_robin`), median of ``--repeats`` after
the warm-up (which also times every layer's plan). The BAME candidates start compressed (``t_i = 0``); the
harness sets the iteration by hand before each timed step (ordinary: t = 101; update: t = 100) and
prepares it, as the step post-hook does in training.

    python benchmarks/bench_compressed.py --repeats 10 --out results/bench_compressed.json
    python benchmarks/bench_compressed.py --quick --out /tmp/bench_compressed.json
    python benchmarks/bench_compressed.py --parts run --repeats 3 --out results/bench_compressed_run.json
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import common
import torch
import torch.nn.functional as F
from torch import nn

import bame
from bame import models, native

PATTERNS = ("1:16", "1:8", "1:4", "2:4")
MLP_TARGETS = {"1:16": {"static": 2.5, "bame": 2.3}, "1:8": {"static": 1.6, "bame": 1.6},
               "1:4": {"static": 1.15, "bame": 1.15}, "2:4": {"static": 0.97, "bame": 0.97}}
MODEL_TARGET = 1.5  # resnet32 and vit at 1:16
MEMORY_TARGET = 0.5
RUN_TARGET = 0.65  # a whole bame train run, BAME 1:16 (compressed) over dense, wall time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(ap, "results/bench_compressed.json", default_repeats=10)
    ap.add_argument("--parts", default="mlp,resnet32,vit,memory,run", help="comma-separated parts")
    ap.add_argument("--patterns", default=",".join(PATTERNS), help="N:M patterns of the mlp part")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=128, help="images per batch (resnet32, vit)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--run-epochs", type=int, default=3, help="epochs of the whole runs (run part)")
    ap.add_argument("--run-delta-t", type=int, default=100, help="BAME's delta_t in the whole runs (run part)")
    ap.add_argument("--memory-child", default="", help=argparse.SUPPRESS)  # internal: one memory measurement
    args = ap.parse_args(argv)
    if args.quick:
        args.dim, args.hidden, args.depth, args.tokens, args.batch = 32, 64, 1, 16, 4
        args.repeats, args.warmup, args.patterns, args.run_epochs = min(args.repeats, 2), 1, "1:16", 1
        args.run_delta_t = 10
    return args


# -- candidates -------------------------------------------------------------------------------------------
def trainee(base: nn.Module, method: str | None, nm: str, layer_filter: Any = None,
            channels_last: bool = False) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """A copy of ``base`` with SGD and, for a method, compressed storage with planned sparse products."""
    model = copy.deepcopy(base).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=common.LR, momentum=common.MOMENTUM,
                          weight_decay=common.WEIGHT_DECAY)
    if method is None:
        return model, opt, None
    options = common.EVOLUTION if method == "bame" else {}
    sp = bame.sparsify(model, opt, method, nm, total_steps=common.TOTAL_STEPS, storage="compressed",
                       verbose=False, layer_filter=layer_filter, **options)
    return model, opt, sp


def step_fn(model: nn.Module, opt: Any, sp: Any, x: torch.Tensor, target: torch.Tensor, loss: str,
            t: int | None = None) -> Callable[[], None]:
    """One whole training step; for BAME the iteration t is set and prepared first (harness only)."""

    def run() -> None:
        if sp is not None and t is not None:
            sp.step_count = t
            sp.prepare(t)
        opt.zero_grad(set_to_none=True)
        out = model(x)
        (F.mse_loss(out, target) if loss == "mse" else F.cross_entropy(out, target)).backward()
        opt.step()

    return run


def candidates(base: nn.Module, nm: str, x: torch.Tensor, target: torch.Tensor, loss: str,
               layer_filter: Any = None, layouts: bool = False) -> tuple[dict[str, Callable[[], None]], dict]:
    cands, sparsifiers = {}, {}
    for layout in (("dense", False), ("dense/channels_last", True)) if layouts else (("dense", False),):
        model, opt, _ = trainee(base, None, nm, channels_last=layout[1])
        xx = x.contiguous(memory_format=torch.channels_last) if layout[1] else x
        cands[layout[0]] = step_fn(model, opt, None, xx, target, loss)
    for name, t in (("static", None), ("bame", common.DELTA_T + 1), ("bame/update", common.DELTA_T)):
        model, opt, sp = trainee(base, name.split("/")[0], nm, layer_filter)
        sparsifiers[name] = sp
        cands[name] = step_fn(model, opt, sp, x, target, loss, t)
    return cands, sparsifiers


def time_part(cands: dict[str, Callable[[], None]], sparsifiers: dict, args: argparse.Namespace) -> dict[str, Any]:
    load = list(os.getloadavg())
    samples = common.time_round_robin(cands, args.repeats, args.warmup,
                                      on_round=lambda r: [sp.pop_events() for sp in sparsifiers.values()])
    dense_key = min((k for k in samples if k.startswith("dense")), key=lambda k: common.median(samples[k]))
    dense = common.median(samples[dense_key])
    rec: dict[str, Any] = {"dense": dense_key, "dense_ms": dense,
                           "ms": {k: common.median(v) for k, v in samples.items()}, "samples_ms": samples,
                           "loadavg": {"before": load, "after": list(os.getloadavg())}}
    bame_ms = ((common.DELTA_T - 1) * rec["ms"]["bame"] + rec["ms"]["bame/update"]) / common.DELTA_T
    rec["speedup"] = {"static": dense / rec["ms"]["static"], "bame": dense / bame_ms,
                      "bame_ordinary": dense / rec["ms"]["bame"]}
    rec["plans"] = {r["name"]: r["kernel"] for r in sparsifiers["static"].layer_report() if r["sparse"]}
    return rec


def mlp_part(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for nm in [p.strip() for p in args.patterns.split(",") if p.strip()]:
        torch.manual_seed(0)
        base = nn.Sequential(*[common.Block(args.dim, args.hidden) for _ in range(args.depth)])
        g = torch.Generator().manual_seed(1)
        x, target = torch.randn(args.tokens, args.dim, generator=g), torch.randn(args.tokens, args.dim, generator=g)
        every_linear = lambda name, module: isinstance(module, nn.Linear)  # noqa: E731
        cands, sps = candidates(base, nm, x, target, "mse", every_linear)
        common.log(f"mlp {nm}: {len(cands)} candidates")
        out[nm] = time_part(cands, sps, args)
    return out


def model_part(name: str, args: argparse.Namespace) -> dict[str, Any]:
    image = 8 if args.quick else 32
    if name == "resnet32":
        base = models.create("resnet32", num_classes=10, width=1 if args.quick else 2, image_size=image)
    else:
        base = models.create("vit_tiny", num_classes=10, image_size=image, patch_size=4,
                             **({"depth": 1} if args.quick else {}))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, image, image, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    cands, sps = candidates(base, "1:16" if not args.quick else "1:4", x, y, "ce", layouts=name == "resnet32")
    common.log(f"{name}: {len(cands)} candidates")
    return time_part(cands, sps, args)


# -- memory: one fresh process per variant ------------------------------------------------------------------
def memory_child(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS of training the MLP (a few steps) over the RSS before the model exists."""
    torch.manual_seed(0)
    warm = nn.Sequential(common.Block(32, 64))  # load the code paths and their one-time buffers first
    for name in (None, "static", "bame"):
        model, opt, sp = trainee(warm, name, "1:16", lambda n, m: isinstance(m, nn.Linear))
        for t in (common.DELTA_T + 1, common.DELTA_T):
            step_fn(model, opt, sp, torch.randn(8, 32), torch.randn(8, 32), "mse", None if sp is None else t)()
    del warm, model, opt, sp
    base_kb = _rss_kb()
    reset_peak = _peak_kb()
    torch.manual_seed(0)
    base = nn.Sequential(*[common.Block(args.dim, args.hidden) for _ in range(args.depth)])
    x, target = torch.randn(args.tokens, args.dim), torch.randn(args.tokens, args.dim)
    method = None if variant == "dense" else variant
    model, opt, sp = trainee(base, method, "1:16", lambda n, m: isinstance(m, nn.Linear))
    del base
    fns = [step_fn(model, opt, sp, x, target, "mse", t) for t in ((None,) if method != "bame"
                                                               else (common.DELTA_T + 1, common.DELTA_T))]
    for fn in fns:  # the first steps: the switch to compressed storage, plans, optimizer state
        fn()
    built_peak = _peak_kb()
    # Steady training: what construction and the switch freed goes back to the system, the high-water mark
    # starts again (Linux: clear_refs 5), and only the training steps' peak is counted.
    gc.collect()
    _malloc_trim()
    steady = _reset_hwm()
    for _ in range(3):
        for fn in fns:
            fn()
    steady_peak = _hwm_kb() if steady else _peak_kb()
    return {"variant": variant, "baseline_mb": base_kb / 1024, "peak_mb": built_peak / 1024,
            "with_build_mb": (max(built_peak, _peak_kb()) - base_kb) / 1024,
            "training_mb": (steady_peak - base_kb) / 1024, "steady_measured": steady,
            "peak_before_build_mb": reset_peak / 1024}


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    """Reset the process's peak RSS (VmHWM), where the kernel allows it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _hwm_kb() -> float:
    with open("/proc/self/status") as f:
        return float(next(line.split()[1] for line in f if line.startswith("VmHWM")))


def _rss_kb() -> float:
    with open("/proc/self/status") as f:
        return float(next(line.split()[1] for line in f if line.startswith("VmRSS")))


def _peak_kb() -> float:
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


#: The two allocator settings the memory part measures under: glibc's default (its mmap threshold adapts:
#: once a large block was freed, blocks up to that size come from the heap, whose freed pages stay resident),
#: and every allocation above 128 KiB mmapped (freed pages go back to the system at once, so the RSS follows
#: the live tensors). Both apply to every variant alike.
ALLOCATORS = {"glibc default": {}, "mmap above 128 KiB": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


def memory_part(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for allocator, env in ALLOCATORS.items():
        runs: dict[str, list[dict[str, Any]]] = {}
        for _ in range(max(1, min(args.repeats, 3))):
            for variant in ("dense", "static", "bame"):
                flags = ["--dim", str(args.dim), "--hidden", str(args.hidden), "--depth", str(args.depth),
                         "--tokens", str(args.tokens), "--memory-child", variant, "--out", ""]
                done = subprocess.run([sys.executable, __file__, *flags], capture_output=True, text=True, check=True,
                                      env={**os.environ, **env})
                runs.setdefault(variant, []).append(json.loads(done.stdout.strip().splitlines()[-1]))
        training = {v: common.median([r["training_mb"] for r in rs]) for v, rs in runs.items()}
        with_build = {v: common.median([r["with_build_mb"] for r in rs]) for v, rs in runs.items()}
        out[allocator] = {"env": env, "training_mb": training,
                          "ratio": {v: training[v] / training["dense"] for v in training},
                          "with_build_mb": with_build,
                          "with_build_ratio": {v: with_build[v] / with_build["dense"] for v in with_build},
                          "runs": runs}
    return out


# -- run: whole bame train runs ------------------------------------------------------------------------------
def run_configs(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The dense run and BAME 1:16 with compressed storage, the paper's default schedule."""
    base = {"dataset": "digits", "model": "mlp", "width": 1.0, "epochs": args.run_epochs, "batch_size": 16,
            "seed": 0, "device": "cpu", "lr": common.LR, "momentum": common.MOMENTUM,
            "weight_decay": common.WEIGHT_DECAY,
            "model_options": {"dim": args.dim, "depth": args.depth, "mlp_ratio": args.hidden / args.dim,
                              "patch_size": 2}}
    return {"dense": {**base, "method": "dense"},
            "bame": {**base, "method": "bame", "nm": "1:16", "storage": "compressed",
                     "method_options": {"delta_t": args.run_delta_t}}}


def run_part(args: argparse.Namespace) -> dict[str, Any]:
    from bame import config, engine

    configs = run_configs(args)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(max(1, min(args.repeats, 3))):
            for name, cfg in configs.items():
                out = os.path.join(tmp, f"{name}-{r}")
                summary = engine.fit(config.build(cfg), out)
                with open(os.path.join(out, "metrics.jsonl")) as f:
                    ends = [json.loads(line)["wall_s"] for line in f]  # the run's wall time at each epoch's end
                epochs = [b - a for a, b in zip([0.0, *ends], ends, strict=False)]
                runs[name].append({"wall_s": summary["wall_time_s"], "epoch_wall_s": epochs, "top1": summary["top1"],
                                   "flops_ratio": summary["train_flops_ratio"],
                                   "flops_ratio_hw": summary["train_flops_ratio_hw"]})
                common.log(f"run {name} #{r}: {summary['wall_time_s']:.1f} s, top-1 {summary['top1']:.2f}%")
    wall = {name: common.median([r["wall_s"] for r in rs]) for name, rs in runs.items()}
    epochs = {name: [common.median(list(e)) for e in zip(*[r["epoch_wall_s"] for r in rs], strict=True)]
              for name, rs in runs.items()}
    per_epoch = [b / d for b, d in zip(epochs["bame"], epochs["dense"], strict=True)]
    return {"config": configs, "runs": runs, "wall_s": wall, "epoch_wall_s": epochs,
            "ratio": wall["bame"] / wall["dense"], "epoch_ratio": per_epoch,
            "flops_ratio": runs["bame"][0]["flops_ratio"], "flops_ratio_hw": runs["bame"][0]["flops_ratio_hw"]}


# -- report -----------------------------------------------------------------------------------------------
def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []

    def add(name: str, value: float, limit: float, higher: bool = True) -> None:
        out.append({"target": name, "value": value, "limit": limit,
                    "pass": bool(value >= limit if higher else value <= limit)})

    for nm, rec in result.get("mlp", {}).items():
        for method, limit in MLP_TARGETS.get(nm, {}).items():
            add(f"mlp {nm} {method} whole step >= {limit}x dense", rec["speedup"][method], limit)
    for part in ("resnet32", "vit"):
        if part in result:
            add(f"{part} 1:16 static whole step >= {MODEL_TARGET}x dense ({result[part]['dense']})",
                result[part]["speedup"]["static"], MODEL_TARGET)
            add(f"{part} 1:16 bame (amortised) >= {MODEL_TARGET}x dense", result[part]["speedup"]["bame"],
                MODEL_TARGET)
    if "run" in result:
        add(f"bame train BAME 1:16 (compressed) wall <= {RUN_TARGET}x the dense run", result["run"]["ratio"],
            RUN_TARGET, higher=False)
    for allocator, mem in result.get("memory", {}).items():
        for v in ("static", "bame"):
            add(f"mlp 1:16 {v} peak training memory <= {MEMORY_TARGET}x dense ({allocator})", mem["ratio"][v],
                MEMORY_TARGET, higher=False)
    return out


def print_tables(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(f"bench_compressed  torch {m['torch']}  threads {m['threads']}  cpu {m.get('cpu', '?')}  "
          f"native kernels: {result['config']['native']}")
    for nm, rec in result.get("mlp", {}).items():
        print(f"\nmlp {nm} ({result['config']['depth']} blocks {result['config']['dim']}->"
              f"{result['config']['hidden']}, {result['config']['tokens']} tokens): dense {rec['dense_ms']:.1f} ms")
        rows = [[k, v, rec["dense_ms"] / v] for k, v in rec["ms"].items()]
        print(common.format_table(["variant", "ms", "dense/variant"], rows))
        print(f"  speed-up: static {rec['speedup']['static']:.2f}x, bame amortised {rec['speedup']['bame']:.2f}x")
        for name, note in rec["plans"].items():
            print(f"    {name}: {note}")
    for part in ("resnet32", "vit"):
        if part in result:
            rec = result[part]
            print(f"\n{part} 1:16 (batch {result['config']['batch']}): dense = {rec['dense']} {rec['dense_ms']:.0f} ms")
            rows = [[k, v, rec["dense_ms"] / v] for k, v in rec["ms"].items()]
            print(common.format_table(["variant", "ms", "dense/variant"], rows))
            print(f"  speed-up: static {rec['speedup']['static']:.2f}x, bame amortised {rec['speedup']['bame']:.2f}x")
            for name, note in rec["plans"].items():
                print(f"    {name}: {note}")
    for allocator, mem in result.get("memory", {}).items():
        print(f"\nmlp 1:16 peak memory ({allocator}), MB over the RSS before the model was built: of the training"
              " steps (after the first, which switches to compressed storage), and with the model's construction and"
              " the switch")
        print(common.format_table(["variant", "training MB", "x dense", "with build MB", "x dense"],
                                  [[v, mem["training_mb"][v], mem["ratio"][v], mem["with_build_mb"][v],
                                    mem["with_build_ratio"][v]] for v in mem["training_mb"]]))
    if "run" in result:
        run = result["run"]
        print(f"\nwhole bame train runs ({result['config']['run_epochs']} epochs, "
              f"median of {len(run['runs']['dense'])})")
        rows = [[name, run["wall_s"][name], run["wall_s"][name] / run["wall_s"]["dense"],
                 common.median([r["top1"] for r in run["runs"][name]])] for name in run["wall_s"]]
        print(common.format_table(["run", "wall s", "x dense", "top-1 %"], rows))
        print("  per epoch, bame over dense: " + ", ".join(f"{r:.2f}x" for r in run["epoch_ratio"])
              + f"; training FLOPs {run['flops_ratio']:.3f}x (paper rule), {run['flops_ratio_hw']:.3f}x (nm-hw)")
    print("\ntargets:")
    for t in result["targets"]:
        print(f"  [{'PASS' if t['pass'] else 'FAIL'}] {t['target']}: {t['value']:.3f}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    common.apply_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args)))
        return {}
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    result: dict[str, Any] = {
        "benchmark": "bench_compressed", "machine": common.machine_info(),
        "config": {"dim": args.dim, "hidden": args.hidden, "depth": args.depth, "tokens": args.tokens,
                   "batch": args.batch, "repeats": args.repeats, "warmup": args.warmup, "quick": args.quick,
                   "run_epochs": args.run_epochs, "run_delta_t": args.run_delta_t,
                   "delta_t": common.DELTA_T, "lr": common.LR, "momentum": common.MOMENTUM,
                   "weight_decay": common.WEIGHT_DECAY,
                   "native": "available" if native.available() else native.unavailable_reason()},
    }
    if "mlp" in parts:
        result["mlp"] = mlp_part(args)
    for part in ("resnet32", "vit"):
        if part in parts:
            result[part] = model_part(part, args)
    if "memory" in parts:
        result["memory"] = memory_part(args)
    if "run" in parts:
        result["run"] = run_part(args)
    result["targets"] = targets(result)
    result["bame_source_end"] = common.check_source(result["machine"]["bame_source"])
    common.write_json(args.out, result)
    print_tables(result)
    return result


if __name__ == "__main__":
    main()
