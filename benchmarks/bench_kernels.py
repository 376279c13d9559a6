"""Dense vs. planned N:M-sparse Linear products, and a whole forward+backward, on wide layers.

For each ``out x in`` shape and N:M pattern: pick a plan with :func:`bame.kernels.choose_plan`, then time,
interleaved (median of ``--repeats`` after warm-up):

* fwd   ``F.linear(x, W)``             vs. the plan's forward formulation
* dX    ``dY @ W``                     vs. the plan's input-gradient formulation
* dW    ``dY^T @ x`` (dense)           vs. the plan's weight gradient at kept slots (values only)
        (for a product the plan keeps dense: the fastest sparse formulation the planner timed, to show
        by how much it lost)
* step  ``F.linear`` autograd fwd+bwd  vs. ``NMLinearFunction`` fwd+bwd (dW scattered into a dense grad), or
        ``F.linear`` again when the plan is all dense (what ``kernel="sparse"`` then runs)
* step* the same with ``dense_wgrad=True`` (a mask-update iteration)

The dense baseline uses a weight that is already masked (no ``W*B`` product), so ratios are conservative.
Threads are left at torch's default unless ``--threads`` is given.

    python benchmarks/bench_kernels.py --repeats 10 --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bame.kernels import Plan, choose_plan, nm_linear, pack, random_nm_mask
from bame.kernels.linear import FORWARD, INPUT_GRAD, WEIGHT_GRAD
from bame.kernels.plan import time_interleaved

COLUMNS = ("fwd", "dx", "dw", "step", "step*")


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="1024x1024,4096x4096,4096x1024", help="out x in, comma-separated")
    ap.add_argument("--patterns", default="1:16,1:4,2:4", help="N:M patterns, comma-separated")
    ap.add_argument("--tokens", type=int, default=256, help="rows of the flattened input (batch x sequence)")
    ap.add_argument("--repeats", type=int, default=10, help="timed runs per candidate (median taken)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs per candidate first")
    ap.add_argument("--plan-repeats", type=int, default=5, help="repeats choose_plan times each formulation")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = leave the default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    return ap.parse_args()


def candidates(
    out: int, in_: int, n: int, m: int, tokens: int, device: str, plan_repeats: int
) -> tuple[dict, dict]:
    """The plan and the ``{"<column>/<dense|sparse>": closure}`` to time for one shape and pattern."""
    plan = choose_plan(out, in_, n, m, tokens, device=device, repeats=plan_repeats, use_cache=False)
    mask = random_nm_mask(out, in_, n, m, device)
    w = (torch.randn(out, in_, device=device) * mask).requires_grad_()  # (out, in), zero where pruned
    b = torch.zeros(out, device=device, requires_grad=True)
    packed = pack(w.detach(), mask, n, m)
    packed.transposed()  # built once per mask update, not per step
    x = torch.randn(tokens, in_, device=device, requires_grad=True)  # (T, in)
    dy = torch.randn(tokens, out, device=device)  # (T, out)
    wd, xd = w.detach(), x.detach()

    def step(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            w.grad = x.grad = b.grad = None  # as after optimizer.zero_grad(set_to_none=True)
            fn().backward(dy)

        return run

    # Per product: the plan's formulation, or where the plan keeps dense, the fastest sparse one it timed.
    timed = {c: getattr(plan, c) if getattr(plan, c) != "dense" else fastest_sparse(plan, c) for c in PRODUCTS}
    cands = {
        "fwd/dense": lambda: F.linear(xd, wd),
        "fwd/sparse": lambda: FORWARD[timed["fwd"]](xd, packed, plan.tile),
        "dx/dense": lambda: dy @ wd,
        "dx/sparse": lambda: INPUT_GRAD[timed["dx"]](dy, packed, plan.tile),
        "dw/dense": lambda: dy.t() @ xd,
        "dw/sparse": lambda: WEIGHT_GRAD[timed["dw"]](dy, xd, packed),
        "step/dense": step(lambda: F.linear(x, w, b)),
        # As `kernel="sparse"` runs a layer: the module's own dense forward when the plan is all dense, else
        # NMLinearFunction on the masked weight (the parametrization's W*B).
        "step/sparse": step(lambda: F.linear(x, w, b) if plan.is_dense else nm_linear(x, w, packed, None, b, plan,
                                                                                      False, True)),
        "step*/sparse": step(lambda: F.linear(x, w, b) if plan.is_dense else nm_linear(x, w, packed, None, b, plan,
                                                                                       True, True)),
    }
    return {**plan.to_dict(), "timed": timed}, cands


PRODUCTS = ("fwd", "dx", "dw")


def fastest_sparse(plan: Plan, product: str) -> str:
    """The fastest non-dense formulation of ``product`` in the plan's own timings."""
    times = {k: v for k, v in plan.timings_ms[product].items() if k != "dense"}
    return min(times, key=times.__getitem__)


def run_one(shape: str, pattern: str, args: argparse.Namespace) -> dict:
    """Time one shape and pattern; return its JSON record."""
    out, in_ = (int(v) for v in shape.split("x"))
    n, m = (int(v) for v in pattern.split(":"))
    load_before = os.getloadavg()[0]
    plan, cands = candidates(out, in_, n, m, args.tokens, args.device, args.plan_repeats)
    ms = time_interleaved(cands, torch.device(args.device), args.repeats, args.warmup)
    ms["step*/dense"] = ms["step/dense"]  # dense training always computes the full dW
    speedup = {c: ms[f"{c}/dense"] / ms[f"{c}/sparse"] for c in COLUMNS}
    return {
        "shape": shape,
        "pattern": pattern,
        "tokens": args.tokens,
        "plan": plan,
        "ms": ms,
        "speedup": speedup,
        "loadavg_1min": [load_before, os.getloadavg()[0]],
    }


def table(records: list[dict]) -> str:
    """A text table: per row the plan, then dense ms / sparse ms / speed-up for each column."""
    head = f"{'shape':>10} {'N:M':>5} {'plan fwd/dX/dW':>40} " + " ".join(f"{c:>21}" for c in COLUMNS)
    head += "  load (1-min avg before-after: other processes distort timings)"
    lines = [head, " " * 58 + "(dense ms / sparse ms = speed-up; where the plan keeps dense: the fastest sparse"
             " formulation it timed, in brackets)", "-" * len(head)]
    for r in records:
        p, ms = r["plan"], r["ms"]
        cells = " ".join(
            f"{ms[c + '/dense']:7.1f}/{ms[c + '/sparse']:6.1f}={r['speedup'][c]:4.2f}x" for c in COLUMNS
        )
        load = "{:.1f}-{:.1f}".format(*r["loadavg_1min"])
        names = "/".join(p[c] if p[c] != "dense" else f"dense({p['timed'][c]})" for c in PRODUCTS)
        lines.append(f"{r['shape']:>10} {r['pattern']:>5} {names:>40} {cells}  {load}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    """Run every shape x pattern, print the table, write the JSON."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    records = []
    for shape in args.shapes.split(","):
        for pattern in args.patterns.split(","):
            records.append(run_one(shape, pattern, args))
            print(f"{shape} {pattern}: {records[-1]['plan']['reason']}", flush=True)
    print(table(records))
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "device": args.device,
        "repeats": args.repeats,
        "warmup": args.warmup,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": records}, f, indent=2)


if __name__ == "__main__":
    main(parse_args())
