"""``bame report SWEEP_DIR``: the statistics of a sweep over seeds, as markdown and a figure.

For every configuration cell of the sweep (a configuration at one value of every grid axis), over its
seeds: the mean, the sample standard deviation and the 95% Student-t interval of the last-epoch top-1,
of the training-FLOPs ratio (rule "paper") and of the wall time; and, between the configurations of one
slice (the same axis values), the differences in top-1 paired by seed with their 95% intervals
(:mod:`bame.stats`). The figure shows top-1 against training FLOPs with 95% intervals as error bars, one
marker per configuration and one panel per slice. Runs that have not finished are left out and listed.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bame import stats, sweep
from bame.errors import ConfigError
from bame.report import uses_masks

MARKERS = "osD^vP*Xph<>"


@dataclass
class CellResult:
    """One configuration cell's numbers per seed (finished runs only)."""

    config: str
    axes: dict[str, str]
    method: str
    nm: str
    top1: dict[int, float] = field(default_factory=dict)
    flops: dict[int, float] = field(default_factory=dict)
    wall: dict[int, float] = field(default_factory=dict)
    evolution: dict[int, dict[str, float]] = field(default_factory=dict)  # seeds whose runs evolved masks
    unfinished: list[str] = field(default_factory=list)  # run names without summary.json


def is_sweep_dir(path: str | Path) -> bool:
    return (Path(path) / sweep.SWEEP_FILE).is_file()


