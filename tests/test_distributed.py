"""Multi-process training (issue: reliability ... and multi-process training).

Two CPU processes with gloo. The rank processes are started the way torchrun starts them (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment) and run this file as a script; each scenario
leaves its results in files that the tests compare:

* ``library``: ``bame.sparsify`` on a model, then DistributedDataParallel, different data on each rank:
  the masks are decided from the all-reduced gradient, so they agree after every step;
* ``engine``: ``bame.engine.fit`` with ``check_masks``: both ranks end with identical weights, masks and
  sparsifier state, equal to one process with the same global batch;
* ``perturb``: as ``engine``, but rank 1 flips one mask entry before the check: both ranks must stop.

``bame train --nproc 2`` is tested through the command line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import assert_same, free_port, run_bame, subprocess_env, weights
from torch import nn

import bame
from bame import checkpoint, config, engine
from bame.errors import TrainingError

WORLD = 2
#: Small but real: digits, the Linear-only MLP (LayerNorm, no BatchNorm, so a batch split over two ranks
#: computes the same function as the whole batch in one process), 24 steps with t_i = 8, t_f = 16 and
#: delta_t = 2: gradual updates at 0, 2, 4, 6, four LMA/OBF updates at 8, 10, 12, 14, frozen after.
#: Width 0.25 (8k blocks per layer, not 65k): two ranks sum the gradient in another order than one
#: process, and one LMA near-tie decided the other way moves OBF's median of O to another level of its
#: discrete values, which flips the frozen state of a whole group of blocks; fewer blocks, fewer near-ties.
RUN = {"dataset": "digits", "model": "mlp", "width": 0.25, "method": "bame", "nm": "2:4", "epochs": 2,
       "max_steps": 24, "batch_size": 64, "seed": 0, "device": "cpu", "check_masks": True,
       "method_options": {"delta_t": 2}}
RUN_FLAGS = ["--dataset", "digits", "--model", "mlp", "--width", "0.25", "--method", "bame", "--nm", "2:4",
             "--epochs", "2", "--max-steps", "24", "--batch-size", "64", "--seed", "0", "--device", "cpu",
             "--check-masks", "--delta-t", "2"]
LIBRARY_STEPS = 24


# -- what each rank process runs ------------------------------------------------------------------------


def _library(out: Path, rank: int) -> None:
    dist.init_process_group("gloo")
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        sparsifier = bame.sparsify(model, optimizer, "bame", "2:4", total_steps=LIBRARY_STEPS, delta_t=2, t_i=4,
                                   t_f=20, verbose=False)
        ddp = nn.parallel.DistributedDataParallel(model)
        data = torch.Generator().manual_seed(100 + rank)  # each rank its own data: local gradients differ
        masks, losses = [], []
        for _ in range(LIBRARY_STEPS):
            x, y = torch.randn(16, 16, generator=data), torch.randint(0, 4, (16,), generator=data)
            optimizer.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            optimizer.step()
            masks.append({name: mask.clone() for name, mask in sparsifier.masks().items()})
            losses.append(float(F.cross_entropy(model(x), y)))
        torch.save({"masks": masks, "losses": losses, "model": model.state_dict(),
                    "sparsifier": sparsifier.state_dict()}, out / f"library-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _fit_and_keep(out: Path, rank: int, name: str, changes: dict) -> None:
    """``engine.fit`` of RUN with ``changes``; each rank saves its final weights and state as NAME-rankR.pt."""
    original = engine.finish

    def finish(run: engine.Run, last: dict) -> dict:
        held = {id(p) for p in run.net.parameters()}  # what the DistributedDataParallel wrapper syncs
        state = {"weights": checkpoint.plain_state_dict(run.model, run.sparsifier.masks()),
                 "sparsifier": run.sparsifier.state_dict(), "step": run.sparsifier.step_count,
                 "wrapper_holds_the_weights": all(id(layer.weight) in held for layer in run.sparsifier.layers)}
        torch.save(state, out / f"{name}-rank{rank}.pt")
        return original(run, last)

    engine.finish = finish
    try:
        engine.fit(config.build({**RUN, **changes}), out / f"{name}-run", force=True)
    finally:
        engine.finish = original


def _engine(out: Path, rank: int) -> None:
    _fit_and_keep(out, rank, "engine", {})


def _compressed(out: Path, rank: int) -> None:
    """Compressed storage from t_i on, with the timed sparse-kernel plans (rank 0's, on every rank); at 1:4,
    where every layer is stored compressed whatever its plan."""
    _fit_and_keep(out, rank, "compressed", {"storage": "compressed", "nm": "1:4"})


def _perturb(out: Path, rank: int) -> None:
    original = engine.check_masks_agree
    calls = []

    def check(run: engine.Run) -> None:
        calls.append(run.sparsifier.step_count - 1)
        if rank == 1 and len(calls) == 3:  # a single flipped entry in one layer of one rank
            run.sparsifier.layers[-1].mask.view(-1)[7] ^= True
        original(run)

    engine.check_masks_agree = check
    try:
        engine.fit(config.build({**RUN, "max_steps": 12}), out / "perturb-run", force=True)
        message = "no error"
    except TrainingError as err:
        message = str(err)
    finally:
        engine.check_masks_agree = original
    (out / f"perturb-rank{rank}.json").write_text(json.dumps({"message": message, "checks": calls}))


SCENARIOS = {"library": _library, "engine": _engine, "compressed": _compressed, "perturb": _perturb}


def _worker(names: list[str], out: Path) -> None:
    rank = int(os.environ["RANK"])
    ports = os.environ["BAME_TEST_PORTS"].split(",")
    for name, port in zip(names, ports):
        os.environ["MASTER_PORT"] = port  # a fresh rendezvous for each process group
        try:
            SCENARIOS[name](out, rank)
        except Exception:
            (out / f"{name}-rank{rank}.error").write_text(traceback.format_exc())
            raise


def launch(names: list[str], out: Path, timeout: float = 400) -> None:
    """Run the scenarios in WORLD rank processes; fail with their logs if one fails or hangs."""
    ports = ",".join(str(free_port()) for _ in names)
    procs, logs = [], []
    for rank in range(WORLD):
        env = subprocess_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                             LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", BAME_TEST_PORTS=ports)
        logs.append(out / f"rank{rank}.log")
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen([sys.executable, __file__, ",".join(names), str(out)], env=env,
                                          stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    report = "\n".join(f"--- rank {r} (exit {p.returncode})\n{logs[r].read_text()[-3000:]}"
                       for r, p in enumerate(procs))
    assert all(p.returncode == 0 for p in procs), report


# -- the tests --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> Path:
    """All three scenarios in one pair of rank processes (each process start costs seconds)."""
    out = tmp_path_factory.mktemp("ddp")
    launch(list(SCENARIOS), out)
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The engine scenario's run in this one process, with the same global batch."""
    out = tmp_path_factory.mktemp("single") / "run"
    engine.fit(config.build(RUN), out)
    return out


def test_library_masks_agree_after_every_step_with_ddp(ranks):
    a, b = (torch.load(ranks / f"library-rank{r}.pt", weights_only=True) for r in range(WORLD))
    assert a["losses"] != b["losses"]  # the ranks saw different data ...
    for t, (masks_a, masks_b) in enumerate(zip(a["masks"], b["masks"])):
        assert_same(masks_a, masks_b, f"masks after step {t}")  # ... and still decided the same masks
    assert_same(a["model"], b["model"], "model")
    assert_same(a["sparsifier"], b["sparsifier"], "sparsifier")
    changed = [t for t in range(1, LIBRARY_STEPS) if any(not torch.equal(a["masks"][t][k], a["masks"][t - 1][k])
                                                         for k in a["masks"][t])]
    assert any(t >= 4 for t in changed), "no evolution-phase mask update happened: the test would prove nothing"
    assert a["sparsifier"]["layers"]["0.weight"]["stats"]["updates"] > 0


def test_engine_ranks_hold_identical_weights_masks_and_state(ranks):
    a, b = (torch.load(ranks / f"engine-rank{r}.pt", weights_only=True) for r in range(WORLD))
    assert a["step"] == b["step"] == RUN["max_steps"]
    assert_same(a, b, "rank 0 vs rank 1")
    osc = [v["osc"] for v in a["sparsifier"]["layers"].values()]
    assert any(o.abs().sum() > 0 for o in osc), "OBF never ran: the comparison of its state would be empty"


def test_compressed_storage_ranks_hold_identical_values_masks_and_plans(ranks):
    a, b = (torch.load(ranks / f"compressed-rank{r}.pt", weights_only=True) for r in range(WORLD))
    assert a["step"] == b["step"] == RUN["max_steps"]
    assert_same(a, b, "rank 0 vs rank 1")  # the sparsifier states hold the slots and the chosen plans
    layers = a["sparsifier"]["layers"].values()
    assert a["sparsifier"]["switched"] and all(layer["plan"] is not None for layer in layers)
    assert a["wrapper_holds_the_weights"]  # DistributedDataParallel was rebuilt on the values at the switch
    dense = torch.load(ranks / "engine-rank0.pt", weights_only=True)
    assert dense["wrapper_holds_the_weights"]


def test_two_ranks_equal_one_process_with_the_same_global_batch(ranks, single):
    ddp = torch.load(ranks / "engine-rank0.pt", weights_only=True)["weights"]
    one = weights(single)
    masks = [k for k in one if k.endswith(".mask")]
    assert masks and all(torch.equal(ddp[k], one[k]) for k in masks), "masks differ from the single process"
    assert_same({k: v for k, v in ddp.items() if k not in masks}, {k: v for k, v in one.items() if k not in masks},
                "weights", atol=1e-5)
    # rank 0 wrote the run directory, once
    run = ranks / "engine-run"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert json.loads((run / "summary.json").read_text())["world_size"] == WORLD
    assert_same(weights(run), ddp, "rank 0's model.safetensors")


def test_check_masks_catches_a_rank_with_a_different_mask(ranks):
    reports = [json.loads((ranks / f"perturb-rank{r}.json").read_text()) for r in range(WORLD)]
    step = reports[0]["checks"][2]
    for report in reports:  # both ranks stop, at the same step, saying which
        assert report["message"] == f"masks differ between ranks after step {step}"
        assert report["checks"] == reports[0]["checks"]
    assert not (ranks / "perturb-run" / "model.safetensors").exists()


def test_bame_train_nproc_2(tmp_path, single):
    out = tmp_path / "run"
    done = run_bame(["train", "--nproc", "2", *RUN_FLAGS, "--out", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: top-1") == 1 and done.stdout.count("epoch   2/2") == 1  # rank 0 prints
    assert "Traceback" not in done.stderr
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == RUN["max_steps"]
    ddp, one = weights(out), weights(single)
    assert all(torch.equal(ddp[k], one[k]) for k in one if k.endswith(".mask"))
    assert_same(ddp, one, "weights", atol=1e-5)


def test_bame_train_nproc_bad_input_is_one_line(tmp_path):
    (tmp_path / "config.yaml").write_text("seed: 1\n")  # another run's directory
    done = run_bame(["train", "--nproc", "2", *RUN_FLAGS, "--out", str(tmp_path)])
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"bame: error: {tmp_path} already holds a run (config.yaml): use --resume to continue it or --force to "
        "overwrite it"]
    assert (tmp_path / "config.yaml").read_text() == "seed: 1\n"


if __name__ == "__main__":
    _worker(sys.argv[1].split(","), Path(sys.argv[2]))
