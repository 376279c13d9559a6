"""Figures and tables from run directories."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """A run directory's summary, metrics and config."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    metrics_path = run_dir / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()] \
        if metrics_path.exists() else []
    return {"dir": run_dir, "summary": summary, "metrics": metrics}


def label(run: dict[str, Any]) -> str:
    s = run["summary"]
    return f"{s.get('method', run['dir'].name)} {s.get('nm', '')}".strip() if s.get("method") != "dense" else "dense"


def curves_figure(runs: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Test top-1 and test loss against epochs, one line per run; written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for run in runs:
        epochs = [m["epoch"] for m in run["metrics"]]
        ax_acc.plot(epochs, [m["test_top1"] for m in run["metrics"]], label=label(run))
        ax_loss.plot(epochs, [m["test_loss"] for m in run["metrics"]], label=label(run))
    ax_acc.set(xlabel="epoch", ylabel="test top-1 (%)", title="test accuracy")
    ax_loss.set(xlabel="epoch", ylabel="test loss", title="test loss", yscale="log")
    ax_acc.legend()
    ax_acc.grid(alpha=0.3)
    ax_loss.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def runs_table(runs: list[dict[str, Any]]) -> list[str]:
    """A plain-text table: method, N:M, last and best top-1, training-FLOPs ratios, wall time."""
    lines = [f"{'method':10s} {'N:M':6s} {'top-1':>7s} {'best':>7s} {'train FLOPs':>11s} {'(hw rule)':>9s} "
             f"{'wall s':>7s}"]
    for run in runs:
        s = run["summary"]
        lines.append(f"{s['method']:10s} {s['nm'] if s['method'] != 'dense' else '-':6s} {s['top1']:7.2f} "
                     f"{s['best_top1']:7.2f} {s['train_flops_ratio']:10.3f}x {s['train_flops_ratio_hw']:8.3f}x "
                     f"{s['wall_time_s']:7.1f}")
    return lines
