"""Crashes, signals and NaNs (issue: reliability ...): a run killed at any point resumes bit-exactly.

One uninterrupted reference run (in this process) and two runs in subprocesses, started together: one
gets SIGKILL and one SIGTERM in the middle of an epoch. Both are resumed with ``--resume`` and must end
with the reference's weights, masks, sparsifier and optimizer state, metrics and mask-update log, bit
for bit (CPU, one thread, same seed).
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import pytest
import torch
from helpers import assert_same, checkpoint_state, lines, once, start_bame, stop, temp_files, wait_for, weights

from bame import checkpoint, engine
from bame.cli import main

#: 44 steps per epoch, 132 in all: BAME's gradual phase is epoch 1, its evolution (an LMA/OBF update every
#: 4 steps, logged in updates.jsonl) epoch 2, the frozen phase epoch 3.
FLAGS = ["--dataset", "digits", "--width", "0.5", "--method", "bame", "--nm", "2:4", "--epochs", "3",
         "--batch-size", "32", "--delta-t", "4", "--seed", "3", "--device", "cpu"]
STEPS_PER_EPOCH = 1437 // 32
KILL_AFTER_STEP = STEPS_PER_EPOCH + 12  # well inside epoch 2, after the epoch-1 checkpoint


def _train(out: Path, *extra: str) -> int:
    return main(["train", *FLAGS, "--out", str(out), *extra])


def _update_steps(out: Path) -> list[int]:
    steps = []
    for line in lines(out / "updates.jsonl"):
        try:
            steps.append(json.loads(line)["step"])
        except json.JSONDecodeError:  # being written
            pass
    return steps


def _interrupt(proc, out: Path, sig: int, result: dict) -> None:
    """Wait until the run is in the middle of epoch 2, then send ``sig`` (in a thread)."""
    try:
        wait_for(lambda: any(s >= KILL_AFTER_STEP for s in _update_steps(out)), proc, what=f"step {KILL_AFTER_STEP}")
        result["code"] = stop(proc, sig)
    except BaseException as err:  # reported by the fixture
        result["error"] = err
        stop(proc)


def _make_runs(root: Path) -> dict[str, object]:
    paths = {name: root / name for name in ("reference", "killed", "terminated")}
    procs, results, threads = {}, {}, []
    for name, sig in (("killed", signal.SIGKILL), ("terminated", signal.SIGTERM)):
        procs[name] = start_bame(["train", *FLAGS, "--out", str(paths[name])], root / f"{name}.log")
        results[name] = {}
        threads.append(threading.Thread(target=_interrupt, args=(procs[name], paths[name], sig, results[name])))
        threads[-1].start()
    try:
        assert _train(paths["reference"]) == 0
    finally:
        for thread in threads:
            thread.join(timeout=600)
        for proc in procs.values():
            stop(proc)
    out: dict[str, object] = {name: str(path) for name, path in paths.items()}
    for name, result in results.items():
        if "error" in result:
            raise AssertionError(f"{name}: {result['error']}\n{(root / f'{name}.log').read_text()[-3000:]}")
        out[name + "_code"] = result["code"]
        out[name + "_log"] = str(root / f"{name}.log")
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The reference run and the two interrupted ones (once per session, also under xdist)."""
    made = once(tmp_path_factory, "resume-runs", _make_runs)
    return {k: Path(v) if isinstance(v, str) else v for k, v in made.items()}


def _assert_same_run(run: Path, reference: Path) -> None:
    assert_same(weights(run), weights(reference), "model.safetensors")
    got, want = checkpoint_state(run), checkpoint_state(reference)
    for key in ("model", "sparsifier", "optimizer", "ledger", "epoch", "batch", "rng"):
        assert_same(got[key], want[key], key)
    strip = [{k: v for k, v in json.loads(line).items() if k != "wall_s"} for line in lines(run / "metrics.jsonl")]
    assert strip == [{k: v for k, v in json.loads(line).items() if k != "wall_s"}
                     for line in lines(reference / "metrics.jsonl")]
    assert lines(run / "updates.jsonl") == lines(reference / "updates.jsonl")
    assert temp_files(run) == []


def test_sigkill_mid_epoch_then_resume_is_bit_exact(runs, capsys):
    run = runs["killed"]
    assert runs["killed_code"] == -signal.SIGKILL
    state = checkpoint.load(run / checkpoint.CHECKPOINT)  # the epoch-1 checkpoint, whole
    assert (state["epoch"], state["batch"]) == (1, 0)
    assert state["sparsifier"]["step"] == STEPS_PER_EPOCH
    assert max(_update_steps(run)) >= KILL_AFTER_STEP  # the log ran ahead of the checkpoint ...
    assert len(lines(run / "metrics.jsonl")) == 1
    # ... and a crash inside atomic_write would leave a temp file: resuming clears it
    (run / ".checkpoint.pt.crashed.tmp").write_bytes(b"half a checkpoint")
    assert _train(run, "--resume") == 0
    _assert_same_run(run, runs["reference"])


