"""Shared pieces of the benchmark scripts: machine facts, interleaved timing, the per-method harness,
tables and JSON.

Timing rule (STYLE.md, "Runs are evidence"): speed is only ever reported as a *ratio measured within
one process*, with every candidate run interleaved (round-robin, the starting candidate rotating each
repeat) so that drifting load from other jobs hits all of them alike, and the median of the repeats
after warm-up is taken. Absolute milliseconds are printed too, but they depend on the machine's load.

The harness (:data:`HARNESS`) is benchmark scaffolding, not library behaviour: it gives each registered
method the options that put a chosen iteration in its steady sparse phase, and the iteration index to
set ``sparsifier.step_count`` to before a timed step of each kind (``"ordinary"`` or ``"update"``). Setting
``sparsifier.step_count`` by hand lets one run time the same kind of iteration over and over; in training
the index only ever increases.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import bame
from bame import methods, models

TOTAL_STEPS = 10**9  # a run so long that every timed index lies well inside the chosen phase
DELTA_T = 100  # BAME's mask-update interval (the paper's best, Fig. 3) and Bi-Mask's perm_interval
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4  # plain SGD with momentum, as in the CIFAR recipes


# -- the per-method harness ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Harness:
    """How to time one method.

    Attributes:
        options: the method's options (passed to ``bame.sparsify``) that make ``ordinary_t`` a steady
            sparse iteration.
        ordinary_t: the value of ``sparsifier.step_count`` before a timed ordinary iteration.
        update_t: the value before a timed mask-update iteration, or None if the method has none.
        note: what an update iteration does, and why ``update_t`` is that index.
    """

    options: dict[str, Any] = field(default_factory=dict)
    ordinary_t: int = DELTA_T + 1
    update_t: int | None = None
    note: str = ""


#: The BAME family timed in its evolution phase: every timed index inside [t_i, t_f).
EVOLUTION = {"t_i": 0, "t_f": TOTAL_STEPS, "delta_t": DELTA_T}
_EVOLUTION_NOTE = (
    "t % delta_t == 0 in [t_i, t_f): the dense G of the iteration feeds the mask update in the step pre-hook"
)

#: Per registered method. A method missing here is timed with its default options at ``fallback_t``.
HARNESS: dict[str, Harness] = {
    "dense": Harness(),
    "static": Harness(),
    "asp": Harness({"prune_at": 0}, note="pruned once at t=0; timed in the fine-tuning phase"),
    "sr_ste": Harness(note="recomputes top-N |W| before every iteration: that is its ordinary cost"),
    "rigl_nm": Harness(dict(EVOLUTION), update_t=DELTA_T, note=_EVOLUTION_NOTE),
    "lma": Harness(dict(EVOLUTION), update_t=DELTA_T, note=_EVOLUTION_NOTE),
    "bame": Harness(dict(EVOLUTION), update_t=DELTA_T, note=_EVOLUTION_NOTE),
    "bame_bi": Harness(dict(EVOLUTION), update_t=DELTA_T, note=_EVOLUTION_NOTE),
    # The search for iteration t runs in prepare(t), i.e. in the step post-hook of iteration t - 1.
    "bi_mask": Harness({"perm_interval": DELTA_T}, update_t=DELTA_T - 1,
                       note="permutation search for t % perm_interval == 0 runs in the post-hook of t - 1"),
    # Removal window [0, 2000): at t = 1000 alpha is trained every iteration (LBC's steady cost); the
    # one-off candidate removal happens in the warm-up (card only falls, so it cannot be repeated).
    "lbc": Harness({"t_i": 0, "t_f": 2000, "granularity": "iteration"}, ordinary_t=1000,
                   note="candidate removals (C-1 in a run) are not timed"),
    "maxq": Harness({"decay_start": 0, "decay_end": 0}, note="the N:M phase; soft scores every iteration"),
}


def harness_for(name: str) -> Harness:
    """The harness of a method; an unlisted one is timed late in a run with its default options."""
    return HARNESS.get(name, Harness(ordinary_t=TOTAL_STEPS - 10, note="no harness entry: default options"))


def method_names(selected: str = "") -> list[str]:
    """Every registered method (paper order), or the comma-separated ``selected`` ones."""
    names = list(methods.available())
    if not selected:
        return names
    wanted = [s.strip() for s in selected.split(",") if s.strip()]
    unknown = [w for w in wanted if w not in names and w != "baseline"]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; registered: {', '.join(names)}")
    return [w for w in wanted if w != "baseline"]


# -- models and training steps -------------------------------------------------------------------------------
@dataclass
class Workload:
    """A model factory call and the batch it trains on."""

    name: str  # the key in the JSON
    model: str  # a name for bame.models.create
    kwargs: dict[str, Any]
    batch: int
    image_size: int = 32
    num_classes: int = 10

    def build(self) -> nn.Module:
        return models.create(
            self.model, num_classes=self.num_classes, image_size=self.image_size, **self.kwargs
        )

    def data(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(self.batch, 3, self.image_size, self.image_size, generator=g)
        y = torch.randint(0, self.num_classes, (self.batch,), generator=g)
        return x, y

    def describe(self) -> dict[str, Any]:
        return {"model": self.model, "kwargs": self.kwargs, "batch": self.batch, "image_size": self.image_size}


@dataclass
class Trainee:
    """One model copy, its optimizer and (unless it is the plain baseline) its sparsifier."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    sparsifier: Any | None  # bame.sparsifier.Sparsifier

    def step_fn(self, x: torch.Tensor, y: torch.Tensor, t: int | None) -> Callable[[], None]:
        """One full training iteration: zero_grad, forward, loss, backward, optimizer step (with the
        sparsifier's hooks). ``t``: the value ``sparsifier.step_count`` is set to first (harness only)."""
        model, opt, sp = self.model, self.optimizer, self.sparsifier

        def run() -> None:
            if sp is not None and t is not None:
                sp.step_count = t
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        return run


