"""``bame sweep`` (issue 17): grid expansion by hand, resuming after a kill, failures, and the sweep report."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import statistics
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, once, run_bame, start_bame, stop, wait_for

from bame import config, sweep, sweep_runner
from bame.cli import main
from bame.cli.sweep import _axis, _seeds, _value
from bame.errors import ConfigError

DIGITS = str(ROOT / "recipes" / "study" / "digits.yaml")
FASHION = str(ROOT / "recipes" / "study" / "fashion-mnist.yaml")
#: 2 configurations x 2 seeds of the digits study at its short budget cut to 2 epochs (44 steps), two at a time.
SMALL = [DIGITS, "--methods", "static,bame", "--seeds", "0,1", "--grid", "nm=1:16", "--grid", "budget=short",
         "--epochs", "2", "--jobs", "2", "--no-progress"]
RUNS = ["static-s0", "static-s1", "bame-s0", "bame-s1"]  # one value per axis: the names carry no axis

RAW = {
    "base": {"dataset": "digits", "width": 0.25},
    "seeds": [0, 1],
    "grid": {"nm": ["1:16", "2:8"],
             "budget": {"short": {"epochs": 1, "method_options": {"delta_t": 3}},
                        "long": {"epochs": 4, "method_options": {"delta_t": 12}}}},
    "configs": {"static": {"method": "static"},
                "control": {"method": "bame", "method_options": {"t_f": 1 / 3}},
                "dense": {"method": "dense", "nm": "1:16"}},
}


# -- expansion, by hand ---------------------------------------------------------------------------------------


def test_grid_expands_to_every_cell_and_shares_equal_runs():
    plan = sweep.expand(sweep.build_spec(RAW))
    assert plan.axes == ["nm", "budget"]
    assert len(plan.cells) == 3 * 2 * 2  # configurations x nm x budget
    names = [run.name for run in plan.runs]
    # static and control: 2 nm x 2 budgets x 2 seeds; dense sets nm itself, so nm does not name or split it
    assert len(names) == 8 + 8 + 4
    assert names[:4] == ["static-1_16-short-s0", "static-1_16-short-s1", "static-1_16-long-s0", "static-1_16-long-s1"]
    assert [n for n in names if n.startswith("dense")] == ["dense-short-s0", "dense-short-s1", "dense-long-s0",
                                                           "dense-long-s1"]
    dense_cells = [c for c in plan.cells if c.config == "dense" and c.axes["budget"] == "long"]
    assert [c.axes["nm"] for c in dense_cells] == ["1:16", "2:8"]
    assert dense_cells[0].runs == dense_cells[1].runs == {0: "dense-long-s0", 1: "dense-long-s1"}


def test_run_options_merge_base_grid_configuration_by_hand():
    runs = {run.name: run.options for run in sweep.expand(sweep.build_spec(RAW)).runs}
    assert runs["control-2_8-long-s1"] == {
        "dataset": "digits", "width": 0.25, "nm": "2:8", "epochs": 4, "method": "bame", "seed": 1,
        "method_options": {"delta_t": 12, "t_f": 1 / 3},  # the level's delta_t, the configuration's t_f
    }
    # static has no delta_t: the level's method option is left out for it, as bame demo does
    assert runs["static-2_8-short-s0"] == {"dataset": "digits", "width": 0.25, "nm": "2:8", "epochs": 1,
                                           "method": "static", "seed": 0}
    assert runs["dense-long-s0"]["nm"] == "1:16"  # the configuration's own value wins over the axis


def test_command_line_selects_and_overrides():
    spec = sweep.build_spec(RAW, overrides={"epochs": 2, "method_options": {"delta_t": 5}},
                            configs=["control", "sr_ste"], seeds=[3], grid={"budget": ["long"], "nm": ["2:4"]})
    plan = sweep.expand(spec)
    runs = {run.name: run.options for run in plan.runs}
    assert list(runs) == ["control-s3", "sr_ste-s3"]  # one value per axis: nothing to tell apart
    assert runs["control-s3"] == {"dataset": "digits", "width": 0.25, "nm": "2:4", "epochs": 2, "method": "bame",
                                  "seed": 3, "method_options": {"delta_t": 5, "t_f": 1 / 3}}
    assert runs["sr_ste-s3"] == {"dataset": "digits", "width": 0.25, "nm": "2:4", "epochs": 2, "method": "sr_ste",
                                 "seed": 3}
    assert plan.cells[0].axes == {"nm": "2:4", "budget": "long"}


def test_only_keeps_a_configuration_to_some_axis_values():
    raw = {**RAW, "configs": {"early": {"method": "bame", "method_options": {"t_i": 0}, "only": {"nm": ["1:16"]}}}}
    plan = sweep.expand(sweep.build_spec(raw))
    assert [c.axes for c in plan.cells] == [{"nm": "1:16", "budget": "short"}, {"nm": "1:16", "budget": "long"}]
    assert [r.name for r in plan.runs] == ["early-1_16-short-s0", "early-1_16-short-s1", "early-1_16-long-s0",
                                           "early-1_16-long-s1"]


@pytest.mark.parametrize("raw, message", [
    ({"configs": ["bame"], "sweeps": 1}, "unknown key(s) sweeps"),
    ({"configs": ["bame"], "grid": {"speed": [1, 2]}}, "neither a training option nor a method option"),
    ({"configs": ["bame"], "grid": {"seed": [1, 2]}}, "grid axis 'seed' is not allowed"),
    ({"configs": ["bame"], "grid": {"nm": []}}, "needs a non-empty list"),
    ({"configs": ["bame"], "grid": {"nm": [76]}}, "nm 76 is a number: quote the pattern"),  # YAML's 1:16
    ({"configs": {"d": {"method": "dense", "nm": 124}}}, "configs.d: nm 124 is a number"),
    ({"configs": ["bame"], "base": {"method": "lma"}}, "base may not set 'method'"),
    ({"configs": ["bame"], "base": {"epoch": 3}}, "base: unknown option(s) epoch"),
    ({"configs": ["bame"], "seeds": [0, 0]}, "seeds repeat"),
    ({"configs": {"a b": {}}}, "configuration name 'a b'"),
    ({"configs": {"x": {"method": "bame", "only": {"nm": ["1:4"]}}}, "grid": {"nm": ["2:4"]}}, "none of ['1:4']"),
    ({}, "no configurations"),
])
def test_a_wrong_sweep_is_refused_in_one_line(raw, message):
    with pytest.raises(ConfigError) as err:
        sweep.build_spec(raw)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_configuration_option_its_method_lacks_is_refused():
    plan = sweep.expand(sweep.build_spec({"configs": {"bad": {"method": "static", "method_options": {"t_f": 0.5}}}}))
    with pytest.raises(ConfigError, match="sweep run bad-s0: method 'static' has no option t_f"):
        sweep.validate(plan)


def test_run_state_from_the_files_of_a_run_directory(tmp_path):
    assert sweep_runner.run_state(tmp_path) == sweep.FRESH
    (tmp_path / "config.yaml").write_text("{}")
    assert sweep_runner.run_state(tmp_path) == sweep.FRESH  # a killed start: nothing to resume from
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    assert sweep_runner.run_state(tmp_path) == sweep.RESUME
    (tmp_path / "summary.json").write_text("{}")
    assert sweep_runner.run_state(tmp_path) == sweep.DONE


def test_a_run_directory_of_another_config_is_refused(tmp_path):
    run = sweep.PlannedRun("static-s0", 0, {"dataset": "digits", "method": "static", "epochs": 1, "seed": 0,
                                            "method_options": {"lambda_w": 1e-4}, "device": "cpu"})
    saved = {**config.TrainConfig().to_dict(), "dataset": "digits", "method": "static", "epochs": 1, "seed": 0,
             "method_options": {"lambda_w": 1e-4}}  # as bame train writes it: every option, device "auto"
    (tmp_path / sweep.RUNS / "static-s0").mkdir(parents=True)
    (tmp_path / sweep.RUNS / "static-s0" / "config.yaml").write_text(yaml.safe_dump(saved))
    sweep_runner.check_existing(tmp_path, [run])  # the same options; the device may differ (a resumable option)
    assert sweep_runner.option_differences(saved, {"epochs": 2, "method_options": {"lambda_w": 2e-4}}) == \
        ["epochs: 1 -> 2", "method_options.lambda_w: 0.0001 -> 0.0002"]
    run.options["epochs"] = 2
    with pytest.raises(ConfigError, match=r"static-s0 holds a run with other options \(epochs: 1 -> 2\)"):
        sweep_runner.check_existing(tmp_path, [run])


def test_threads_are_split_between_the_parallel_runs():
    assert sweep_runner.threads_per_run(2, available=2) == 1  # two 1-thread trainings on a 2-core machine
    assert sweep_runner.threads_per_run(1, available=2) == 2
    assert sweep_runner.threads_per_run(3, available=2) == 1
    assert sweep_runner.threads_per_run(4, available=16) == 4


def test_lock_is_exclusive_while_its_descriptor_is_open(tmp_path):
    fd = sweep_runner.try_lock(tmp_path / "x.lock")
    assert fd is not None and sweep_runner.try_lock(tmp_path / "x.lock") is None
    os.close(fd)
    again = sweep_runner.try_lock(tmp_path / "x.lock")
    assert again is not None
    os.close(again)


def test_command_line_values():
    assert _seeds("0-2,7") == [0, 1, 2, 7]
    assert _axis("nm=1:16,2:8") == ("nm", ["1:16", "2:8"])
    assert _axis("batch-size=64,128") == ("batch_size", [64, 128])
    assert (_value("0.5"), _value("true"), _value("kflat")) == (0.5, True, "kflat")


def test_sweep_takes_methods_and_seeds_not_method_and_seed(capsys):
    assert main(["sweep", "--method", "bame", "--dry-run"]) == 2
    assert "bame sweep takes --methods, not --method" in capsys.readouterr().err


@pytest.mark.parametrize("path, runs, cells", [
    # 6 sparse configurations x 2 N:M x 2 budgets x 3 seeds, dense once per budget and seed (it sets nm);
    # Table 3's schedules and Figure 3's hyper-parameters: 1:16, the long budget, 3 seeds each
    (FASHION, 6 * 2 * 2 * 3 + 2 * 3 + (5 + 6) * 3, 6 * 4 + 4 + 11),
    (DIGITS, 6 * 2 * 2 * 3 + 2 * 3 + (5 + 6) * 3, 6 * 4 + 4 + 11),
])
def test_study_recipes_expand_and_validate(path, runs, cells, capsys, tmp_path):
    assert main(["sweep", path, "--dry-run", "--out", str(tmp_path / "s")]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"{runs} runs for {cells} configuration cells (")
    assert not (tmp_path / "s").exists()  # a dry run writes nothing


# -- sweeps that train -----------------------------------------------------------------------------------------


def _files(root: Path) -> dict[str, list[int]]:
    """Per finished run: inode and mtime (ns) of its summary.json."""
    out = {}
    for path in sorted((root / sweep.RUNS).glob(f"*/{sweep.SUMMARY}")):
        st = path.stat()
        out[path.parent.name] = [st.st_ino, st.st_mtime_ns]
    return out


def _kill_then_resume(directory: Path) -> dict:
    """Start the small sweep, SIGKILL it once a run has finished, then run it again to the end."""
    root = directory / "sweep"
    args = ["sweep", *SMALL, "--out", str(root)]
    proc = start_bame(args, directory / "first.log")
    wait_for(lambda: (root / sweep.RUNS).is_dir() and bool(_files(root)), proc, timeout=120,
             what="a finished run")
    assert stop(proc, signal.SIGKILL) == -signal.SIGKILL
    killed = _files(root)
    second = run_bame(args, timeout=180)
    return {"root": str(root), "killed": killed, "after": _files(root), "rc": second.returncode,
            "out": second.stdout, "err": second.stderr,
            "starts": {name: (root / sweep.LOGS / f"{name}.log").read_text().count("== bame sweep") for name in RUNS}}


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> dict:
    return once(tmp_path_factory, "sweep_killed", _kill_then_resume)


@pytest.mark.slow
def test_sweep_finishes_every_run(killed):
    root = Path(killed["root"])
    assert killed["rc"] == 0, killed["err"]
    assert f"all 4 runs finished in {root}" in killed["out"]
    assert sorted(killed["after"]) == sorted(RUNS)
    record = yaml.safe_load((root / sweep.SWEEP_FILE).read_text())
    assert [c["config"] for c in record["cells"]] == ["static", "bame"]
    assert record["cells"][1]["runs"] == {0: "bame-s0", 1: "bame-s1"}
    for name in RUNS:
        saved = yaml.safe_load((root / sweep.RUNS / name / "config.yaml").read_text())
        assert (saved["method"], saved["seed"], saved["nm"], saved["width"]) == \
            (name.split("-")[0], int(name[-1]), "1:16", 0.25)
        assert (root / sweep.RECIPES / f"{name}.yaml").is_file()


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_redoing_finished_runs(killed):
    assert 1 <= len(killed["killed"]) < 4  # the kill came while the sweep was still running
    for name, stat in killed["killed"].items():
        assert killed["after"][name] == stat  # the same file, never rewritten
        assert killed["starts"][name] == 1  # and its run was never started again
    assert set(killed["after"]) == set(RUNS)  # the unfinished runs completed


def _damage_then_rerun(directory: Path, source: str) -> dict:
    """A copy of the finished sweep where bame-s1 lost its summary (killed after its last checkpoint) and
    static-s1 lost its summary and has a truncated checkpoint; then the sweep once more."""
    root = directory / "sweep"
    shutil.copytree(source, root)
    before = json.loads((root / sweep.RUNS / "bame-s1" / sweep.SUMMARY).read_text())
    for name in ("bame-s1", "static-s1"):
        (root / sweep.RUNS / name / sweep.SUMMARY).unlink()
        (root / sweep.RUNS / name / "model.safetensors").unlink()
    (root / sweep.RUNS / "static-s1" / sweep.CHECKPOINT).write_bytes(b"PK\x03\x04 cut short")
    logs = {name: (root / sweep.LOGS / f"{name}.log").read_text() for name in RUNS}
    untouched = _files(root)
    result = run_bame(["sweep", *SMALL, "--out", str(root)], timeout=120)
    after = json.loads((root / sweep.RUNS / "bame-s1" / sweep.SUMMARY).read_text())
    return {"root": str(root), "rc": result.returncode, "err": result.stderr, "before": before, "after": after,
            "untouched": untouched, "files": _files(root),
            "new_log": {name: (root / sweep.LOGS / f"{name}.log").read_text()[len(logs[name]):] for name in RUNS}}


@pytest.fixture(scope="module")
def damaged(killed, tmp_path_factory) -> dict:
    return once(tmp_path_factory, "sweep_damaged", lambda d: _damage_then_rerun(d, killed["root"]))


@pytest.mark.slow
def test_a_run_with_a_checkpoint_but_no_summary_is_resumed(damaged):
    header = damaged["new_log"]["bame-s1"].splitlines()[0]
    assert damaged["new_log"]["bame-s1"].count("== bame sweep") == 1
    assert ", resume: " in header and header.endswith(" --resume")
    keys = ("top1", "steps", "train_flops", "best_top1")  # it went on from its last checkpoint, the end
    assert [damaged["after"][k] for k in keys] == [damaged["before"][k] for k in keys]
    assert damaged["files"]["static-s0"] == damaged["untouched"]["static-s0"]  # finished runs: not touched
    assert damaged["new_log"]["static-s0"] == damaged["new_log"]["bame-s0"] == ""


@pytest.mark.slow
def test_a_failed_run_fails_the_sweep_in_one_line_and_the_others_finish(damaged):
    assert damaged["rc"] == 3
    errors = [line for line in damaged["err"].splitlines() if line.startswith("bame: error:")]
    assert len(errors) == 1  # the run's own error (bame train's wording) is quoted inside the sweep's line
    log = Path(damaged["root"]) / sweep.LOGS / "static-s1.log"
    assert errors[0].startswith("bame: error: 1 of 4 sweep runs failed; static-s1 exited 2: bame: error: checkpoint ")
    assert errors[0].endswith(f"(log: {log})")
    assert "bame-s1" in damaged["files"]  # the run beside the failed one finished


# -- the report ------------------------------------------------------------------------------------------------


def _row(text: str, first_cell: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {first_cell} |"))
    return [cell.strip() for cell in line.split("|")[1:-1]]


@pytest.mark.slow
def test_report_intervals_match_a_hand_computation(killed, tmp_path):
    root = Path(killed["root"])
    assert main(["report", str(root), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "![top-1 vs training FLOPs, 95% intervals](accuracy_vs_flops.png)" in text
    assert (tmp_path / "accuracy_vs_flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = {n: json.loads((root / sweep.RUNS / n / sweep.SUMMARY).read_text()) for n in RUNS}
    t1 = math.tan(math.pi * (0.975 - 0.5))  # Student's t, 97.5 % quantile, 1 degree of freedom (2 seeds)

    def by_hand(values: list[float], digits: int) -> tuple[str, str]:
        mean, std = statistics.fmean(values), statistics.stdev(values)
        half = t1 * std / math.sqrt(2)
        return f"{mean:.{digits}f} ± {std:.{digits}f}", f"[{mean - half:.{digits}f}, {mean + half:.{digits}f}]"

    for name in ("static", "bame"):
        row = _row(text, name)
        runs = [summary[f"{name}-s0"], summary[f"{name}-s1"]]
        assert row[1:4] == [name, "1:16", "2"]
        assert tuple(row[4:6]) == by_hand([r["top1"] for r in runs], 2)
        assert tuple(row[6:8]) == by_hand([r["train_flops_ratio"] for r in runs], 3)
        assert tuple(row[8:10]) == by_hand([r["wall_time_s"] for r in runs], 1)
    diffs = [summary[f"static-s{s}"]["top1"] - summary[f"bame-s{s}"]["top1"] for s in (0, 1)]
    row = _row(text, "static − bame")
    mean, half = statistics.fmean(diffs), t1 * statistics.stdev(diffs) / math.sqrt(2)
    assert row[1:4] == ["2", f"{mean:.2f}", f"[{mean - half:.2f}, {mean + half:.2f}]"]
    assert row[4] == ("yes" if abs(mean) > half else "no")


def test_evolution_statistics_by_hand(tmp_path):
    """Two updates of two layers: changed blocks over all blocks per update, averaged over the updates;
    regrowth's share averaged and its ratio's median over the events; events without a block count (the
    re-selections of other methods) ignored; a run without updates has none."""
    from bame import sweep_report

    events = [
        {"step": 10, "layer": "a", "changed_blocks": 2, "blocks": 10, "regrow_share": 0.2, "regrow_ratio": 0.5},
        {"step": 10, "layer": "b", "changed_blocks": 0, "blocks": 30, "regrow_share": 0.0, "regrow_ratio": 0.1},
        {"step": 20, "layer": "a", "changed_blocks": 1, "blocks": 10, "regrow_share": 0.1, "regrow_ratio": 0.3},
        {"step": 20, "layer": "b", "changed_blocks": 3, "blocks": 30, "regrow_share": 0.1, "regrow_ratio": 0.2},
        {"step": 25, "layer": "a", "window": 5, "last_flips": 4},
    ]
    (tmp_path / "updates.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    got = sweep_report.evolution(tmp_path)
    assert got == pytest.approx({"updates": 2, "changed_per_update": (2 / 40 + 4 / 40) / 2,
                                 "regrow_share": 0.1, "regrow_ratio": 0.25})
    (tmp_path / "updates.jsonl").write_text(json.dumps(events[-1]) + "\n")
    assert sweep_report.evolution(tmp_path) is None


@pytest.mark.slow
def test_report_summary_json_and_evolution_table(killed, tmp_path):
    """``sweep_summary.json`` holds the per-seed numbers the tables are made of; BAME's evolution row
    matches its runs' updates.jsonl and checkpoints."""
    from bame import report as run_report
    from bame import sweep_report

    root = Path(killed["root"])
    assert main(["report", str(root), "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "sweep_summary.json").read_text())
    cells = {c["config"]: c for c in data["cells"]}
    for name in ("static", "bame"):
        top1 = {str(s): json.loads((root / sweep.RUNS / f"{name}-s{s}" / sweep.SUMMARY).read_text())["top1"]
                for s in (0, 1)}
        assert cells[name]["top1"] == top1
        assert cells[name]["top1_interval"]["mean"] == pytest.approx(statistics.fmean(top1.values()), abs=1e-6)
    assert cells["static"]["evolution"] == {}
    ever = []
    for s in (0, 1):
        sad = run_report.read_sad(root / sweep.RUNS / f"bame-s{s}")
        ever.append(sum(int((v > 0).sum()) for v in sad.values()) / sum(v.size for v in sad.values()))
        assert cells["bame"]["evolution"][str(s)]["changed_ever"] == pytest.approx(ever[-1])
    rows = [line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("| bame |")]
    row = [cell.strip() for cell in rows[-1].split("|")[1:-1]]  # the evolution table's (the cell table's first)
    mean = sweep_report.evolution_mean(sweep_report.collect(root, sweep.read_plan(root))[1])
    assert mean["changed_ever"] == pytest.approx(statistics.fmean(ever))
    assert len(rows) == 2 and row[3] == f"{mean['changed_ever']:.1%}"
    assert [d["a"] for d in data["differences"]] == ["static"] and data["differences"][0]["b"] == "bame"
