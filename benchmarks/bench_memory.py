"""Peak resident memory of training, dense against every registered method.

Each measurement runs in a fresh subprocess (``--child``), so no allocation of one method can hide
another's: it builds the model, batch and SGD optimizer, reads its resident set size (the *baseline*,
``/proc/self/statm``), attaches the method (so masks and method state count against it), runs a few
training iterations - ordinary, update (where the method has one, see ``common.HARNESS``), ordinary
- and reads the peak, ``resource.getrusage(RUSAGE_SELF).ru_maxrss``. Reported: peak minus baseline
in MB, and its ratio to the plain PyTorch baseline's (``baseline``: no bame at all). The first
iterations also create the optimizer's momentum buffers, which count for every row alike.

    python benchmarks/bench_memory.py --repeats 1 --out results/bench_memory.json
    python benchmarks/bench_memory.py --quick --out /tmp/bench_memory.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import common
import torch
from common import Workload
from torch import nn

MB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(ap, "results/bench_memory.json", default_repeats=1)
    ap.add_argument("--nm", default="2:4", help="the N:M pattern of every method")
    ap.add_argument("--models", default="resnet32,mlp,vit", help="comma-separated: resnet32, mlp, vit")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)  # internal: one measurement
    return ap.parse_args(argv)


# -- child: one measurement ----------------------------------------------------------------------------------
def rss_bytes() -> int:
    """The current resident set size (Linux ``/proc/self/statm``; else the peak so far)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return maxrss_bytes()


def maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def warm_up(method: str, nm: str) -> None:
    """A few iterations of a tiny model with the same method first, so that lazily loaded code and the
    one-time buffers of autograd, oneDNN, the optimizer and bame (about 0.2 GB here) are resident before
    the baseline is read and count for no row."""
    tiny = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 16), nn.GELU(), nn.LayerNorm(16),
        nn.Linear(16, 10),
    )
    trainee = common.make_trainee(tiny, None if method == "baseline" else method, nm)
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,))
    for t in steps_of(method):
        trainee.step_fn(x, y, t)()
    del trainee, tiny
    gc.collect()


def steps_of(method: str) -> list[int]:
    """Ordinary, update (if the method has one), ordinary: the peak covers both kinds."""
    h = common.harness_for(method)
    return [h.ordinary_t] + ([h.update_t] if h.update_t is not None else []) + [h.ordinary_t]


def child(spec: dict[str, Any]) -> dict[str, Any]:
    common.apply_threads(spec["threads"])
    wl = Workload(**spec["workload"])
    method = spec["method"]
    warm_up(method, spec["nm"])
    torch.manual_seed(0)
    base = wl.build()
    x, y = wl.data()
    baseline = rss_bytes()
    trainee = common.make_trainee(base, None if method == "baseline" else method, spec["nm"], copy_model=False)
    ts = steps_of(method)
    for t in ts:
        trainee.step_fn(x, y, t)()
    peak = maxrss_bytes()
    return {"baseline_mb": baseline / MB, "peak_mb": peak / MB, "delta_mb": (peak - baseline) / MB,
            "end_rss_mb": rss_bytes() / MB, "steps": ts}


def run_child(wl: Workload, method: str, args: argparse.Namespace) -> dict[str, Any]:
    spec = {"workload": asdict(wl), "method": method, "nm": args.nm, "threads": args.threads}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child for {wl.name}/{method} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- parent --------------------------------------------------------------------------------------------------
def run_workload(wl: Workload, names: list[str], args: argparse.Namespace) -> dict[str, Any]:
    load_before = list(os.getloadavg())
    entries = ["baseline", *names]
    runs: dict[str, list[dict[str, Any]]] = {e: [] for e in entries}
    for r in range(args.repeats):
        for e in entries[r % len(entries):] + entries[:r % len(entries)]:
            runs[e].append(run_child(wl, e, args))
            common.log(f"  {wl.name}/{e}: +{runs[e][-1]['delta_mb']:.0f} MB")
    delta = {e: common.median([run["delta_mb"] for run in runs[e]]) for e in entries}
    rows = {}
    for e in entries:
        rows[e] = {
            "delta_mb": delta[e], "ratio": _ratio(delta[e], delta["baseline"]),
            "ratio_to_dense_method": _ratio(delta[e], delta["dense"]) if "dense" in delta else None,
            "baseline_mb": common.median([run["baseline_mb"] for run in runs[e]]),
            "peak_mb": common.median([run["peak_mb"] for run in runs[e]]),
            "runs": runs[e],
        }
    return {**wl.describe(), "nm": args.nm, "methods": rows,
            "loadavg": {"before": load_before, "after": list(os.getloadavg())}}


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def print_tables(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(f"bench_memory  torch {m['torch']}  threads {m['threads']}  N:M {result['config']['nm']}  "
          f"repeats {result['config']['repeats']}  (peak RSS during training minus RSS after building)")
    for model, rec in result["models"].items():
        print(f"\n{model} (batch {rec['batch']})")
        rows = [[name, r["baseline_mb"], r["peak_mb"], r["delta_mb"], r["ratio"]]
                for name, r in rec["methods"].items()]
        print(common.format_table(["method", "after build MB", "peak MB", "training MB", "x baseline"], rows))


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return None
    if args.quick:
        args.repeats = 1
    common.apply_threads(args.threads)
    names = common.method_names(args.methods)
    result: dict[str, Any] = {
        "benchmark": "bench_memory", "machine": common.machine_info(),
        "config": {"repeats": args.repeats, "nm": args.nm, "quick": args.quick, "methods": names,
                   "threads": args.threads or torch.get_num_threads()},
        "models": {},
    }
    for wl in common.workloads(args):
        result["models"][wl.name] = run_workload(wl, names, args)
    result["loadavg_end"] = list(os.getloadavg())
    result["bame_source_end"] = common.check_source(result["machine"]["bame_source"])
    common.write_json(args.out, result)
    print_tables(result)
    return result


if __name__ == "__main__":
    main()
