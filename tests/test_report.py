"""``bame report``: figures and tables from run directories (issue: FLOPs ledger, per-layer analysis)."""

import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from bame import config, report
from bame.cli import main
from bame.engine import fit

BYTES_PER_UPDATE_LINE = 256  # docs/flops.md bounds updates.jsonl by lines x this


def digits_run(root: Path, method: str, seed: int) -> Path:
    """3 epochs of 11 steps (batch 128); BAME's delta_t = 3 puts updates at 12, 15, 18, 21."""
    options = {"delta_t": 3} if method == "bame" else {}
    cfg = config.build({"dataset": "digits", "method": method, "nm": "1:4", "epochs": 3, "batch_size": 128,
                        "width": 0.5, "seed": seed, "method_options": options})
    out = root / f"{method}-s{seed}"
    fit(cfg, out)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    return [digits_run(root, "bame", 0), digits_run(root, "bame", 1), digits_run(root, "sr_ste", 0)]


@pytest.fixture(scope="module")
def written(runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    return out


def test_report_writes_the_figures_and_markdown(written):
    names = {p.name for p in written.iterdir()}
    assert {"report.md", "curves.png", "flops.png", "00-bame-s0-sad.png", "00-bame-s0-layers.png",
            "01-bame-s1-sad.png", "01-bame-s1-layers.png"} <= names
    # SR-STE re-chooses its masks every iteration: their flips are recorded (aggregated events), so it has a
    # layer plot; it keeps no per-block flip counts (no evolution), so no Figure 2.
    assert "02-sr_ste-s0-layers.png" in names and "02-sr_ste-s0-sad.png" not in names
    for name in names - {"report.md"}:
        assert (written / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (written / "report.md").read_text()
    for name in names - {"report.md"}:
        assert f"]({name})" in text
    assert "recorded no mask updates" not in text


def test_report_table_has_mean_and_std_over_seeds(runs, written):
    top1 = [json.loads((d / "summary.json").read_text())["top1"] for d in runs[:2]]
    text = (written / "report.md").read_text()
    bame_row = next(line for line in text.splitlines() if line.startswith("| bame | 1:4 |"))
    cells = [c.strip() for c in bame_row.split("|")]
    assert cells[5] == "2"  # two seeds of one configuration
    assert cells[6] == f"{statistics.fmean(top1):.2f} ± {statistics.stdev(top1):.2f}"
    sr_row = next(line for line in text.splitlines() if line.startswith("| sr_ste | 1:4 |"))
    assert "±" not in sr_row.split("|")[6]  # a single run: no spread


def test_updates_are_compact_and_read_per_layer(runs):
    run = report.read_run(runs[0])
    sparse = [row["name"] for row in run["summary"]["layers"] if row["sparse"]]
    path = runs[0] / "updates.jsonl"
    lines = path.read_text().splitlines()
    assert len(lines) == 4 * len(sparse)  # one line per (update step, sparse layer): steps 12, 15, 18, 21
    assert max(len(line) + 1 for line in lines) <= BYTES_PER_UPDATE_LINE
    updates = report.read_updates(runs[0])
    assert sorted(updates) == sorted(sparse)
    assert updates[sparse[0]]["step"] == [12.0, 15.0, 18.0, 21.0]
    sad = report.read_sad(runs[0])
    # every flip an update made is counted once in its block: the per-block sums are the layer's flips
    for row in run["summary"]["layers"]:
        if row["sparse"]:
            assert int(sad[row["name"]].sum()) == row["total_flips"]


def test_report_refuses_a_path_that_is_not_a_run_directory(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "is not a run directory: it has no summary.json or metrics.jsonl" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def fake(seed: int, lr: float = 0.1, top1: float = 90.0) -> dict:
    cfg = {"dataset": "digits", "method": "bame", "nm": "2:4", "lr": lr, "seed": seed, "device": "cpu"}
    return {"dir": Path(f"r{seed}"), "metrics": [], "config": cfg,
            "summary": {"method": "bame", "nm": "2:4", "seed": seed, "top1": top1, "best_top1": top1 + 1,
                        "train_flops_ratio": 0.6, "train_flops_ratio_hw": 0.7, "wall_time_s": 1.0}}


def test_grouping_and_spread_by_hand():
    groups = report.group_runs([fake(0, top1=90.0), fake(1, top1=92.0), fake(2, lr=0.05), fake(3, top1=94.0)])
    assert [[r["config"]["seed"] for r in g] for g in groups] == [[0, 1, 3], [2]]  # lr differs: its own row
    row = report.group_row(groups[0])
    assert row["top1"] == (92.0, 2.0)  # mean 92, sample std sqrt(((-2)^2 + 0 + 2^2) / 2) = 2
    assert row["best"] == (93.0, 2.0) and row["flops"] == (0.6, 0.0) and row["n"] == 3
    assert report.mean_std([5.0]) == (5.0, None) and report._fmt((92.0, 2.0)) == "92.00 ± 2.00"


def test_wall_time_beside_the_dense_run_of_the_same_recipe_by_hand():
    def run(seed: int, method: str, wall: float, lr: float = 0.1, storage: str = "dense") -> dict:
        made = fake(seed, lr=lr)
        made["config"].update(method=method, storage=storage, method_options={"delta_t": 5})
        made["summary"].update(method=method, wall_time_s=wall)
        return made

    runs = [run(0, "dense", 10.0), run(1, "dense", 14.0), run(0, "bame", 5.0, storage="compressed"),
            run(1, "bame", 7.0, storage="compressed"), run(0, "bame", 9.0, lr=0.05)]
    groups = report.group_runs(runs)
    rows = [report.group_row(g) for g in groups]
    report.add_wall_ratios(groups, rows)
    ratios = [row["wall_vs_dense"][0] for row in rows]
    # dense: 12 / 12; compressed bame: mean(5, 7) / mean(10, 14) = 0.5; another lr: another recipe, no dense run
    assert ratios[:2] == [1.0, 0.5] and ratios[2] != ratios[2]
    table = report.summary_table(rows)
    assert table[0].split("|")[12].strip() == "wall vs dense"
    assert [line.split("|")[12].strip() for line in table[2:]] == ["1.000x", "0.500x", "-"]
    text = report.runs_table([runs[0], runs[2]])
    assert text[1].split()[-1] == "1.000x" and text[2].split()[-1] == "0.500x"


def test_sad_stats_by_hand():
    sad = np.array([0] * 18 + [1, 9])  # 20 blocks; the top 5 % is 1 block, with 9 of the 10 flips
    assert report.sad_stats(sad) == {"never": 0.9, "max": 9, "top_share": 0.9}