def make_trainee(base: nn.Module, method: str | None, nm: str, copy_model: bool = True) -> Trainee:
    """A deep copy of ``base`` (or ``base`` itself) with SGD (momentum 0.9) and, for a method name,
    ``bame.sparsify``."""
    model = copy.deepcopy(base) if copy_model else base
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    if method is None:
        return Trainee(model, opt, None)
    h = harness_for(method)
    sp = bame.sparsify(model, opt, method, nm, total_steps=TOTAL_STEPS, verbose=False, **h.options)
    return Trainee(model, opt, sp)


# -- timing ---------------------------------------------------------------------------------------------------
def balanced_orders(n: int) -> list[list[int]]:
    """Run orders of ``n`` candidates balanced for first-order carryover (Williams' Latin square).

    Every candidate takes every position once per cycle, and every ordered pair ``(a, b)`` with ``b``
    right after ``a`` occurs exactly once (``n`` even: ``n`` orders) or twice (``n`` odd: ``2n`` orders,
    each order followed by its reverse).
    """
    first, low, high = [0], 1, n - 1
    while low <= high:  # 0, 1, n-1, 2, n-2, ...
        first.append(low)
        low += 1
        if low <= high:
            first.append(high)
            high -= 1
    rows = [[(i + r) % n for i in first] for r in range(n)]
    if n % 2:
        rows = [order for row in rows for order in (row, row[::-1])]
    return rows


