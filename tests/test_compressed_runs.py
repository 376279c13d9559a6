"""``bame train --storage compressed`` (issue: compressed training): whole runs through the engine.

Digits with the small CNN at width 0.5, BAME 1:4 over 3 epochs of 44 steps: the gradual phase is epoch 1, the
layers are stored compressed from t_i = 44 on (the switch; at 1:4 every layer is, whatever its plan), LMA/OBF
update every 4 steps in epoch 2.

* with dense products on the scattered weight, compressed storage trains the very run dense storage trains
  (bit for bit: weights, masks, metrics, the update log, the FLOPs ledger);
* with the default sparse kernels, it trains an N:M run whose layers report their plans;
* a run stopped before, at and after the switch resumes bit-exactly (the chosen plans are in the
  checkpoint, so the resumed run computes with the same products whatever timing says that day: tested by
  resuming under timings that would pick dense products everywhere);
* a resume with another storage is refused in one line; ``bame eval`` and ``bame export`` read the run.

The planners' timer is pinned in this module (fixed milliseconds, :func:`_timer`): the reference run may be
another xdist worker's, timed under another load, and measured plans that differ would make two runs differ
in their summation order, which is not what these tests are about.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import assert_same, checkpoint_state, lines, once, weights

from bame import checkpoint, config, engine, nm
from bame.cli import main
from bame.engine import Interrupted

RUN = {"dataset": "digits", "width": 0.5, "method": "bame", "nm": "1:4", "epochs": 3, "batch_size": 32,
       "seed": 3, "device": "cpu", "method_options": {"delta_t": 4}}
STEPS_PER_EPOCH = 1437 // 32
SWITCH = STEPS_PER_EPOCH  # t_i = T/3


def _fit(out: Path, resume: bool = False, **changes) -> dict:
    return engine.fit(config.build({**RUN, **changes}), out, resume=resume)


def _stopped_at(out: Path, step: int, monkeypatch, **changes) -> None:
    """Train until the sparsifier has done ``step`` steps, then stop as SIGTERM does (checkpoint saved)."""
    original = engine._stop_requested

    def stop(run: engine.Run) -> bool:
        if run.sparsifier.step_count >= step:
            run.stop_signal = 15
        return original(run)

    with monkeypatch.context() as patch:
        patch.setattr(engine, "_stop_requested", stop)
        with pytest.raises(Interrupted):
            _fit(out, **changes)


def _make_runs(root: Path) -> dict[str, str]:
    out = {}
    for name, changes in (("dense", {}), ("scattered", {"storage": "compressed", "kernel": "dense"}),
                          ("compressed", {"storage": "compressed"})):
        _fit(root / name, **changes)
        out[name] = str(root / name)
    return out


def _timer(prefer_dense: bool):
    """Stands in for the planners' ``time_interleaved``: fixed milliseconds per candidate name (a sparse form
    ahead of dense by more than the planners' margin, the first in sorted order fastest; or dense fastest)."""

    def time_interleaved(cands, device, repeats, warmup):
        names = sorted(cands)

        def ms(name: str) -> float:
            dense = name == "dense" or name.endswith(" dense")
            if prefer_dense:
                return 0.5 if dense else 1.0
            return 1.0 if dense else 0.5 + 0.01 * names.index(name)

        return {name: ms(name) for name in cands}

    return time_interleaved


def _pin_timer(mp: pytest.MonkeyPatch, prefer_dense: bool) -> None:
    from bame.kernels import plan

    plan.clear_plan_cache()
    mp.setattr("bame.kernels.plan.time_interleaved", _timer(prefer_dense))
    mp.setattr("bame.kernels.compressed.time_interleaved", _timer(prefer_dense))


@pytest.fixture(scope="module", autouse=True)
def pinned_timer():
    from bame.kernels import plan

    with pytest.MonkeyPatch.context() as mp:
        _pin_timer(mp, prefer_dense=False)
        yield
    plan.clear_plan_cache()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    return {k: Path(v) for k, v in once(tmp_path_factory, "compressed-runs", _make_runs).items()}


def _log(run: Path, name: str) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "wall_s"} for line in lines(run / name)]


