"""Training-step time of every registered method relative to dense training of the same model.

One process, one model copy + SGD optimizer (momentum 0.9) per method, all built from the same
initial weights, trained on the same random batch. Every timed sample is one full iteration:
``zero_grad``, forward, cross-entropy, backward, ``optimizer.step()`` with the sparsifier's step pre- and
post-hooks (which include ``prepare`` of the next iteration). All candidates run interleaved:
in each repeat, round-robin over (baseline, every method's ordinary iteration, every method's update
iteration), the starting candidate rotating; the median over the repeats after warm-up is reported.

* ``baseline``: plain PyTorch, no bame at all; every ratio is relative to it.
* ordinary iteration: the method's steady sparse phase (see ``common.HARNESS``: e.g. BAME with
  ``t_i=0, t_f=10**9, delta_t=100`` and ``sparsifier.step_count = 101`` before each timed step).
* update iteration: BAME-family ``t % delta_t == 0`` (``sparsifier.step_count = 100``); Bi-Mask's permutation
  search (``sparsifier.step_count = 99``: the search for iteration 100 runs in the post-hook of 99). Setting
  ``sparsifier.step_count`` by hand is a harness device, not library behaviour.
* amortised at delta_t = 100: ``(99 * ordinary + 1 * update) / 100``, relative to the baseline.

    python benchmarks/bench_step.py --repeats 10 --out results/bench_step.json
    python benchmarks/bench_step.py --quick --out /tmp/bench_step.json
    python benchmarks/bench_step.py --models mlp --methods bame --profile bame   # where the time goes
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import common
import torch
from common import Workload

TARGETS = (  # (method, key of its record, limit, text): the project's targets, checked on every model
    ("bame", "ordinary_ratio", 1.05, "BAME ordinary iteration <= 1.05x dense"),
    ("bame", "update_added", 0.02, "BAME update iteration amortised over delta_t=100 adds <= 2% of dense"),
    ("sr_ste", "ordinary_ratio", 1.15, "SR-STE iteration <= 1.15x dense"),
    ("bi_mask", "update_added_own", 0.05, "Bi-Mask permutation search amortised <= 5% of its own iteration"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(ap, "results/bench_step.json", default_repeats=10)
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--inner", type=int, default=1, help="consecutive steps per sample (their mean)")
    ap.add_argument("--nm", default="2:4", help="the N:M pattern of every method")
    ap.add_argument("--models", default="resnet32,mlp,vit", help="comma-separated: resnet32, mlp, vit")
    ap.add_argument("--batch", type=int, default=128,
                    help="images per batch (one token row each for the mlp, 65 tokens for the vit)")
    ap.add_argument("--profile", default="", help="after timing, profile this method's iterations and dense")
    ap.add_argument("--profile-steps", type=int, default=3)
    return ap.parse_args(argv)


def build(wl: Workload, names: list[str], nm: str) -> tuple[dict[str, common.Trainee], torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    base = wl.build()
    trainees = {"baseline": common.make_trainee(base, None, nm)}
    for name in names:
        trainees[name] = common.make_trainee(base, name, nm)
    x, y = wl.data()
    return trainees, x, y


def candidates(trainees: dict[str, common.Trainee], x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """``{"baseline": fn, "<method>/ordinary": fn, "<method>/update": fn}``."""
    cands = {"baseline": trainees["baseline"].step_fn(x, y, None)}
    for name, tr in trainees.items():
        if name == "baseline":
            continue
        h = common.harness_for(name)
        cands[f"{name}/ordinary"] = tr.step_fn(x, y, h.ordinary_t)
        if h.update_t is not None:
            cands[f"{name}/update"] = tr.step_fn(x, y, h.update_t)
    return cands


def summarise(
    name: str, tr: common.Trainee, samples: dict[str, list[float]], cpu: dict[str, list[float]], updates: int
) -> dict[str, Any]:
    """One method's record: medians, ratios to the baseline, amortised cost, phases; and the same
    ratios in process CPU time (``cpu_*``), a cross-check less disturbed by other jobs."""
    h = common.harness_for(name)
    base = samples["baseline"]
    dense = common.median(base)
    ordi = samples[f"{name}/ordinary"]
    sp, method = tr.sparsifier, tr.sparsifier.method
    rec: dict[str, Any] = {
        "options": h.options, "note": h.note, "sparse_layers": len(sp.layers),
        "ordinary_t": h.ordinary_t, "ordinary_phase": method.phase_of(h.ordinary_t),
        "ordinary_ms": common.median(ordi), "ordinary_ratio": common.median(ordi) / dense,
        "ordinary_ratio_paired_iqr": common.quartiles(common.paired_ratios(ordi, base)),
        "update_t": h.update_t, "update_phase": None, "update_ms": None, "update_ratio": None,
        "update_added": 0.0, "update_added_own": 0.0, "mask_update_events": updates,
        "samples_ms": {"ordinary": ordi},
    }
    amortised = rec["ordinary_ms"]
    if h.update_t is not None:
        upd = samples[f"{name}/update"]
        extra = (common.median(upd) - rec["ordinary_ms"]) / common.DELTA_T  # per iteration, amortised
        rec.update(
            update_phase=method.phase_of(h.update_t), update_ms=common.median(upd),
            update_ratio=common.median(upd) / dense, update_added=extra / dense,
            update_added_own=extra / rec["ordinary_ms"], samples_ms={"ordinary": ordi, "update": upd},
        )
        amortised = ((common.DELTA_T - 1) * rec["ordinary_ms"] + rec["update_ms"]) / common.DELTA_T
    rec["amortised_ms"] = amortised
    rec["amortised_ratio"] = amortised / dense
    cpu_dense, cpu_ord = common.median(cpu["baseline"]), common.median(cpu[f"{name}/ordinary"])
    rec["cpu_ordinary_ratio"] = cpu_ord / cpu_dense
    rec["cpu_update_added"] = rec["cpu_update_added_own"] = None
    if h.update_t is not None:
        cpu_extra = (common.median(cpu[f"{name}/update"]) - cpu_ord) / common.DELTA_T
        rec["cpu_update_added"], rec["cpu_update_added_own"] = cpu_extra / cpu_dense, cpu_extra / cpu_ord
    rec["cpu_samples_ms"] = {k.split("/")[1]: v for k, v in cpu.items() if k.startswith(f"{name}/")}
    return rec


def run_workload(wl: Workload, names: list[str], args: argparse.Namespace) -> dict[str, Any]:
    load_before = list(os.getloadavg())
    trainees, x, y = build(wl, names, args.nm)
    cands = candidates(trainees, x, y)
    updates = {n: 0 for n in names}

    def drain(r: int) -> None:  # count recorded mask updates (BAME family) and keep memory flat
        for n in names:
            updates[n] += len(trainees[n].sparsifier.pop_events())
        common.log(f"  {wl.name}: round {r + 1}/{args.warmup + args.repeats} done, load {os.getloadavg()[0]:.2f}")

    common.log(f"{wl.name}: {len(cands)} candidates x {args.warmup + args.repeats} rounds")
    cpu: dict[str, list[float]] = {}
    samples = common.time_round_robin(cands, args.repeats, args.warmup, args.inner, on_round=drain, cpu_out=cpu)
    params = sum(p.numel() for p in trainees["baseline"].model.parameters())
    record = {
        **wl.describe(), "params": params, "nm": args.nm,
        "baseline_ms": common.median(samples["baseline"]),
        "samples_ms": {"baseline": samples["baseline"]}, "cpu_samples_ms": {"baseline": cpu["baseline"]},
        "cpu_baseline_ms": common.median(cpu["baseline"]),
        "methods": {n: summarise(n, trainees[n], samples, cpu, updates[n]) for n in names},
        "loadavg": {"before": load_before, "after": list(os.getloadavg())},
    }
    if args.profile:
        record["profile"] = profile(trainees, x, y, args.profile, args.profile_steps)
    return record


def profile(trainees: dict[str, common.Trainee], x, y, name: str, steps: int) -> dict[str, Any]:
    """Where the time goes: torch.profiler self-CPU time of the baseline and of the method's ordinary and
    update iterations, per (aten op, innermost bame/ or benchmarks/ source line that called it).
    Printed, and returned for the JSON."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    h = common.harness_for(name)
    kinds = {"baseline": trainees["baseline"].step_fn(x, y, None),
             f"{name}/ordinary": trainees[name].step_fn(x, y, h.ordinary_t)}
    if h.update_t is not None:
        kinds[f"{name}/update"] = trainees[name].step_fn(x, y, h.update_t)
    out = {}
    for kind, fn in kinds.items():
        fn()  # warm
        with torch_profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
            for _ in range(steps):
                fn()
        out[kind] = attribute(prof.events(), steps)
        total = sum(r["self_cpu_ms"] for r in out[kind])
        print(f"\n== profile: {kind}: {total:.0f} ms self CPU per iteration; top call sites ==")
        print(common.format_table(["ms/iter", "share", "calls/iter", "op", "called from"], [
            [r["self_cpu_ms"], f"{100 * r['self_cpu_ms'] / total:.1f}%", r["calls"], r["op"][:40], r["site"]]
            for r in out[kind][:20]]))
    return out