def time_round_robin(
    cands: dict[str, Callable[[], None]],
    repeats: int,
    warmup: int,
    inner: int = 1,
    on_round: Callable[[int], None] | None = None,
    cpu_out: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Milliseconds per call of every candidate, interleaved.

    Each of ``warmup + repeats`` rounds runs every candidate once (``inner`` consecutive calls, the
    sample being their mean), in the orders of :func:`balanced_orders`: over a cycle of rounds each
    candidate runs at every position and right after every other candidate equally often. (With a fixed
    cyclic order a candidate always follows the same one, whose cache footprint it inherits: a model that
    shares its weights with its predecessor starts warm, every round.) Warm-up rounds are dropped.
    ``gc.collect()`` runs between rounds, outside the timed region.

    Args:
        cpu_out: if given, filled with the process CPU time (all threads, ``time.process_time``) of the
            same calls, in ms. Wall time is the headline; CPU time is a cross-check that other jobs'
            load disturbs less (being descheduled does not advance it; OpenMP spin-waits still do).

    Returns:
        ``{name: [wall ms per call, one per timed round]}``; rounds are aligned across candidates, so
        per-round ratios are paired.
    """
    names = list(cands)
    samples: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    orders = balanced_orders(len(names))
    for r in range(warmup + repeats):
        gc.collect()
        for k in (names[i] for i in orders[r % len(orders)]):
            fn = cands[k]
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(inner):
                fn()
            ms, cpu_ms = (time.perf_counter() - t0) * 1e3 / inner, (time.process_time() - c0) * 1e3 / inner
            if r >= warmup:
                samples[k].append(ms)
                cpu[k].append(cpu_ms)
        if on_round is not None:
            on_round(r)
    if cpu_out is not None:
        cpu_out.update(cpu)
    return samples


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def quartiles(values: Sequence[float]) -> list[float]:
    """The 25th and 75th percentiles (the median itself when there are fewer than two values)."""
    if len(values) < 2:
        return [float(values[0])] * 2 if values else [float("nan")] * 2
    q = statistics.quantiles(values, n=4, method="inclusive")
    return [float(q[0]), float(q[2])]


def paired_ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """Round-by-round ratios of two interleaved sample lists."""
    return [a / b for a, b in zip(num, den)]


# -- machine, output --------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """What a reader needs to judge the numbers: versions, threads, CPU, load, date."""
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "loadavg": list(os.getloadavg()),
        "bame_source": bame_source(),
    }


def bame_source() -> dict[str, Any]:
    """A fingerprint of the measured library code (bame/ changes under concurrent development): the
    sha256 of every ``bame/**/*.py`` (path and content, sorted), and the newest file."""
    import hashlib

    root = Path(bame.__file__).resolve().parent
    files = sorted(root.rglob("*.py"))
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    newest = max(files, key=lambda f: f.stat().st_mtime)
    stamp = datetime.datetime.fromtimestamp(newest.stat().st_mtime, datetime.timezone.utc)
    return {"sha256": h.hexdigest()[:16], "version": bame.__version__,
            "newest_file": str(newest.relative_to(root.parent)),
            "newest_mtime_utc": stamp.isoformat(timespec="seconds")}


def check_source(start: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint now; warns if bame/ changed while the benchmark ran (its numbers then mix two
    versions of the code)."""
    end = bame_source()
    if end["sha256"] != start["sha256"]:
        log(f"WARNING: bame/ changed during the run ({start['sha256']} -> {end['sha256']}, "
            f"{end['newest_file']} at {end['newest_mtime_utc']}): rerun for consistent numbers")
    return end


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def add_common_args(ap: argparse.ArgumentParser, default_out: str, default_repeats: int) -> None:
    ap.add_argument("--repeats", type=int, default=default_repeats, help="timed repeats (median taken)")
    ap.add_argument("--out", default=default_out, help="write the JSON here")
    ap.add_argument("--quick", action="store_true", help="tiny settings: a smoke run of a few seconds")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--methods", default="", help="comma-separated method names (default: all registered)")


def apply_threads(threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)


def write_json(path: str, record: dict[str, Any]) -> None:
    if not path:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}", file=sys.stderr)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table, right-aligned, with a rule under the header."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def workloads(args: argparse.Namespace) -> list[Workload]:
    """ResNet-32 on CIFAR-shaped batches; the mlp: 1024 -> 4096 -> 1024 Linear blocks; a small ViT.

    The mlp with ``patch_size=None`` treats each 3x32x32 image as one token (a 3072-wide row): its
    ``embed`` Linear maps it to 1024, then ``depth`` pre-norm blocks 1024 -> 4096 -> 1024. So a batch of
    ``--batch`` images is ``--batch`` token rows through every Linear layer: the weight-bound extreme, where
    every pass over the weights shows. The vit is ``vit_tiny`` (6 blocks, width 192) on 4x4 patches: 65
    tokens per image, as a transformer sees them.
    """
    if args.quick:
        table = {
            "resnet32": Workload("resnet32", "resnet32", {}, batch=2, image_size=16),
            "mlp": Workload("mlp", "mlp", {"dim": 64, "depth": 1, "mlp_ratio": 4}, batch=8),
            "vit": Workload("vit", "vit_tiny", {"patch_size": 4, "depth": 1}, batch=2, image_size=8),
        }
    else:
        table = {
            "resnet32": Workload("resnet32", "resnet32", {}, batch=args.batch),
            "mlp": Workload("mlp", "mlp", {"dim": 1024, "depth": 2, "mlp_ratio": 4}, batch=args.batch),
            "vit": Workload("vit", "vit_tiny", {"patch_size": 4}, batch=args.batch),
        }
    return [table[name.strip()] for name in args.models.split(",") if name.strip()]


class Block(nn.Module):
    """Pre-norm MLP block: ``x + fc2(gelu(fc1(norm(x))))`` (the transformer-style MLP stack's block)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))