def test_compressed_storage_with_dense_products_is_the_dense_storage_run(runs):
    dense, scattered = runs["dense"], runs["scattered"]
    assert_same(weights(scattered), weights(dense), "model.safetensors")
    assert _log(scattered, "metrics.jsonl") == _log(dense, "metrics.jsonl")
    assert _log(scattered, "updates.jsonl") == _log(dense, "updates.jsonl")
    a, b = (json.loads((run / "summary.json").read_text()) for run in (scattered, dense))
    for key in ("top1", "train_flops", "train_flops_hw", "params", "nonzero_params", "steps"):
        assert a[key] == b[key], key
    assert {row["storage"] for row in a["layers"] if row["sparse"]} == {"compressed"}
    assert {row["storage"] for row in b["layers"] if row["sparse"]} == {"dense"}
    # the checkpoint's model state holds dense weights under their usual names, as dense storage's does
    got, want = checkpoint_state(scattered)["model"], checkpoint_state(dense)["model"]
    assert sorted(got) == sorted(want) and all(got[k].shape == want[k].shape for k in want)


def test_compressed_storage_with_sparse_kernels_trains_an_nm_run(runs):
    run = runs["compressed"]
    assert yaml.safe_load((run / "config.yaml").read_text())["kernel"] == "sparse"  # compressed storage's default
    summary = json.loads((run / "summary.json").read_text())
    dense = json.loads((runs["dense"] / "summary.json").read_text())
    assert summary["steps"] == dense["steps"] and summary["params"] == dense["params"]
    assert abs(summary["top1"] - dense["top1"]) < 5.0  # the same run up to the kernels' summation order
    tensors = weights(run)
    rows = [row for row in summary["layers"] if row["sparse"]]
    assert rows
    for row in rows:
        assert row["storage"] == "compressed" and row["kernel"].startswith("compressed; ")
        weight, mask = tensors[row["name"]], tensors[row["name"] + ".mask"]
        assert torch.all(nm.to_blocks(mask, 4, "cin").sum(-1) == 1)
        assert torch.all(weight[~mask] == 0)


@pytest.mark.parametrize("stop", [SWITCH - 14, SWITCH, SWITCH + 26], ids=["before", "at", "after"])
def test_a_compressed_run_stopped_and_resumed_is_bit_exact(runs, stop, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _stopped_at(out, stop, monkeypatch, storage="compressed")
    state = checkpoint.load(out / checkpoint.CHECKPOINT)
    assert state["sparsifier"]["step"] == stop and state["sparsifier"]["switched"] == (stop >= SWITCH)
    if stop >= SWITCH:  # the plans were chosen at the switch, and saved
        plans = [layer["plan"] for layer in state["sparsifier"]["layers"].values()]
        assert all(plan is not None and plan["kind"] in ("linear", "conv") for plan in plans)
        # another day's timings would pick dense products everywhere: the resumed run must keep the saved plans
        _pin_timer(monkeypatch, prefer_dense=True)
    try:
        _fit(out, resume=True, storage="compressed")
    finally:
        _pin_timer(monkeypatch, prefer_dense=False)
    reference = runs["compressed"]
    assert_same(weights(out), weights(reference), "model.safetensors")
    got, want = checkpoint_state(out), checkpoint_state(reference)
    for key in ("model", "sparsifier", "optimizer", "ledger", "epoch", "batch"):
        assert_same(got[key], want[key], key)
    assert _log(out, "metrics.jsonl") == _log(reference, "metrics.jsonl")
    assert lines(out / "updates.jsonl") == lines(reference / "updates.jsonl")


def test_resuming_with_another_storage_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _stopped_at(out, 10, monkeypatch)
    before = (out / checkpoint.CHECKPOINT).read_bytes()
    flags = ["--dataset", "digits", "--width", "0.5", "--method", "bame", "--nm", "1:4", "--epochs", "3",
             "--batch-size", "32", "--seed", "3", "--device", "cpu", "--delta-t", "4"]
    capsys.readouterr()
    assert main(["train", *flags, "--storage", "compressed", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["bame: error: --resume with a different config: storage: 'dense' -> 'compressed'"]
    assert (out / checkpoint.CHECKPOINT).read_bytes() == before  # the last good checkpoint is untouched


def test_eval_and_export_read_a_compressed_run(runs, tmp_path, capsys):
    run = runs["compressed"]
    summary = json.loads((run / "summary.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(summary["top1"], abs=1e-9)
    target = tmp_path / "w.safetensors"
    assert main(["export", str(run), "--format", "compressed", "--out", str(target)]) == 0
    from bame.export import load_compressed

    loaded = load_compressed(target).state_dict()
    dense = weights(run)
    names = [row["name"] for row in summary["layers"] if row["sparse"]]
    assert names and all(torch.equal(loaded[name], dense[name]) for name in names)