def attribute(events, steps: int) -> list[dict[str, Any]]:
    """Self CPU time per (aten op, innermost enclosing Python frame in bame/), ms per iteration.

    With ``with_stack=True`` the profiler records Python frames as events (``".../bame/nm.py(131):
    topn_mask"``); an op's site is its nearest such ancestor in the event tree.
    """
    acc: dict[tuple[str, str], list[float]] = {}
    for e in events:
        if e.self_cpu_time_total <= 0 or "/bame/" in e.name:
            continue
        parent, site = e.cpu_parent, "(not under bame/: model, autograd, optimizer)"
        while parent is not None:
            if "/bame/" in parent.name:
                site = "bame/" + parent.name.split("/bame/", 1)[1]
                break
            parent = parent.cpu_parent
        entry = acc.setdefault((e.name, site), [0.0, 0])
        entry[0] += e.self_cpu_time_total / 1e3 / steps
        entry[1] += 1
    rows = [{"op": op, "site": site, "self_cpu_ms": v[0], "calls": round(v[1] / steps, 1)}
            for (op, site), v in acc.items()]
    return sorted(rows, key=lambda r: r["self_cpu_ms"], reverse=True)


def evaluate_targets(models: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for model, rec in models.items():
        for method, metric, limit, text in TARGETS:
            if method not in rec["methods"]:
                continue
            value, cpu_value = rec["methods"][method][metric], rec["methods"][method][f"cpu_{metric}"]
            rows.append({"target": text, "model": model, "method": method, "metric": metric,
                         "value": value, "limit": limit, "pass": bool(value <= limit),
                         "cpu_value": cpu_value, "cpu_pass": bool(cpu_value <= limit)})
    return rows


def print_tables(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(f"bench_step  torch {m['torch']}  threads {m['threads']}  N:M {result['config']['nm']}  "
          f"repeats {result['config']['repeats']}  loadavg {m['loadavg'][0]:.2f} -> {result['loadavg_end'][0]:.2f}")
    for model, rec in result["models"].items():
        print(f"\n{model} (batch {rec['batch']}, {rec['params'] / 1e6:.2f}M params): "
              f"dense baseline {rec['baseline_ms']:.1f} ms/iteration (median)")
        rows = []
        for name, r in rec["methods"].items():
            iqr = r["ordinary_ratio_paired_iqr"]
            rows.append([
                name, r["ordinary_phase"], r["ordinary_ms"], r["ordinary_ratio"], f"{iqr[0]:.2f}-{iqr[1]:.2f}",
                r["update_phase"], r["update_ms"], r["update_ratio"], r["amortised_ratio"],
                f"{100 * r['update_added']:+.2f}%" if r["update_t"] is not None else "-",
                r["cpu_ordinary_ratio"],
                f"{100 * r['cpu_update_added']:+.2f}%" if r["update_t"] is not None else "-",
            ])
        if "dense" in rec["methods"]:
            aa = rec["methods"]["dense"]
            print(f"A/A control: the 'dense' method does the baseline's work (plus two no-op hooks): "
                  f"{aa['ordinary_ratio']:.3f}x wall, {aa['cpu_ordinary_ratio']:.3f}x CPU = this run's noise")
        print(common.format_table(
            ["method", "phase", "ord ms", "ord/dense", "paired IQR", "update kind", "upd ms", "upd/dense",
             "amort@100/dense", "upd adds/dense", "cpu ord/dense", "cpu upd adds"], rows))
    print("\ntargets:")
    for t in result["targets"]:
        print(f"  [{'PASS' if t['pass'] else 'FAIL'}] {t['model']:>8}: {t['target']}: {t['value']:.4f} "
              f"(limit {t['limit']}; CPU-time cross-check {t['cpu_value']:.4f} "
              f"{'pass' if t['cpu_pass'] else 'fail'})")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = min(args.repeats, 2), 1
    common.apply_threads(args.threads)
    names = common.method_names(args.methods)
    result: dict[str, Any] = {
        "benchmark": "bench_step", "machine": common.machine_info(),
        "config": {"repeats": args.repeats, "warmup": args.warmup, "inner": args.inner, "nm": args.nm,
                   "quick": args.quick, "methods": names, "delta_t": common.DELTA_T, "lr": common.LR,
                   "momentum": common.MOMENTUM, "weight_decay": common.WEIGHT_DECAY},
        "models": {},
    }
    for wl in common.workloads(args):
        result["models"][wl.name] = run_workload(wl, names, args)
    result["loadavg_end"] = list(os.getloadavg())
    result["bame_source_end"] = common.check_source(result["machine"]["bame_source"])
    result["targets"] = evaluate_targets(result["models"])
    common.write_json(args.out, result)
    print_tables(result)
    return result


if __name__ == "__main__":
    main()