def _summary(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / sweep.SUMMARY
    return json.loads(path.read_text()) if path.is_file() else None


def collect(root: Path, record: dict[str, Any]) -> list[CellResult]:
    """Every cell of ``sweep.yaml`` with the numbers of its finished runs."""
    options = {run["name"]: run["options"] for run in record["runs"]}
    results = []
    for cell in record["cells"]:
        first = options[next(iter(cell["runs"].values()))]  # method and N:M: those of every seed
        result = CellResult(cell["config"], dict(cell["axes"]), first["method"], first.get("nm", "?"))
        for seed, name in cell["runs"].items():
            summary = _summary(root / sweep.RUNS / name)
            if summary is None or summary.get("top1") is None:
                result.unfinished.append(name)
                continue
            result.nm = summary.get("nm", result.nm)  # the run's own, where the sweep left it to the defaults
            result.top1[int(seed)] = float(summary["top1"])
            result.flops[int(seed)] = float(summary["train_flops_ratio"])
            result.wall[int(seed)] = float(summary["wall_time_s"])
            activity = evolution(root / sweep.RUNS / name)
            if activity is not None:
                result.evolution[int(seed)] = activity
        results.append(result)
    return results


def evolution(run_dir: Path) -> dict[str, float] | None:
    """How much a run's mask evolution changed (None for a run without evolution updates).

    From ``updates.jsonl`` (one event per layer and update, the evolving methods' LMA/OBF or RigL updates):
    ``updates``, the update iterations; ``changed_per_update``, the share of blocks an update changed (all
    layers' changed blocks over all layers' blocks, averaged over the updates); ``proposed_per_update``, the
    same for the flips LMA proposed before OBF (entries, over all entries; methods without a proposal step
    record none); ``regrow_share``, the mean share of blocks where a pruned weight's score beat the weakest
    kept one; ``regrow_ratio``, the median over updates of the median ratio of those two scores (1 = a tie).
    From the checkpoint's per-block flip counts (``sad``): ``changed_ever``, the share of blocks that
    changed at least once over the run.
    """
    from bame import report

    path = run_dir / "updates.jsonl"
    if not path.is_file():
        return None
    by_step: dict[int, list[dict[str, Any]]] = {}
    for line in path.read_text().splitlines():
        event = json.loads(line)
        if "changed_blocks" in event:
            by_step.setdefault(int(event["step"]), []).append(event)
    if not by_step:
        return None
    changed = [sum(e["changed_blocks"] for e in es) / max(sum(e["blocks"] for e in es), 1) for es in by_step.values()]
    out = {"updates": float(len(by_step)), "changed_per_update": statistics.fmean(changed)}
    events = [e for es in by_step.values() for e in es]
    if all("regrow_share" in e for e in events):
        out["regrow_share"] = statistics.fmean(e["regrow_share"] for e in events)
        out["regrow_ratio"] = statistics.median(e["regrow_ratio"] for e in events)
    sad = report.read_sad(run_dir)
    if sad:
        out["changed_ever"] = sum(int((v > 0).sum()) for v in sad.values()) / sum(v.size for v in sad.values())
    return out


def slices(results: list[CellResult], axes: list[str]) -> dict[tuple[str, ...], list[CellResult]]:
    """Cells grouped by their axis values, in the order of the sweep."""
    out: dict[tuple[str, ...], list[CellResult]] = {}
    for result in results:
        out.setdefault(tuple(result.axes[a] for a in axes), []).append(result)
    return out


def slice_title(axes: list[str], key: tuple[str, ...]) -> str:
    return ", ".join(f"{axis} {value}" for axis, value in zip(axes, key, strict=True)) or "all runs"


# -- tables -----------------------------------------------------------------------------------------------


def _num(value: float, digits: int) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def mean_std(iv: stats.Interval, digits: int) -> str:
    """``mean ± std`` (the mean alone for one run)."""
    if iv.n == 0:
        return "-"
    return _num(iv.mean, digits) if iv.n == 1 else f"{_num(iv.mean, digits)} ± {_num(iv.std, digits)}"


def bounds(iv: stats.Interval, digits: int) -> str:
    """``[low, high]`` (``-`` without an interval)."""
    return "-" if iv.n < 2 else f"[{_num(iv.low, digits)}, {_num(iv.high, digits)}]"


def cell_table(cells: list[CellResult]) -> list[str]:
    """Markdown: per configuration, mean ± std and the 95% interval of top-1, training FLOPs, wall time."""
    lines = ["| configuration | method | N:M | seeds | top-1 last (%) | 95% CI | train FLOPs (x dense) | 95% CI | "
             "wall (s) | 95% CI |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        top1, flops, wall = (stats.interval(list(v.values())) for v in (c.top1, c.flops, c.wall))
        nm = c.nm if uses_masks(c.method) else "-"
        seeds = f"{len(c.top1)}" + (f" (+{len(c.unfinished)} unfinished)" if c.unfinished else "")
        lines.append(f"| {c.config} | {c.method} | {nm} | {seeds} | {mean_std(top1, 2)} | {bounds(top1, 2)} | "
                     f"{mean_std(flops, 3)} | {bounds(flops, 3)} | {mean_std(wall, 1)} | {bounds(wall, 1)} |")
    return lines


def pairs(cells: list[CellResult], against: list[str] | None = None) -> list[tuple[CellResult, CellResult]]:
    """Every pair of configurations (a, b) in sweep order, or only those against the named ones (as b)."""
    if not against:
        return list(itertools.combinations(cells, 2))
    out, seen = [], set()
    for ref in (c for c in cells if c.config in against):
        for other in cells:
            if other is not ref and frozenset((other.config, ref.config)) not in seen:
                seen.add(frozenset((other.config, ref.config)))
                out.append((other, ref))
    return out


def difference_table(cells: list[CellResult], against: list[str] | None = None) -> list[str]:
    """Markdown: pairs of configurations, the top-1 difference paired by seed and its 95% interval."""
    lines = ["| difference | seeds paired | Δ top-1 (points) | 95% CI | CI excludes 0 |", "|---|---|---|---|---|"]
    for a, b in pairs(cells, against):
        iv = stats.paired_interval(a.top1, b.top1)
        if iv.n == 0:
            continue
        verdict = "-" if iv.n < 2 else ("yes" if iv.excludes(0.0) else "no")
        lines.append(f"| {a.config} − {b.config} | {iv.n} | {_num(iv.mean, 2)} | {bounds(iv, 2)} | {verdict} |")
    return lines


EVOLUTION_COLUMNS = (("updates", "updates", "{:.0f}"), ("changed_per_update", "blocks changed per update", "{:.2%}"),
                     ("changed_ever", "blocks changed at least once", "{:.1%}"),
                     ("regrow_share", "regrowth wins (share of blocks)", "{:.2%}"),
                     ("regrow_ratio", "best pruned / weakest kept score (median)", "{:.3g}"))


def evolution_mean(cell: CellResult) -> dict[str, float]:
    """The evolution statistics of a cell, each the mean over its seeds."""
    keys = {k for stats_ in cell.evolution.values() for k in stats_}
    return {k: statistics.fmean(v[k] for v in cell.evolution.values() if k in v) for k in sorted(keys)}


def evolution_table(cells: list[CellResult]) -> list[str]:
    """Markdown: how much the evolving configurations changed their masks (means over seeds)."""
    rows = [c for c in cells if c.evolution]
    if not rows:
        return []
    lines = ["| configuration | " + " | ".join(title for _, title, _ in EVOLUTION_COLUMNS) + " |",
             "|---|" + "---|" * len(EVOLUTION_COLUMNS)]
    for c in rows:
        mean = evolution_mean(c)
        lines.append(f"| {c.config} | " + " | ".join(fmt.format(mean[k]) if k in mean else "-"
                                                   for k, _, fmt in EVOLUTION_COLUMNS) + " |")
    return lines


def _interval_dict(iv: stats.Interval) -> dict[str, float | int | None]:
    clean = lambda v: None if math.isnan(v) else round(v, 6)  # noqa: E731
    return {"mean": clean(iv.mean), "std": clean(iv.std), "low": clean(iv.low), "high": clean(iv.high), "n": iv.n}


def summary(results: list[CellResult], axes: list[str], against: list[str] | None = None) -> dict[str, Any]:
    """Every number of the report as JSON (``sweep_summary.json``): per cell the per-seed values and their
    intervals, the evolution statistics, and the paired differences."""
    cells = []
    for c in results:
        cells.append({
            "config": c.config, "axes": c.axes, "method": c.method, "nm": c.nm,
            "top1": {str(k): v for k, v in sorted(c.top1.items())},
            "flops": {str(k): v for k, v in sorted(c.flops.items())},
            "wall": {str(k): v for k, v in sorted(c.wall.items())},
            "top1_interval": _interval_dict(stats.interval(list(c.top1.values()))),
            "flops_interval": _interval_dict(stats.interval(list(c.flops.values()))),
            "evolution": {str(k): v for k, v in sorted(c.evolution.items())},
            "unfinished": c.unfinished,
        })
    differences = []
    for key, group in slices(results, axes).items():
        for a, b in pairs(group, against):
            iv = stats.paired_interval(a.top1, b.top1)
            if iv.n:
                differences.append({"slice": dict(zip(axes, key, strict=True)), "a": a.config, "b": b.config,
                                    "top1": _interval_dict(iv)})
    return {"axes": axes, "cells": cells, "differences": differences}


# -- the figure ------------------------------------------------------------------------------------------------


def _half(iv: stats.Interval) -> float:
    return 0.0 if iv.n < 2 or math.isnan(iv.half_width) else iv.half_width


def _layout(keys: list[tuple[str, ...]]) -> tuple[int, int]:
    """(rows, columns) of the panels: a row per value of the other axes when there are two or more."""
    cols = len({key[-1] for key in keys}) if keys and len(keys[0]) > 1 else min(len(keys), 3)
    return math.ceil(len(keys) / max(cols, 1)), max(cols, 1)


def figure(groups: dict[tuple[str, ...], list[CellResult]], axes: list[str], path: Path) -> Path:
    """Top-1 against training FLOPs, error bars the 95% intervals, one panel per slice."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or wanted
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(c.config for cells in groups.values() for c in cells))
    style = {name: (MARKERS[i % len(MARKERS)], f"C{i % 10}") for i, name in enumerate(names)}
    rows, cols = _layout(list(groups))
    fig, panels = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), squeeze=False)
    for ax, (key, cells) in zip(panels.flat, groups.items()):
        for c in cells:
            top1, flops = stats.interval(list(c.top1.values())), stats.interval(list(c.flops.values()))
            if top1.n == 0:
                continue
            marker, color = style[c.config]
            ax.errorbar(flops.mean, top1.mean, xerr=_half(flops), yerr=_half(top1), fmt=marker, color=color,
                        capsize=3, label=c.config)
        ax.set(title=slice_title(axes, key), xlabel="training FLOPs / dense (rule 'paper')",
               ylabel="last-epoch top-1 (%)")
        ax.grid(alpha=0.3)
    for ax in list(panels.flat)[len(groups):]:
        ax.set_visible(False)
    handles = [plt.Line2D([], [], marker=style[n][0], color=style[n][1], linestyle="", label=n) for n in names]
    fig.suptitle("last-epoch top-1 against training FLOPs; error bars: 95% Student-t intervals over seeds")
    fig.tight_layout()
    # beside the panels, one entry per configuration; "tight" grows the image to hold it
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# -- the report -----------------------------------------------------------------------------------------------


def write_sweep_report(root: str | Path, out: str | Path, against: list[str] | None = None) -> Path:
    """Write ``report.md`` and ``accuracy_vs_flops.png`` for the sweep in ``root`` into ``out``.

    Args:
        root: the sweep directory.
        out: where the report goes.
        against: configurations to compare every other one with (default: every pair).
    """
    root, out = Path(root), Path(out)
    record = sweep.read_plan(root)
    axes = list(record["axes"])
    results = collect(root, record)
    unknown = sorted(set(against or ()) - {r.config for r in results})
    if unknown:
        raise ConfigError(f"--against {', '.join(unknown)}: no such configuration in {root}")
    groups = slices(results, axes)
    out.mkdir(parents=True, exist_ok=True)
    png = figure(groups, axes, out / "accuracy_vs_flops.png")
    unfinished = sorted({name for r in results for name in r.unfinished})
    lines = ["# bame sweep report", "",
             f"Sweep `{root}`: {len(record['runs'])} runs, {len(results)} configuration cells, seeds "
             f"{', '.join(map(str, record['request']['seeds']))}. Per configuration: mean ± sample standard "
             "deviation over seeds and the 95% Student-t interval of the mean (t with n − 1 degrees of freedom) "
             "of the **last-epoch** top-1, the training-FLOPs ratio (rule 'paper') and the wall time (of the "
             "training loop, as summary.json records it; it depends on what else the machine ran). "
             "Differences are paired by seed: the interval is that of the mean of the per-seed differences.", ""]
    if unfinished:
        lines += [f"{len(unfinished)} run(s) have not finished and are left out: {', '.join(unfinished)}.", ""]
    lines += ["## Top-1 against training FLOPs", "", f"![top-1 vs training FLOPs, 95% intervals]({png.name})", ""]
    for key, cells in groups.items():
        lines += [f"## {slice_title(axes, key)}", "", *cell_table(cells), "",
                  "Differences in last-epoch top-1, paired by seed:", "", *difference_table(cells, against), ""]
        table = evolution_table(cells)
        if table:
            lines += ["How much the masks evolved (means over seeds; `updates.jsonl` and the checkpoint's "
                      "per-block flip counts):", "", *table, ""]
    (out / "sweep_summary.json").write_text(json.dumps(summary(results, axes, against), indent=1) + "\n")
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