def test_sigterm_mid_epoch_saves_and_resume_is_bit_exact(runs):
    run = runs["terminated"]
    assert runs["terminated_code"] == 130
    log = runs["terminated_log"].read_text()
    errors = [line for line in log.splitlines() if line.startswith("bame: error:")]
    assert "Traceback" not in log and len(errors) == 1
    state = checkpoint.load(run / checkpoint.CHECKPOINT)
    step = state["sparsifier"]["step"]
    assert errors[0] == (f"bame: error: stopped by signal {int(signal.SIGTERM)} at step {step}; checkpoint saved: "
                         "continue with --resume")
    assert state["epoch"] == 1 and 0 < state["batch"] == step - STEPS_PER_EPOCH  # mid-epoch 2
    assert step > KILL_AFTER_STEP
    assert temp_files(run) == []
    assert _train(run, "--resume") == 0
    _assert_same_run(run, runs["reference"])


def test_resuming_a_finished_run_changes_nothing(runs, tmp_path):
    reference = runs["reference"]
    before = {name: (reference / name).read_bytes() for name in ("checkpoint.pt", "metrics.jsonl")}
    summary = json.loads((reference / "summary.json").read_text())
    assert _train(reference, "--resume") == 0
    after = json.loads((reference / "summary.json").read_text())
    assert after["top1"] == summary["top1"] is not None and after["steps"] == summary["steps"]
    assert {name: (reference / name).read_bytes() for name in before} == before


# -- NaN and inf -------------------------------------------------------------------------------------------


class _Poison:
    """Wraps ``F.cross_entropy``: counts the training calls; at ``at`` poisons the loss or its gradient.

    At the first call of epoch 2 it copies the epoch-1 checkpoint, to compare it with what is left.
    """

    def __init__(self, original, out: Path, at: int, where: str) -> None:
        self.original, self.out, self.at, self.where = original, out, at, where
        self.calls, self.snapshot = 0, None

    def __call__(self, logits, y, **kwargs):
        loss = self.original(logits, y, **kwargs)
        if not torch.is_grad_enabled():  # evaluation
            return loss
        if self.calls == STEPS_PER_EPOCH:
            self.snapshot = (self.out / checkpoint.CHECKPOINT).read_bytes()
        self.calls += 1
        if self.calls - 1 != self.at:
            return loss
        return loss * float("nan") if self.where == "loss" else _NanGradient.apply(loss)


class _NanGradient(torch.autograd.Function):
    """Identity forward (the loss stays finite); NaN gradient, so the step writes NaN weights."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@pytest.mark.parametrize(("where", "at", "message"), [
    ("loss", STEPS_PER_EPOCH + 5, f"loss is not finite at step {STEPS_PER_EPOCH + 5} (epoch 2)"),
    # the last step of epoch 2: its NaN weights would reach the epoch-2 checkpoint before any loss shows them
    ("gradient", 2 * STEPS_PER_EPOCH - 1, f"weights are not finite after step {2 * STEPS_PER_EPOCH - 1} ("),
])
def test_non_finite_stops_and_keeps_the_last_good_checkpoint(where, at, message, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    poison = _Poison(engine.F.cross_entropy, out, at, where)
    monkeypatch.setattr(engine.F, "cross_entropy", poison)
    assert _train(out) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"bame: error: {message}") and err[-1].endswith(f"the last good checkpoint in {out} "
                                                                                "is kept")
    assert sum(line.startswith("bame: error") for line in err) == 1
    assert poison.snapshot is not None and (out / checkpoint.CHECKPOINT).read_bytes() == poison.snapshot
    assert checkpoint.load(out / checkpoint.CHECKPOINT)["epoch"] == 1
    assert len(lines(out / "metrics.jsonl")) == 1 and temp_files(out) == []
    assert not (out / checkpoint.WEIGHTS).exists()


def test_huge_learning_rate_stops_with_a_message(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *FLAGS, "--lr", "1e12", "--max-steps", "30", "--out", str(out)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("bame: error: loss is not finite at step ") and "Traceback" not in "\n".join(err)


# -- atomic writes -------------------------------------------------------------------------------------------


def test_a_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save({"format": engine.FORMAT, "x": torch.ones(3)}, path)
    before = path.read_bytes()

    def half(f):
        f.write(before[: len(before) // 2])
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_write(path, half)
    assert path.read_bytes() == before and temp_files(tmp_path) == []
    assert torch.equal(checkpoint.load(path)["x"], torch.ones(3))
