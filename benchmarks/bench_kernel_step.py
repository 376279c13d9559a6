"""Whole training steps of a transformer-style MLP stack: dense vs. masked-dense vs. sparse N:M kernels.

The project's target: a whole training step at 1:16 at least 2x faster than dense, at 1:4 at least 1.3x,
measured end to end (forward, backward, optimizer, mask upkeep). The model: ``--depth`` pre-norm blocks
``x + Linear(hidden, dim)(GELU(Linear(dim, hidden)(LayerNorm(x))))`` on ``--tokens`` rows (batch x sequence),
MSE loss against a fixed random target, SGD with momentum and weight decay. Variants, each its own model
copy from the same initial weights:

* ``dense``: the plain model, no sparsifier.
* ``<method>/masked``: ``bame.sparsify(..., kernel="dense")`` (masked dense products).
* ``<method>/sparse``: ``bame.sparsify(..., kernel="sparse")`` (the planned N:M kernels).
* with ``--compile``: ``dense/compiled`` and ``<method>/sparse/compiled``, the same models under
  ``torch.compile`` (inductor), whose graphs call the kernels as the ``bame::compressed_linear`` operator
  (ordinary steps only).

A sample is one whole step: ``zero_grad(set_to_none=True)``, forward, loss, backward, ``optimizer.step()``
(the sparsifier's hooks included). For ``bame`` the ordinary step and the mask-update step
(``t % delta_t == 0``, with its dense weight gradient, the update and the repacking it causes) are timed
separately and amortised at delta_t = 100. Everything runs interleaved (:func:`common.time_round_robin`),
median of ``--repeats`` after the warm-up (which also times every layer's plan), ratios paired per round.

    python benchmarks/bench_kernel_step.py --patterns 1:16,1:4 --repeats 10 --out results/bench_kernel_step.json
    python benchmarks/bench_kernel_step.py --patterns 1:16 --compile --repeats 9 --out results/kernel_step_compiled.json
    python benchmarks/bench_kernel_step.py --quick --out /tmp/bench_kernel_step.json
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
from bame import native

TARGETS = {"1:16": 2.0, "1:4": 1.3}  # required speed-up of the whole (amortised) step over dense


def build_model(dim: int, hidden: int, depth: int) -> nn.Module:
    return nn.Sequential(*[common.Block(dim, hidden) for _ in range(depth)])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(ap, "results/bench_kernel_step.json", default_repeats=10)
    ap.add_argument("--patterns", default="1:16,1:4", help="N:M patterns, comma-separated")
    ap.add_argument("--fused-sgd", action="store_true",
                    help="every variant (dense too) uses SGD(fused=True), torch's single-kernel update")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32, help="tokens per sample (tokens = batch x seq)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--compile", action="store_true", help="also time compiled dense and compiled sparse steps")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend of --compile")
    args = ap.parse_args(argv)
    if not args.methods:
        args.methods = "static,bame"
    if args.quick:
        args.dim, args.hidden, args.depth, args.batch, args.seq = 32, 64, 1, 2, 4
        args.repeats, args.warmup = min(args.repeats, 2), 1
    return args


def make(base: nn.Module, method: str | None, nm: str, kernel: str, fused: bool = False
         ) -> tuple[nn.Module, Any, Any]:
    """A copy of ``base`` with SGD (momentum, weight decay; ``fused``: torch's one-kernel SGD) and, for a
    method, its sparsifier."""
    model = copy.deepcopy(base).train()
    opt = torch.optim.SGD(model.parameters(), lr=common.LR, momentum=common.MOMENTUM,
                          weight_decay=common.WEIGHT_DECAY, **({"fused": True} if fused else {}))
    if method is None:
        return model, opt, None
    h = common.harness_for(method)
    # Every Linear is sparse (the default policy keeps the model's last layer dense; here that would be the
    # last block's fc2, which in a real transformer is an ordinary MLP layer).
    sp = bame.sparsify(model, opt, method, nm, total_steps=common.TOTAL_STEPS, kernel=kernel, verbose=False,
                       layer_filter=lambda name, module: isinstance(module, nn.Linear), **h.options)
    return model, opt, sp


def step_fn(model: Callable[..., Any], opt: Any, sp: Any, x: torch.Tensor, target: torch.Tensor,
            t: int | None) -> Callable[[], None]:
    """One whole training step; ``t`` (harness only) is what ``sparsifier.step_count`` is set to first."""

    def run() -> None:
        if sp is not None and t is not None:
            sp.step_count = t
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x), target).backward()
        opt.step()

    return run


def run_pattern(nm: str, names: list[str], args: argparse.Namespace) -> dict[str, Any]:
    if args.compile:
        # every compiled model of a pattern is another instance of one class, each with its graphs (a phase,
        # the plans chosen): more cache entries of one code object than dynamo's default limit, which a
        # single trained model never reaches
        torch._dynamo.reset()
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch.manual_seed(0)
    base = build_model(args.dim, args.hidden, args.depth)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.seq, args.dim, generator=g)  # (batch, seq, dim)
    target = torch.randn(args.batch, args.seq, args.dim, generator=g)
    cands: dict[str, Callable[[], None]] = {}
    model, opt, _ = make(base, None, nm, "dense", args.fused_sgd)
    cands["dense"] = step_fn(model, opt, None, x, target, None)
    sparsifiers = {}
    for name in names:
        h = common.harness_for(name)
        for kernel, label in (("dense", "masked"), ("sparse", "sparse")):
            model, opt, sp = make(base, name, nm, kernel, args.fused_sgd)
            sparsifiers[f"{name}/{label}"] = sp
            cands[f"{name}/{label}"] = step_fn(model, opt, sp, x, target, h.ordinary_t)
            if h.update_t is not None:  # its own copy: its mask changes would make the ordinary steps repack
                model_u, opt_u, sp_u = make(base, name, nm, kernel, args.fused_sgd)
                sparsifiers[f"{name}/{label}/update"] = sp_u
                cands[f"{name}/{label}/update"] = step_fn(model_u, opt_u, sp_u, x, target, h.update_t)
        if args.compile:
            model, opt, sp = make(base, name, nm, "sparse", args.fused_sgd)
            sparsifiers[f"{name}/sparse/compiled"] = sp
            net = torch.compile(model, backend=args.backend)
            cands[f"{name}/sparse/compiled"] = step_fn(net, opt, sp, x, target, h.ordinary_t)
    if args.compile:
        model, opt, _ = make(base, None, nm, "dense", args.fused_sgd)
        cands["dense/compiled"] = step_fn(torch.compile(model, backend=args.backend), opt, None, x, target, None)
    load_before = list(os.getloadavg())
    common.log(f"{nm}: {len(cands)} candidates x {args.warmup + args.repeats} rounds")
    samples = common.time_round_robin(cands, args.repeats, args.warmup,
                                      on_round=lambda r: [sp.pop_events() for sp in sparsifiers.values()])
    dense = samples["dense"]
    rec: dict[str, Any] = {"dense_ms": common.median(dense), "variants": {}, "samples_ms": samples,
                           "loadavg": {"before": load_before, "after": list(os.getloadavg())}}
    if args.compile:
        rec["dense_compiled_ms"] = common.median(samples["dense/compiled"])
    for name in names:
        h = common.harness_for(name)
        for label in ("masked", "sparse") + (("sparse/compiled",) if args.compile else ()):
            key = f"{name}/{label}"
            ordi = samples[key]
            v: dict[str, Any] = {
                "ordinary_ms": common.median(ordi),
                "ordinary_speedup": common.median(dense) / common.median(ordi),
                "ordinary_speedup_paired_iqr": common.quartiles(common.paired_ratios(dense, ordi)),
                "update_ms": None,
            }
            amortised = v["ordinary_ms"]
            if h.update_t is not None and f"{key}/update" in samples:
                v["update_ms"] = common.median(samples[f"{key}/update"])
                amortised = ((common.DELTA_T - 1) * v["ordinary_ms"] + v["update_ms"]) / common.DELTA_T
            v["amortised_ms"] = amortised
            v["amortised_speedup"] = common.median(dense) / amortised
            if label == "sparse/compiled":
                v["compiled_dense_speedup"] = rec["dense_compiled_ms"] / v["ordinary_ms"]
            if label == "sparse":
                v["layers"] = {r["name"]: r["kernel"] for r in sparsifiers[key].layer_report() if r["sparse"]}
            rec["variants"][key] = v
    return rec


def print_tables(result: dict[str, Any]) -> None:
    m, c = result["machine"], result["config"]
    print(f"bench_kernel_step  torch {m['torch']}  threads {m['threads']}  {c['depth']} blocks "
          f"{c['dim']}->{c['hidden']}->{c['dim']}  tokens {c['tokens']}  repeats {c['repeats']}  "
          f"native kernels: {c['native']}  optimizer: {'SGD(fused=True)' if c.get('fused_sgd') else 'SGD'}")
    for nm, rec in result["patterns"].items():
        compiled = f", compiled {rec['dense_compiled_ms']:.1f}" if "dense_compiled_ms" in rec else ""
        print(f"\n{nm}: dense {rec['dense_ms']:.1f}{compiled} ms/step (median)")
        rows = []
        for key, v in rec["variants"].items():
            iqr = v["ordinary_speedup_paired_iqr"]
            rows.append([key, v["ordinary_ms"], v["ordinary_speedup"], f"{iqr[0]:.2f}-{iqr[1]:.2f}",
                         v["update_ms"], v["amortised_ms"], v["amortised_speedup"]])
        print(common.format_table(["variant", "ord ms", "dense/ord", "paired IQR", "update ms", "amort@100 ms",
                                   "dense/amort"], rows))
        for key, v in rec["variants"].items():
            if "layers" in v:
                print(f"  plans of {key}:")
                for name, note in v["layers"].items():
                    print(f"    {name}: {note}")
    print("\ntargets:")
    for t in result["targets"]:
        print(f"  [{'PASS' if t['pass'] else 'FAIL'}] {t['target']}: {t['value']:.2f}x")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    common.apply_threads(args.threads)
    names = common.method_names(args.methods)
    result: dict[str, Any] = {
        "benchmark": "bench_kernel_step", "machine": common.machine_info(),
        "config": {"dim": args.dim, "hidden": args.hidden, "depth": args.depth, "batch": args.batch,
                   "seq": args.seq, "tokens": args.batch * args.seq, "repeats": args.repeats,
                   "warmup": args.warmup, "fused_sgd": args.fused_sgd, "quick": args.quick, "methods": names,
                   "compile": args.backend if args.compile else None,
                   "delta_t": common.DELTA_T,
                   "lr": common.LR, "momentum": common.MOMENTUM, "weight_decay": common.WEIGHT_DECAY,
                   "native": "available" if native.available() else native.unavailable_reason()},
        "patterns": {},
    }
    for nm in [p.strip() for p in args.patterns.split(",") if p.strip()]:
        result["patterns"][nm] = run_pattern(nm, names, args)
    result["targets"] = []
    for nm, rec in result["patterns"].items():
        for name in names:
            if nm in TARGETS:
                v = rec["variants"][f"{name}/sparse"]
                result["targets"].append({
                    "target": f"{name} sparse at {nm}: whole step >= {TARGETS[nm]}x dense (amortised)",
                    "nm": nm, "method": name, "value": v["amortised_speedup"], "limit": TARGETS[nm],
                    "pass": bool(v["amortised_speedup"] >= TARGETS[nm])})
    result["loadavg_end"] = list(os.getloadavg())
    result["bame_source_end"] = common.check_source(result["machine"]["bame_source"])
    common.write_json(args.out, result)
    print_tables(result)
    return result


if __name__ == "__main__":
    main()
