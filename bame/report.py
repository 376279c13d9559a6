"""Figures and tables from run directories (``bame report``, ``bame demo``).

A run directory (``bame train --out``) holds ``config.yaml``, ``metrics.jsonl`` (one line per epoch),
``updates.jsonl`` (one line per mask update and layer), ``summary.json`` and ``checkpoint.pt``, whose
sparsifier state keeps ``sad`` per block: the mask entries that block flipped over training (the paper's
Figure 2). From these, :func:`write_report` draws the accuracy curves, top-1 against training FLOPs, the
per-block flip histograms, and the per-layer analysis (density, OBF's frozen fraction, flips per update),
and tabulates the runs with mean and spread over seeds. The headline is the last-epoch top-1.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from bame.errors import ConfigError

RUN_MARKERS = ("summary.json", "metrics.jsonl")
#: Config fields that do not change what a run computes, plus the seed: runs that differ only in these
#: are seeds of one configuration.
_NOT_CONFIG = {"seed", "workers", "data_dir", "download", "device", "check_masks", "target"}
# What makes a run sparse rather than dense: runs equal in everything else are one recipe, and the
# recipe's dense run is what the wall time of a sparse one is compared with.
_NOT_RECIPE = _NOT_CONFIG | {"method", "nm", "method_options", "storage", "kernel", "group_axis", "resolved"}
TOP_SHARE = 0.05  # Figure 2's summary: the share of all flips made by the 5 % most-changing blocks


# -- reading ---------------------------------------------------------------------------------------------


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """A run directory's summary, metrics and config."""
    import yaml

    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    metrics_path = run_dir / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()] \
        if metrics_path.exists() else []
    config_path = run_dir / "config.yaml"
    config = (yaml.safe_load(config_path.read_text()) or {}) if config_path.exists() else {}
    return {"dir": run_dir, "summary": summary, "metrics": metrics, "config": config}


def check_run_dir(path: str | Path) -> Path:
    """``path`` if it is a run directory, else a one-line :class:`~bame.errors.ConfigError`."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path} is not a run directory: it does not exist or is not a directory")
    if not any((path / name).is_file() for name in RUN_MARKERS):
        raise ConfigError(f"{path} is not a run directory: it has no summary.json or metrics.jsonl "
                          "(give directories written by `bame train --out`)")
    return path


def read_updates(run_dir: str | Path) -> dict[str, dict[str, list[float]]]:
    """``updates.jsonl`` per layer: lists ``step``, ``last_flips``, ``frozen_fraction`` and ``density``
    (NaN where a method records none), read line by line (a 300-epoch run holds thousands of lines).

    A method that re-chooses its masks every iteration logs one event per ``window`` of re-selections
    with their summed flips; ``last_flips`` is then the mean per re-selection, so every event reads as
    "flips per update".
    """
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    path = Path(run_dir) / "updates.jsonl"
    if not path.exists():
        return {}
    with open(path) as f:
        for line in f:
            if line.strip():
                event = json.loads(line)
                if "window" in event:
                    event["last_flips"] = event["last_flips"] / max(event["window"], 1)
                series = out[event["layer"]]
                for key in ("step", "last_flips", "frozen_fraction", "density"):
                    series[key].append(float(event.get(key, float("nan"))))
    return {name: dict(series) for name, series in out.items()}


def read_sad(run_dir: str | Path) -> dict[str, np.ndarray]:
    """Per sparse layer, the accumulated mask flips of every block (``sad`` in the checkpoint), if kept."""
    from bame import checkpoint

    path = Path(run_dir) / checkpoint.CHECKPOINT
    if not path.exists():
        return {}
    layers = checkpoint.load(path).get("sparsifier", {}).get("layers", {})
    return {name: entry["sad"].numpy().astype(np.int64) for name, entry in layers.items() if "sad" in entry}


# -- grouping and numbers ------------------------------------------------------------------------------------


def uses_masks(method: str | None) -> bool:
    """Whether a method masks (its runs have an N:M pattern): the registry's fact; unknown names do."""
    from bame import methods  # imports torch: only when a report is made

    try:
        return methods.get(str(method)).uses_masks
    except ConfigError:
        return True


def label(run: dict[str, Any]) -> str:
    s = run["summary"] or run.get("config", {})
    if not uses_masks(s.get("method")):
        return str(s.get("method"))
    return f"{s.get('method', run['dir'].name)} {s.get('nm', '')}".strip()


