"""A new user's first hour (issue 16): what the first commands do with their defaults.

Each test failed before its fix: ``--nproc`` workers with every core each (and other results than torchrun's),
a first digits run at chance, ``--resume`` that wanted every flag again and could not lengthen a run, files
written 0600 beside 0644 ones, help with internal metavars, a patch embedding dense only by accident.
(The data directory, ``--out`` and ``bame eval`` findings are tested in ``test_data.py``,
``test_cli_errors.py`` and ``test_engine.py``; MaxQ's in ``test_methods.py`` and ``test_golden.py``.)
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROOT, assert_same, checkpoint_state, free_port, lines, run_bame, subprocess_env, weights
from torch import nn

import bame
from bame import checkpoint, config, models
from bame.cli import build_parser, main
from bame.cli.train import worker_env
from bame.errors import ConfigError
from bame.policy import select_layers

# -- 2: --nproc sets the workers' threads as torchrun does -------------------------------------------------


def test_nproc_workers_get_one_thread_unless_the_user_set_it():
    env = worker_env({"PATH": "/bin"}, 1, 2, 29400)
    assert env == {"OMP_NUM_THREADS": "1", "PATH": "/bin", "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2",
                   "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29400"}
    assert worker_env({"OMP_NUM_THREADS": "3"}, 0, 2, 29400)["OMP_NUM_THREADS"] == "3"


TINY = ["train", "--dataset", "digits", "--model", "mlp", "--width", "0.25", "--nm", "2:4", "--epochs", "1",
        "--max-steps", "4", "--batch-size", "64", "--delta-t", "2", "--device", "cpu"]


@pytest.mark.slow
def test_nproc_and_torchrun_give_bit_identical_runs(tmp_path):
    """Neither launcher is told the thread count (the user did not set OMP_NUM_THREADS): with the full
    count per worker, --nproc gave other last bits than torchrun (and ran 30x slower on a busy machine)."""
    env = {k: v for k, v in subprocess_env().items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    launchers = {"nproc": [sys.executable, "-m", "bame", *TINY, "--nproc", "2"],
                 "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "-m", "bame", *TINY]}
    procs = {name: subprocess.Popen([*command, "--out", str(tmp_path / name)], stdout=subprocess.DEVNULL,
                                    stderr=open(tmp_path / f"{name}.log", "w"), env=env, cwd=ROOT)  # noqa: SIM115
             for name, command in launchers.items()}  # both at once: their process starts overlap
    for name, proc in procs.items():
        assert proc.wait(timeout=300) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    a, b = (tmp_path / name for name in launchers)
    assert_same(weights(a), weights(b), "model.safetensors")  # bit for bit (the file's metadata order varies)
    state_a, state_b = checkpoint_state(a), checkpoint_state(b)
    for key in ("model", "optimizer", "sparsifier", "ledger"):
        assert_same(state_a[key], state_b[key], key)
    rows = [[{k: v for k, v in json.loads(row).items() if k != "wall_s"} for row in lines(run / "metrics.jsonl")]
            for run in (a, b)]
    assert rows[0] == rows[1] and len(rows[0]) == 1
    assert json.loads((a / "summary.json").read_text())["world_size"] == 2


# -- 4: data sets carry defaults -----------------------------------------------------------------------------


def test_dataset_defaults_sit_between_the_config_and_a_recipe():
    digits = config.build_run({"dataset": "digits"})
    assert (digits.batch_size, digits.epochs, digits.method_options) == (64, 30, {"delta_t": 10})
    fashion = config.build_run({"dataset": "fashion-mnist", "method": "lma"})
    assert (fashion.batch_size, fashion.epochs, fashion.method_options) == (128, 6, {"delta_t": 50})
    static = config.build_run({"method": "static"})  # digits, a method without delta_t: not given to it
    assert (static.batch_size, static.method_options) == (64, {})
    cifar = config.build_run({"dataset": "cifar10"})  # no defaults of its own: the paper's (TrainConfig's)
    assert (cifar.batch_size, cifar.epochs, cifar.method_options) == (256, 10, {})
    recipe, flags = {"batch_size": 32, "method_options": {"delta_t": 7, "alpha": 0.25}}, {"epochs": 4}
    cfg = config.build_run(recipe, flags)
    assert (cfg.batch_size, cfg.epochs, cfg.method_options) == (32, 4, {"delta_t": 7, "alpha": 0.25})
    assert config.build_run(recipe, {"batch_size": 16, "method_options": {"delta_t": 3}}).method_options == {
        "delta_t": 3, "alpha": 0.25}


def test_a_first_run_on_digits_learns_with_the_defaults(tmp_path, capsys):
    """``bame train --dataset digits --epochs 4`` (BAME 1:4) was at chance (10.6 %): a global batch of 256
    leaves 5 steps per epoch. With digits' defaults: 22 steps per epoch, 93.3 % here (seeds 1, 2: 87.5 %,
    87.8 %)."""
    out = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--epochs", "4", "--nm", "1:4", "--device", "cpu",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["top1"] >= 85.0 and summary["steps"] == 4 * (1437 // 64)
    saved = yaml.safe_load((out / "config.yaml").read_text())  # what was used, written out
    assert (saved["batch_size"], saved["epochs"], saved["method_options"]) == (64, 4, {"delta_t": 10})


# -- 8: --resume alone, and --epochs lengthens a run ---------------------------------------------------------

SHORT = ["train", "--dataset", "digits", "--width", "0.5", "--nm", "2:4", "--epochs", "2", "--batch-size", "128",
         "--delta-t", "2", "--lr", "0.05", "--device", "cpu"]  # 11 steps per epoch: T = 22, t_i = 7, t_f = 15


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("first-hour") / "run"
    assert main([*SHORT, "--out", str(out)]) == 0
    return out


def test_resume_alone_takes_the_runs_own_config(short_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    before = {name: (run / name).read_bytes() for name in ("checkpoint.pt", "metrics.jsonl", "config.yaml")}
    assert main(["train", "--out", str(run), "--resume"]) == 0  # no other flag: nothing to repeat
    assert {name: (run / name).read_bytes() for name in before} == before


def test_epochs_lengthens_a_finished_run(short_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    masks = {k: v for k, v in weights(run).items() if k.endswith(".mask")}
    assert main(["train", "--out", str(run), "--resume", "--epochs", "4"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    # T = 44 would put t_i, t_f at 15, 29; both were passed at step 22 and stay where they happened
    assert saved["epochs"] == 4 and saved["method_options"] == {"delta_t": 2, "t_i": 7, "t_f": 15}
    assert saved["resolved"]["total_steps"] == 44 and saved["resolved"]["method_options"]["t_f"] == 15
    rows = [json.loads(row) for row in lines(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [11, 22, 33, 44]
    # the cosine LR is re-resolved over the new T: at the last step of epoch 3, 0.05 * (1 + cos(pi 32/44)) / 2
    assert rows[2]["lr"] == pytest.approx(0.025 * (1 + math.cos(math.pi * 32 / 44)), rel=1e-12)
    assert rows[3]["lr"] == pytest.approx(0.025 * (1 + math.cos(math.pi * 43 / 44)), rel=1e-12)
    after = weights(run)
    assert all((after[k] == v).all() for k, v in masks.items())  # frozen since step 15: the masks stay
    assert json.loads((run / "summary.json").read_text())["steps"] == 44
    assert main(["train", "--out", str(run), "--resume"]) == 0  # the lengthened run resumes as itself
    # killed in its first lengthened epoch: config.yaml is rewritten, the checkpoint is still the 2-epoch one
    shutil.copy(short_run / "checkpoint.pt", run / "checkpoint.pt")
    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert_same(weights(run), after, "model.safetensors")  # the same lengthened run, bit for bit
    assert [json.loads(row)["step"] for row in lines(run / "metrics.jsonl")] == [11, 22, 33, 44]
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--epochs", "3"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "bame: error: --epochs 3 is fewer than the run's 4: a run can be lengthened on --resume, not shortened")
    assert main(["train", "--out", str(run), "--resume", "--epochs", "6", "--lr", "0.1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "bame: error: --resume with a different config: epochs: 4 -> 6; lr: 0.05 -> 0.1")


def test_only_passed_schedule_points_stay():
    old, new = {"delta_t": 2, "t_i": 7, "t_f": 15}, {"delta_t": 2, "t_i": 15, "t_f": 29}
    assert config.pins("bame", old, new, 22) == {"t_i": 7, "t_f": 15}
    assert config.pins("bame", old, new, 10) == {"t_i": 7}  # t_f is ahead: it follows the new T
    assert config.pins("bame", old, new, 7) == {}  # t_i's selection runs before iteration 7: not passed
    assert config.pins("bame", {**old, "t_i": 5}, {**new, "t_i": 5}, 22) == {"t_f": 15}  # an iteration stays
    assert config.pins("asp", {"prune_at": 22}, {"prune_at": 44}, 44) == {"prune_at": 22}


# -- 9: one file mode ------------------------------------------------------------------------------------------


def test_every_file_bame_writes_has_the_users_umask(short_run, tmp_path):
    previous = os.umask(0o027)
    try:
        run = tmp_path / "run"
        assert main([*SHORT, "--max-steps", "2", "--out", str(run)]) == 0
        assert main(["export", str(run), "--format", "dense"]) == 0
        checkpoint.atomic_write(tmp_path / "plain.bin", lambda f: f.write(b"x"))
    finally:
        os.umask(previous)
    files = [p for p in run.rglob("*") if p.is_file()] + [tmp_path / "plain.bin"]
    assert {p.name for p in files} >= {"config.yaml", "checkpoint.pt", "model.safetensors", "summary.json",
                                      "model.dense.safetensors", "metrics.jsonl"}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: "0o640" for p in files}


# -- 11: the help says what each flag is ----------------------------------------------------------------------


def _train_help_actions() -> list:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    return [a for a in sub.choices["train"]._actions if a.option_strings and a.dest != "help"]


def test_train_help_has_no_internal_names_and_rounded_numbers(capsys):
    for action in _train_help_actions():
        flag = action.option_strings[0]
        words = set(re.findall(r"[a-z0-9]+", flag.lower()))
        text = re.sub(r"\(default:? [^)]*\)", "", action.help or "")
        assert set(re.findall(r"[a-z0-9]+", text.lower())) - words, f"{flag}: help only repeats the name"
        # a metavar made from the destination (MOPT_DELTA_T, CONFIG for --config) says nothing the flag does not
        internal = {action.dest.upper(), flag.lstrip("-").replace("-", "_").upper()}
        assert action.metavar not in internal and not str(action.metavar).startswith("MOPT_"), (flag, action.metavar)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert not re.search(r"\d\.\d{5,}", text) and "MOPT_" not in text
    assert "--batch-size N global batch size" in text and "(default: 256; digits 64, fashion-mnist 128)" in text
    assert "(default 100; digits 10, fashion-mnist 50)" in text  # delta_t
    assert "--out DIR" in text and "--nproc K" in text and "--config RECIPE" in text


# -- 12: the layer policy decides about a stem or patch embedding --------------------------------------------


def test_a_patch_embedding_is_dense_by_the_policy():
    model = models.create("vit_tiny", num_classes=10, image_size=16)
    for axis in ("cin", "kflat"):  # kflat: 3 x 4 x 4 = 48 inputs per block row divide by 4; it was sparse
        reasons = {c.name: c.reason for c in select_layers(model, 4, axis)}
        assert reasons["patch_embed.proj"] == "stem / patch embedding (the first convolution, strided)", axis
        assert reasons["head"] == "classifier head (the model's bame_dense_layers)"
    plain = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8, 4))
    plain.bame_dense_layers = ("0", "3")
    reasons = {c.name: c.reason for c in select_layers(plain, 4, "cin")}
    assert reasons == {"0": "stem / patch embedding (the model's bame_dense_layers)", "1": None,
                       "3": "classifier head (the model's bame_dense_layers)"}


# -- 1: sparsify a DistributedDataParallel wrapper -------------------------------------------------------------


def test_sparsifying_a_ddp_wrapper_is_refused_in_one_line(tmp_path):
    """Its reducer holds the weights bame replaces: the second step used to fail inside DDP."""
    script = tmp_path / "ddp.py"
    script.write_text(
        "import torch, torch.distributed as dist, bame\n"
        "from bame.errors import ConfigError\n"
        "dist.init_process_group('gloo', rank=0, world_size=1, init_method='tcp://127.0.0.1:%d')\n"
        "net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))\n"
        "ddp = torch.nn.parallel.DistributedDataParallel(net)\n"
        "try:\n"
        "    bame.sparsify(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1), 'bame', '2:4', total_steps=40)\n"
        "except ConfigError as err:\n"
        "    print(err)\n"
        "dist.destroy_process_group()\n".replace("%d", str(free_port())))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=subprocess_env(),
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == ("sparsify the model before wrapping it in DistributedDataParallel: "
                                   "bame.sparsify(model, ...), then DistributedDataParallel(model)")


# -- 3: a schedule in which the method's mechanism never runs ---------------------------------------------------


@pytest.mark.parametrize("method", ["bame", "lma", "rigl_nm"])
def test_an_evolution_phase_without_an_update_is_warned_with_the_numbers(method):
    net = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    with pytest.warns(UserWarning) as seen:
        bame.sparsify(net, torch.optim.SGD(net.parameters(), lr=0.1), method, "2:4", total_steps=30, verbose=False)
    assert [str(w.message) for w in seen] == [
        f"{method}: delta_t=100 leaves the evolution phase [10, 20) of this 30-step run without a single mask "
        "update (the first would come at 100): pass delta_t at most 10, or a longer run"]
    assert seen[0].filename == __file__  # points at the user's sparsify line
    # one update in the window is enough; t_f = t_i (no evolution phase at all) is the control, allowed
    for options in ({"delta_t": 10}, {"delta_t": 4, "t_i": 13, "t_f": 17}, {"t_f": 1 / 3}):
        net = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            bame.sparsify(net, torch.optim.SGD(net.parameters(), lr=0.1), method, "2:4", total_steps=30,
                          verbose=False, **options)


def test_bame_train_warns_about_such_a_schedule_in_one_line(tmp_path):
    done = run_bame(["train", "--dataset", "digits", "--method", "bame", "--epochs", "1", "--delta-t", "500",
                     "--max-steps", "6", "--out", str(tmp_path / "run")])
    assert done.returncode == 0, done.stderr[-2000:]
    assert [line for line in done.stderr.splitlines() if "delta_t" in line] == [
        "bame: warning: bame: delta_t=500 leaves the evolution phase [2, 4) of this 6-step run without a single "
        "mask update (the first would come at 500): pass delta_t at most 2, or a longer run"]


# -- 10: a squashed sparsifier says it is detached ---------------------------------------------------------------


def test_a_squashed_sparsifier_says_it_is_detached_and_refuses_to_step():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sp = bame.sparsify(net, opt, "sr_ste", "2:4", layer_filter=lambda n, m: True, verbose=False)
    assert "density=0.5000" in repr(sp)
    sp.squash()
    assert repr(sp) == ("Sparsifier(method=sr_ste, nm=2:4, step=0, detached: squash() baked the masks of 2 layers "
                        "into plain weights; it no longer steps)")
    with pytest.raises(ConfigError, match="^this sparsifier is detached: squash"):
        sp.step()
    before = [p.detach().clone() for p in net.parameters()]
    net(torch.randn(4, 16)).sum().backward()
    opt.step()  # a plain optimizer again: no hook runs, the count stays
    assert sp.step_count == 0 and any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


# -- 11: which layers stay dense, seen without configuring logging -----------------------------------------------


def test_layers_left_dense_are_a_warning_in_one_line():
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.Flatten(), nn.LazyLinear(10))
    net(torch.randn(1, 3, 8, 8))
    with pytest.warns(UserWarning) as seen:
        sp = bame.sparsify(net, torch.optim.SGD(net.parameters(), lr=0.1), "static", "2:4")
    messages = [str(w.message) for w in seen if "stay dense" in str(w.message)]
    assert messages == ["bame: 2 of 3 weight layers stay dense: 0.weight (input channels=3 not divisible by M=4); "
                        "4.weight (classifier head)"]
    assert seen[0].filename == __file__  # points at the user's line
    assert sp.dense_layers == {"0.weight": "input channels=3 not divisible by M=4", "4.weight": "classifier head"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bame.sparsify(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)), None, "static", "2:4", verbose=False)
