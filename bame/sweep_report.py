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
        results.append(result)
    return results


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
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