def group_runs(runs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Runs whose configs differ only in the seed (and in fields that change nothing), in first-seen order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        cfg = run.get("config") or {k: run["summary"].get(k) for k in ("dataset", "model", "method", "nm")}
        key = json.dumps({k: v for k, v in cfg.items() if k not in _NOT_CONFIG}, sort_keys=True, default=str)
        groups.setdefault(key, []).append(run)
    return list(groups.values())


def recipe_key(run: dict[str, Any]) -> str:
    """Runs of one recipe (data, model, length, optimizer) differ only in the method and its options."""
    cfg = run.get("config") or {k: run["summary"].get(k) for k in ("dataset", "model", "epochs")}
    return json.dumps({k: v for k, v in cfg.items() if k not in _NOT_RECIPE}, sort_keys=True, default=str)


def add_wall_ratios(groups: list[list[dict[str, Any]]], rows: list[dict[str, Any]]) -> None:
    """Each row's measured wall time over that of the dense run(s) of its recipe, when there are some:
    ``row["wall_vs_dense"]`` (mean, None), or NaN. Beside the FLOPs ratio, what this machine really spent."""
    dense: dict[str, list[float]] = {}
    for group in groups:
        for run in group:
            if not uses_masks(run["summary"].get("method")) and run["summary"].get("wall_time_s"):
                dense.setdefault(recipe_key(run), []).append(float(run["summary"]["wall_time_s"]))
    for group, row in zip(groups, rows, strict=True):
        base = dense.get(recipe_key(group[0]))
        wall = row["wall"][0]
        row["wall_vs_dense"] = (wall / statistics.fmean(base), None) if base and wall == wall else (math.nan, None)


def last_top1(run: dict[str, Any]) -> float | None:
    top1 = run["summary"].get("top1")
    if top1 is None and run["metrics"]:
        top1 = run["metrics"][-1]["test_top1"]  # a run still in progress
    return top1


def best_top1(run: dict[str, Any]) -> float | None:
    return run["summary"].get("best_top1") or max((m["test_top1"] for m in run["metrics"]), default=None)


def mean_std(values: list[float | None]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value); missing values are skipped."""
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _fmt(value: tuple[float, float | None], digits: int = 2, suffix: str = "", exact: bool = False) -> str:
    """``mean ± std``; ``exact``: a quantity seeds do not change (FLOPs) shows no spread when it has none."""
    mean, std = value
    if mean != mean:  # NaN: not recorded
        return "-"
    if std is None or (exact and std == 0.0):
        return f"{mean:.{digits}f}{suffix}"
    return f"{mean:.{digits}f}{suffix} ± {std:.{digits}f}{suffix}"


def group_row(group: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration: its label and the mean and spread of its runs' numbers."""
    first = group[0]
    s, cfg = first["summary"], first.get("config", {})
    get = lambda key: mean_std([r["summary"].get(key) for r in group])  # noqa: E731
    return {
        "label": label(first), "method": s.get("method", cfg.get("method", "?")),
        "nm": s.get("nm", cfg.get("nm", "?")) if uses_masks(s.get("method", cfg.get("method"))) else "-",
        "model": s.get("model") or cfg.get("model") or "-",
        "dataset": s.get("dataset", cfg.get("dataset", "-")),
        "seeds": [r["summary"].get("seed", r.get("config", {}).get("seed")) for r in group], "n": len(group),
        "top1": mean_std([last_top1(r) for r in group]), "best": mean_std([best_top1(r) for r in group]),
        "flops": get("train_flops_ratio"), "flops_hw": get("train_flops_ratio_hw"),
        "test_flops": get("test_flops_ratio"), "wall": get("wall_time_s"), "target": cfg.get("target") or {},
    }


def summary_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown table of configurations (mean ± sample std over seeds); headline = last-epoch top-1."""
    lines = ["| method | N:M | model | dataset | runs | top-1 last (%) | top-1 best (%) | train FLOPs | "
             "train FLOPs (nm-hw) | test FLOPs | wall (s) | wall vs dense | paper |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        target = r["target"]
        paper = f"{target['top1']}% / {target.get('train_flops_ratio', '-')}x" if "top1" in target else "-"
        lines.append(f"| {r['method']} | {r['nm']} | {r['model']} | {r['dataset']} | {r['n']} | "
                     f"{_fmt(r['top1'])} | {_fmt(r['best'])} | {_fmt(r['flops'], 3, 'x', True)} | "
                     f"{_fmt(r['flops_hw'], 3, 'x', True)} | {_fmt(r['test_flops'], 3, 'x', True)} | "
                     f"{_fmt(r['wall'], 1)} | {_fmt(r.get('wall_vs_dense', (math.nan, None)), 3, 'x')} | {paper} |")
    return lines


def runs_table(runs: list[dict[str, Any]]) -> list[str]:
    """A plain-text table: method, N:M, last and best top-1, training-FLOPs ratios, wall time (and its
    ratio to the dense run's, when one of the runs is dense)."""
    groups = [[run] for run in runs]
    rows = [group_row(g) for g in groups]
    add_wall_ratios(groups, rows)
    lines = [f"{'method':10s} {'N:M':6s} {'top-1':>7s} {'best':>7s} {'train FLOPs':>11s} {'(hw rule)':>9s} "
             f"{'wall s':>7s} {'vs dense':>8s}"]
    for run, row in zip(runs, rows, strict=True):
        s = run["summary"]
        nm = s["nm"] if uses_masks(s["method"]) else "-"
        ratio = row["wall_vs_dense"][0]
        lines.append(f"{s['method']:10s} {nm:6s} {s['top1']:7.2f} {s['best_top1']:7.2f} "
                     f"{s['train_flops_ratio']:10.3f}x {s['train_flops_ratio_hw']:8.3f}x "
                     f"{s['wall_time_s']:7.1f} {'-' if ratio != ratio else f'{ratio:.3f}x':>8s}")
    return lines


def sad_stats(sad: np.ndarray) -> dict[str, float]:
    """Figure 2 in numbers: blocks never changed, the largest count, the share of flips of the top 5 %."""
    total = int(sad.sum())
    top = np.sort(sad)[::-1][: max(1, int(round(TOP_SHARE * sad.size)))]
    return {"never": float((sad == 0).mean()), "max": int(sad.max(initial=0)),
            "top_share": float(top.sum() / total) if total else 0.0}


def layer_table(run: dict[str, Any], updates: dict[str, dict[str, list[float]]],
                sad: dict[str, np.ndarray]) -> list[str]:
    """Markdown, one row per weight layer: the per-layer analysis the reviewers asked for."""
    lines = ["| layer | shape | density | updates | flips (% of weights) | frozen (last) | "
             "blocks never flipped | max flips / block | flips by top 5 % blocks |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in run["summary"].get("layers", []):
        name, shape = row["name"], "x".join(map(str, row["shape"]))
        if not row["sparse"]:
            lines.append(f"| {name} | {shape} | dense ({row['reason']}) | | | | | | |")
            continue
        numel = int(np.prod(row["shape"]))
        n_updates = len(updates.get(name, {}).get("step", [])) or row.get("updates", 0)
        stats = sad_stats(sad[name]) if name in sad else None
        sad_cells = "- | - | -"
        if stats:
            sad_cells = f"{stats['never']:.1%} | {stats['max']} | {stats['top_share']:.1%}"
        flips = 100 * row.get("total_flips", 0) / numel
        lines.append(f"| {name} | {shape} | {row['density']:.4f} | {n_updates} | {flips:.2f} | "
                     f"{row.get('frozen_fraction', 0.0):.3f} | {sad_cells} |")
    return lines


# -- figures -------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def curves_figure(runs: list[dict[str, Any]], path: str | Path, title: str = "",
                  labels: list[str] | None = None) -> Path:
    """Test top-1 and test loss against epochs, one line per run; written as a PNG."""
    plt = _pyplot()
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for i, run in enumerate(runs):
        name = labels[i] if labels else label(run)
        epochs = [m["epoch"] for m in run["metrics"]]
        ax_acc.plot(epochs, [m["test_top1"] for m in run["metrics"]], label=name)
        ax_loss.plot(epochs, [m["test_loss"] for m in run["metrics"]], label=name)
    ax_acc.set(xlabel="epoch", ylabel="test top-1 (%)", title="test accuracy")
    ax_loss.set(xlabel="epoch", ylabel="test loss", title="test loss", yscale="log")
    ax_acc.legend()
    ax_acc.grid(alpha=0.3)
    ax_loss.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def flops_figure(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Last-epoch top-1 (mean, error bar = std over seeds) against the training-FLOPs ratio, both rules;
    the paper's figure as a hollow marker where a recipe states it."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, rule in zip(axes, ("flops", "flops_hw"), ("paper", "nm-hardware"), strict=True):
        for r in rows:
            (x, _), (y, err) = r[key], r["top1"]
            if x != x or y != y:
                continue
            ax.errorbar(x, y, yerr=err or 0.0, fmt="o", capsize=3)
            ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
            target = r["target"]
            if rule == "paper" and "top1" in target and "train_flops_ratio" in target:
                ax.scatter(target["train_flops_ratio"], target["top1"], facecolors="none", edgecolors="gray")
                ax.annotate(f"paper: {r['label']}", (target["train_flops_ratio"], target["top1"]),
                            textcoords="offset points", xytext=(5, -10), fontsize=7, color="gray")
        ax.set(xlabel=f"training FLOPs / dense (rule {rule})", title=f"top-1 vs training FLOPs ({rule})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("last-epoch test top-1 (%)")
    return _save(fig, path)


def _short(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def sad_figure(sad: dict[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    """The paper's Figure 2: accumulated mask flips per block, over all blocks (left, log counts) and per
    layer (right: share of the layer's blocks at each count, log colour), so the few oscillators show."""
    from matplotlib.colors import LogNorm

    plt = _pyplot()
    names = list(sad)
    every = np.concatenate([sad[n] for n in names])
    top = int(every.max(initial=0))
    fig, (ax_all, ax_map) = plt.subplots(1, 2, figsize=(12, max(3.5, 0.22 * len(names) + 1.5)),
                                         gridspec_kw={"width_ratios": [1, 1.4]})
    ax_all.hist(every, bins=np.arange(top + 2) - 0.5, log=True, color="tab:blue")
    stats = sad_stats(every)
    ax_all.set(xlabel="accumulated mask flips of a block", ylabel="blocks",
               title=f"{stats['never']:.0%} of blocks never flipped; "
               f"the top 5 % made {stats['top_share']:.0%} of the flips")
    share = np.stack([np.bincount(sad[n], minlength=top + 1) / max(1, sad[n].size)
                      for n in names])  # (layers, top + 1)
    image = ax_map.imshow(np.ma.masked_equal(share, 0), aspect="auto", norm=LogNorm(vmin=1e-4, vmax=1),
                          cmap="viridis", interpolation="nearest")
    ax_map.set_yticks(range(len(names)), [_short(n) for n in names], fontsize=7)
    ax_map.set(xlabel="accumulated mask flips of a block", title="share of each layer's blocks")
    fig.colorbar(image, ax=ax_map)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _update_grid(names: list[str], updates: dict[str, dict[str, list[float]]], key: str,
                 scale: dict[str, float]) -> tuple[np.ndarray, list[float]]:
    """``(layers, update steps)`` grid of one recorded statistic times the layer's scale (NaN: none)."""
    steps = sorted({s for series in updates.values() for s in series["step"]})
    column = {s: j for j, s in enumerate(steps)}
    grid = np.full((len(names), max(1, len(steps))), np.nan)  # (layers, updates)
    for i, name in enumerate(names):
        series = updates.get(name, {})
        for s, v in zip(series.get("step", []), series.get(key, []), strict=True):
            grid[i, column[s]] = v * scale.get(name, 1.0)
    return grid, steps


def _logged(updates: dict[str, dict[str, list[float]]], key: str) -> bool:
    return any(v == v for series in updates.values() for v in series.get(key, []))


def layers_figure(run: dict[str, Any], updates: dict[str, dict[str, list[float]]], path: str | Path) -> Path:
    """Per layer: final density (bars), flips per update as % of the layer's weights, and the fraction of
    its blocks OBF froze (or, for a method without OBF that logs it, the measured density), over the
    update steps (heat maps: rows are layers, columns update steps)."""
    plt = _pyplot()
    layers = run["summary"].get("layers", [])
    names = [row["name"] for row in layers]
    fig, axes = plt.subplots(1, 3, figsize=(16, max(3.5, 0.22 * len(names) + 1.5)),
                             gridspec_kw={"width_ratios": [0.7, 1, 1]})
    colors = ["tab:blue" if row["sparse"] else "lightgray" for row in layers]
    axes[0].barh(range(len(names)), [row["density"] for row in layers], color=colors)
    axes[0].set_yticks(range(len(names)), [_short(n) for n in names], fontsize=7)
    axes[0].invert_yaxis()
    axes[0].set(xlabel="density (gray: dense layer)", title="final density")
    percent = {row["name"]: 100.0 / int(np.prod(row["shape"])) for row in layers}
    panels = [("last_flips", percent, "mask flips per update (% of weights)"),
              ("frozen_fraction", {}, "fraction of blocks frozen by OBF")]
    if not _logged(updates, "frozen_fraction") and _logged(updates, "density"):
        panels[1] = ("density", {}, "density after the update")  # LBC logs its measured d(t)
    for ax, (key, scale, title) in zip(axes[1:], panels, strict=True):
        grid, steps = _update_grid(names, updates, key, scale)
        image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="magma", interpolation="nearest")
        ax.set_yticks(range(len(names)), [""] * len(names))
        ticks = np.linspace(0, len(steps) - 1, num=min(6, len(steps)), dtype=int) if steps else []
        ax.set_xticks(ticks, [str(int(steps[j])) for j in ticks])
        ax.set(xlabel="iteration of the update", title=title if steps else f"{title}: no updates recorded")
        fig.colorbar(image, ax=ax)
    return _save(fig, path)


# -- the report -------------------------------------------------------------------------------------------


def _slug(run: dict[str, Any], index: int) -> str:
    return f"{index:02d}-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", run["dir"].name or "run")


def _run_section(run: dict[str, Any], index: int, out: Path) -> list[str]:
    """The per-run part of report.md: Figure 2, the per-layer figure and table."""
    s = run["summary"] or run.get("config", {})
    lines = [f"### {label(run)}, seed {s.get('seed', '?')} (`{run['dir']}`)", ""]
    if not run["summary"].get("layers"):
        return lines + ["No summary.json yet (the run has not finished): no per-layer analysis.", ""]
    updates, sad = read_updates(run["dir"]), read_sad(run["dir"])
    if sad and any(v.size for v in sad.values()):
        path = sad_figure(sad, out / f"{_slug(run, index)}-sad.png", f"{label(run)}: accumulated mask flips")
        lines += [f"![accumulated mask flips per block (Figure 2)]({path.name})", ""]
    else:
        lines += [f"No per-block flip counts (`sad`) in the checkpoint: {s.get('method')} keeps none.", ""]
    if updates:
        path = layers_figure(run, updates, out / f"{_slug(run, index)}-layers.png")
        lines += [f"![per-layer analysis]({path.name})", ""]
    else:
        lines += [f"{s.get('method')} recorded no mask updates (updates.jsonl is empty).", ""]
    return lines + ["Per layer:", "", *layer_table(run, updates, sad), ""]


def write_report(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Write ``report.md`` and its PNG figures into ``out`` for the given run directories."""
    runs = [read_run(check_run_dir(d)) for d in run_dirs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs)
    rows = [group_row(g) for g in groups]
    add_wall_ratios(groups, rows)
    labels = [label(r) + (f" s{r['summary'].get('seed', r['config'].get('seed'))}" if len(g) > 1 else "")
              for g in groups for r in g]
    ordered = [r for g in groups for r in g]
    curves = curves_figure(ordered, out / "curves.png", labels=labels)
    scatter = flops_figure(rows, out / "flops.png")
    lines = ["# bame report", "",
             f"{len(runs)} run(s) in {len(groups)} configuration(s). The headline is the **last-epoch** "
             "top-1; with several seeds of one configuration, mean ± sample standard deviation.",
             "Training FLOPs are ratios to dense training of the same model for the nominal epochs, "
             "under rule 'paper' and rule 'nm-hardware' (docs/flops.md). 'wall vs dense' is the measured "
             "wall time over that of the dense run of the same recipe, where one is among the runs: what this "
             "machine really spent, beside what the FLOPs promise.", "",
             "## Runs", "", *summary_table(rows), "",
             "## Accuracy over training", "", f"![test top-1 and loss]({curves.name})", "",
             "## Top-1 against training FLOPs", "", f"![top-1 vs training FLOPs]({scatter.name})", "",
             "## Per run: mask dynamics and per-layer analysis", ""]
    for index, run in enumerate(ordered):
        lines += _run_section(run, index, out)
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
