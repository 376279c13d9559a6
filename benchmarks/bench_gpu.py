"""The GPU half of the project's GPU check (``benchmarks/gpu_check.sh`` runs the CUDA tests first, then this).

Parts (each writes its JSON section and a table; a part that fails records its error and the others run):

* ``train``: 100 training steps of every registered method on the device (ResNet-32 on random CIFAR-shaped
  batches of 128) under AMP, bf16 autocast, plus fp16 with a ``GradScaler``, and BAME with compressed
  storage: the final loss is finite and every sparse weight N:M; ms per step.
* ``semi``: 2:4 against dense bf16 products of the DeiT-small (384 -> 1536 -> 384) and ViT-base
  (768 -> 3072 -> 768) MLP layers on 256 images x 197 tokens: the forward, the input gradient through a
  backward mask 2:4 along the output axis (BAME-dagger), and the whole layer step (forward, input gradient,
  dense weight gradient). Target: 2:4 forward + input gradient of the DeiT-small layers >= 1.2x dense.
* ``deit``: a whole DeiT-small training step (``bame.models.create("deit_small")``, bf16 autocast,
  AdamW), dense against BAME-dagger 2:4 with ``kernel="sparse"`` (the planner picks 2:4 products where they
  win): target >= 1.05x dense.
* ``compiled``: BAME's ordinary masked-dense step (dense storage) under ``torch.compile`` against compiled
  dense, torchvision ResNet-18 on 32x32 batches of 128: target <= 1.03x.

Times are CUDA-event medians of interleaved repeats. Without a CUDA device (``--device cpu``) the parts that
need one record why they were skipped; ``train`` runs on the CPU (bf16 autocast), a plumbing check.

    python benchmarks/bench_gpu.py --out results/bench_gpu.json
    python benchmarks/bench_gpu.py --quick --device cpu --out /tmp/bench_gpu.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

import common
import torch
import torch.nn.functional as F
from torch import nn

import bame
from bame import methods, models
from bame.kernels import semi
from bame.nm import backward_mask, is_nm

SEMI_TARGET = 1.2  # DeiT-small MLP, 2:4 forward + input gradient over dense
DEIT_TARGET = 1.05  # whole DeiT-small step, BAME-dagger 2:4 over dense
COMPILED_TARGET = 1.03  # BAME's compiled masked-dense step over compiled dense
EVOLVING = ("bame", "lma", "rigl_nm", "bame_bi")  # updates in their evolution phase
SHAPES = {"deit_small": (384, 1536), "vit_base": (768, 3072)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(ap, "results/bench_gpu.json", default_repeats=20)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (a plumbing check)")
    ap.add_argument("--parts", default="train,semi,deit,compiled", help="comma-separated parts")
    ap.add_argument("--steps", type=int, default=100, help="training steps per method (train part)")
    ap.add_argument("--images", type=int, default=256, help="images per batch (semi: x 197 tokens; deit)")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.images = 3, min(args.repeats, 2), 2
    return args


# -- timing -------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(cands: dict[str, Callable[[], Any]], repeats: int, device: torch.device, warmup: int = 3) -> dict:
    """Median milliseconds of each candidate, interleaved (CUDA events on a GPU, the wall clock elsewhere)."""
    samples: dict[str, list[float]] = {k: [] for k in cands}
    names = list(cands)
    for r in range(warmup + repeats):
        for k in names[r % len(names):] + names[: r % len(names)]:
            sync(device)
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                cands[k]()
                end.record()
                end.synchronize()
                ms = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                cands[k]()
                ms = (time.perf_counter() - t0) * 1e3
            if r >= warmup:
                samples[k].append(ms)
    return {k: statistics.median(v) for k, v in samples.items()}


# -- train: every method, AMP --------------------------------------------------------------------------------
def train_part(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    base = models.create("resnet32", num_classes=10, width=1, image_size=32).to(device)
    batch = 8 if args.quick else 128
    g = torch.Generator(device="cpu").manual_seed(1)
    data = [(torch.randn(batch, 3, 32, 32, generator=g).to(device),
             torch.randint(0, 10, (batch,), generator=g).to(device)) for _ in range(4)]
    variants = [(name, "bf16", "dense") for name in methods.available()]
    variants += [("bame", "fp16", "dense"), ("bame", "bf16", "compressed")]
    out = {}
    for method, amp, storage in variants:
        label = f"{method} {amp}" + (" compressed" if storage == "compressed" else "")
        try:
            out[label] = _train(base, method, amp, storage, data, args.steps, device)
        except Exception as err:  # recorded, the other variants still run
            out[label] = {"ok": False, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]}
        common.log(f"train {label}: {out[label].get('ms_per_step', '-')} ms/step, ok={out[label]['ok']}")
    return out


def _train(base: nn.Module, method: str, amp: str, storage: str, data: list, steps: int,
           device: torch.device) -> dict[str, Any]:
    model = copy.deepcopy(base).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    options = {"delta_t": max(1, steps // 10)} if method in EVOLVING else {}  # updates inside a short run
    sp = bame.sparsify(model, opt, method, "2:4", total_steps=steps, verbose=False, storage=storage,
                       steps_per_epoch=max(1, steps // 4), **options)
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16" and device.type == "cuda")
    sync(device)
    t0 = time.perf_counter()
    for t in range(steps):
        x, y = data[t % len(data)]
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda" or amp == "bf16"):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    sync(device)
    elapsed = time.perf_counter() - t0
    final = float(loss)
    masks_ok = all(is_nm(layer.module.weight.detach() != 0, 2, 4, exact=False) for layer in sp.layers)
    return {"ok": bool(final == final and abs(final) != float("inf") and masks_ok), "final_loss": final,
            "nm_weights": masks_ok, "ms_per_step": round(elapsed * 1e3 / steps, 3), "steps": sp.step_count}


# -- semi: 2:4 against dense on transformer MLP shapes --------------------------------------------------------
def semi_part(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    probe = torch.empty(1, device=device, dtype=torch.bfloat16)
    problem = semi.semi_structured_problem(probe, 2, 4, (64, 64))
    if problem is not None:
        return {"skipped": problem}
    tokens = args.images * 197
    out = {}
    for model, (dim, hidden) in SHAPES.items():
        for layer, (fin, fout) in (("fc1", (dim, hidden)), ("fc2", (hidden, dim))):
            out[f"{model} {layer}"] = _semi_layer(fin, fout, tokens, args.repeats, device)
            common.log(f"semi {model} {layer}: {out[f'{model} {layer}']['speedup']}")
    return out


def _semi_layer(fin: int, fout: int, tokens: int, repeats: int, device: torch.device) -> dict[str, Any]:
    g = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16
    w = torch.randn(fout, fin, device=device, generator=g)
    blocks = w.abs().view(fout, fin // 4, 4)
    keep = torch.zeros_like(blocks, dtype=torch.bool).scatter_(2, blocks.topk(2, dim=2).indices, True).view(fout, fin)
    w_nm = (w * keep).to(dtype)
    w_bwd = (w_nm.float() * backward_mask(w_nm.float(), keep, 2, 4)).to(dtype)  # 2:4 along the output axis
    x = torch.randn(tokens, fin, device=device, dtype=dtype, generator=g)
    dy = torch.randn(tokens, fout, device=device, dtype=dtype, generator=g)
    fwd_c, dx_c = semi.compress(w_nm), semi.compress(w_bwd.t())
    ms = time_ms({
        "fwd dense": lambda: F.linear(x, w_nm),
        "fwd 2:4": lambda: semi.semi_structured_linear(x, compressed=fwd_c, out_features=fout),
        "dx dense": lambda: dy @ w_bwd,
        "dx 2:4": lambda: semi.semi_structured_dx(dy, compressed_t=dx_c, in_features=fin),
        "dw dense": lambda: dy.t() @ x,
        "compress": lambda: (semi.compress(w_nm), semi.compress(w_bwd.t())),
    }, repeats, device)
    dense = ms["fwd dense"] + ms["dx dense"]
    sparse = ms["fwd 2:4"] + ms["dx 2:4"]
    step_dense, step_sparse = dense + ms["dw dense"], sparse + ms["dw dense"] + ms["compress"] / 1  # one per step
    y_ref = F.linear(x, w_nm).float()
    y = semi.semi_structured_linear(x, compressed=fwd_c, out_features=fout).float()
    err = float((y - y_ref).abs().max() / y_ref.abs().max())
    return {"shape": [fout, fin], "tokens": tokens, "ms": ms, "max_rel_err_fwd": err,
            "speedup": {"fwd": ms["fwd dense"] / ms["fwd 2:4"], "dx": ms["dx dense"] / ms["dx 2:4"],
                        "fwd+dx": dense / sparse, "layer step": step_dense / step_sparse}}


# -- deit: a whole DeiT-small step ----------------------------------------------------------------------------
def deit_part(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {"skipped": "a whole DeiT-small step is measured on CUDA only"}
    torch.manual_seed(0)
    base = models.create("deit_small", num_classes=1000).to(device)
    images = args.images
    x = torch.randn(images, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (images,), device=device)
    cands, sparsifiers = {}, []
    for label in ("dense", "bame_bi 2:4"):
        model = copy.deepcopy(base).train()
        opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
        sp = None
        if label != "dense":
            sp = bame.sparsify(model, opt, "bame_bi", "2:4", total_steps=common.TOTAL_STEPS, verbose=False,
                               kernel="sparse", **common.EVOLUTION)
            sparsifiers.append(sp)
        cands[label] = _step(model, opt, sp, x, y, device)
    ms = time_ms(cands, args.repeats, device)
    plans = {r["name"]: r["kernel"] for r in sparsifiers[0].layer_report() if r["sparse"]}
    return {"images": images, "ms": ms, "speedup": ms["dense"] / ms["bame_bi 2:4"], "plans": plans}


def _step(model: nn.Module, opt: Any, sp: Any, x: torch.Tensor, y: torch.Tensor, device: torch.device,
          net: Any = None) -> Callable[[], None]:
    net = model if net is None else net

    def run() -> None:
        if sp is not None:
            sp.step_count = 101  # an ordinary evolution-phase iteration (harness, as benchmarks/common.py)
            sp.prepare(101)
            sp.pop_events()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return run


# -- compiled: BAME's masked-dense step under torch.compile ---------------------------------------------------
def compiled_part(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {"skipped": "compiled on CUDA only here (benchmarks/bench_overhead.py measures the CPU)"}
    import torchvision

    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=10).to(device)
    x = torch.randn(128, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (128,), device=device)
    cands = {}
    for label in ("dense", "bame"):
        model = copy.deepcopy(base).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        sp = None
        if label == "bame":
            sp = bame.sparsify(model, opt, "bame", "2:4", total_steps=common.TOTAL_STEPS, verbose=False,
                               **common.EVOLUTION)
        cands[label] = _step(model, opt, sp, x, y, device, net=torch.compile(model))
    ms = time_ms(cands, args.repeats, device, warmup=5)
    return {"ms": ms, "ratio": ms["bame"] / ms["dense"]}


# -- report ---------------------------------------------------------------------------------------------------
def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []

    def add(name: str, value: float, limit: float, higher: bool = True) -> None:
        out.append({"target": name, "value": value, "limit": limit,
                    "pass": bool(value >= limit if higher else value <= limit)})

    train = result.get("train", {})
    if train and "error" not in train:
        failed = [k for k, v in train.items() if not v.get("ok")]
        add(f"every method trains {result['config']['steps']} AMP steps (failed: {failed or 'none'})",
            float(len(train) - len(failed)), float(len(train)))
    for key in ("deit_small fc1", "deit_small fc2"):
        rec = result.get("semi", {}).get(key)
        if rec:
            add(f"semi {key} 2:4 fwd+dx >= {SEMI_TARGET}x dense", rec["speedup"]["fwd+dx"], SEMI_TARGET)
    if "speedup" in result.get("deit", {}):
        add(f"deit_small whole step bame_bi 2:4 >= {DEIT_TARGET}x dense", result["deit"]["speedup"], DEIT_TARGET)
    if "ratio" in result.get("compiled", {}):
        add(f"resnet18 compiled BAME step <= {COMPILED_TARGET}x compiled dense", result["compiled"]["ratio"],
            COMPILED_TARGET, higher=False)
    return out


def print_tables(result: dict[str, Any]) -> None:
    print(f"bench_gpu  device {result['device_name']}  torch {result['machine']['torch']}")
    for part, rec in result.items():
        if isinstance(rec, dict) and ("skipped" in rec or "error" in rec) and part in result["config"]["parts"]:
            print(f"\n{part}: {rec.get('skipped') or rec.get('error')}")
    train = result.get("train", {})
    if train and "error" not in train:
        print("\ntrain (ResNet-32, AMP)")
        print(common.format_table(["variant", "ok", "final loss", "ms/step"],
                                  [[k, v["ok"], v.get("final_loss"), v.get("ms_per_step")] for k, v in train.items()]))
    semi_rec = result.get("semi", {})
    if semi_rec and "skipped" not in semi_rec and "error" not in semi_rec:
        print("\nsemi (bf16, 2:4 over dense)")
        print(common.format_table(["layer", "fwd", "dx", "fwd+dx", "layer step", "max rel err"],
                                  [[k, v["speedup"]["fwd"], v["speedup"]["dx"], v["speedup"]["fwd+dx"],
                                    v["speedup"]["layer step"], v["max_rel_err_fwd"]] for k, v in semi_rec.items()]))
    if "speedup" in result.get("deit", {}):
        d = result["deit"]
        print(f"\ndeit_small step ({d['images']} images): dense {d['ms']['dense']:.1f} ms, bame_bi 2:4 "
              f"{d['ms']['bame_bi 2:4']:.1f} ms: {d['speedup']:.3f}x")
    if "ratio" in result.get("compiled", {}):
        c = result["compiled"]
        print(f"\ncompiled resnet18: dense {c['ms']['dense']:.2f} ms, bame {c['ms']['bame']:.2f} ms: {c['ratio']:.3f}x")
    print("\ntargets:")
    for t in result["targets"]:
        print(f"  [{'PASS' if t['pass'] else 'FAIL'}] {t['target']}: {t['value']:.3f}")


PARTS = {"train": train_part, "semi": semi_part, "deit": deit_part, "compiled": compiled_part}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.apply_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here (use --device cpu for a plumbing check)")
        return 0
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"bench_gpu: unknown parts {unknown} (choose from {', '.join(PARTS)})")
    result: dict[str, Any] = {
        "benchmark": "bench_gpu", "machine": common.machine_info(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "config": {"device": args.device, "parts": parts, "steps": args.steps, "images": args.images,
                   "repeats": args.repeats, "quick": args.quick},
    }
    for part in parts:
        try:
            result[part] = PARTS[part](args, device)
        except Exception as err:  # one broken part must not hide the others' figures
            result[part] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-3000:]}
            common.log(f"{part} failed: {result[part]['error']}")
    result["targets"] = targets(result)
    common.write_json(args.out, result)
    print_tables(result)
    failed = [p for p in parts if "error" in result[p]]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
