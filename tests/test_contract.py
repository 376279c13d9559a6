"""The method contract (issue: one method contract): plans, the one commit path, options, saved state.

Hand-made cases: a twelfth method written as a plan and a score; flips of every-iteration re-selections
counted by hand; options refused when built (before any data is read); masks saved once; the resolved
options in ``config.yaml``; model options from the config, the command line and recipes.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import bame
from bame import config, methods
from bame.cli import main
from bame.contract import Method, Step
from bame.errors import ConfigError
from bame.nm import topn_mask

ROOT = Path(__file__).resolve().parents[1]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))


def run(model: nn.Module, opt, steps: int, seed: int = 0, each=None) -> None:
    g = torch.Generator().manual_seed(seed)
    for t in range(steps):
        x, y = torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if each is not None:
            each(t)


# ------------------------------------------------------------------------------------------ the plan
class Reverse(Method):
    """A twelfth method in a plan and a score: every 3 iterations, keep the N *smallest* |W| (a toy)."""

    name = "reverse_test"

    def plan(self, t: int) -> Step:
        return Step("sparse", keep=self.n, select=t % 3 == 0, record="update")

    def select(self, t, layer, keep):
        return topn_mask(-layer.blocks(layer.weight.detach()).abs(), keep)


def test_a_new_method_is_a_plan_and_a_score(monkeypatch):
    methods.available()  # discovered before the registry is copied
    monkeypatch.setattr(methods.REGISTRY, "_entries", dict(methods.REGISTRY._entries))
    methods.register(Reverse)
    assert "reverse_test" in methods.available()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = bame.sparsify(model, opt, "reverse_test", "1:4", total_steps=7, verbose=False)
    layer = sp.layers[0]
    seen = []
    run(model, opt, 7, each=lambda t: seen.append((layer.mask.clone(), layer.weight.detach().clone())))
    # Masks change only before the forward of t = 3 and 6, i.e. in the post-hooks of steps 2 and 5, and
    # then keep the N smallest |W| of the weights of that moment.
    changed = [t for t in range(1, 7) if not torch.equal(seen[t][0], seen[t - 1][0])]
    assert set(changed) <= {2, 5} and changed
    for t in (2, 5):
        mask, weight = seen[t]
        assert torch.equal(layer.blocks(mask), topn_mask(-layer.blocks(weight).abs(), 1))
    # The derived facts follow the plan: final from t = 0, may change before the forward of 3 and 6.
    assert sp.method.mask_is_final(0) and [t for t in range(7) if sp.method.mask_may_change(t)] == [2, 5]
    assert sp.layers[0].stats["updates"] == 3  # t = 0 (at attach), 3 and 6, each recorded as an update event
    assert [e["step"] for e in sp.pop_events() if e["layer"] == layer.name] == [0, 3, 6]


def test_step_refuses_unknown_values():
    with pytest.raises(ValueError, match="zero"):
        Step("x", keep=2, zero="some")
    with pytest.raises(ValueError, match="grad"):
        Step("x", keep=2, grad="sparse")
    assert Step("x", keep=2, evolve=True).dense_wgrad and Step("x", keep=2, grad="dense").dense_wgrad
    assert not Step("x", keep=2).dense_wgrad


# ------------------------------------------------------------------- the one commit path: flips counted
@pytest.mark.parametrize("method", ["sr_ste", "bi_mask", "maxq"])
def test_every_iteration_reselection_counts_its_flips(method):
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    sp = bame.sparsify(model, opt, method, "1:4", total_steps=20, layer_filter=lambda n, m: True, verbose=False)
    masks = [{k: v.clone() for k, v in sp.masks().items()}]
    run(model, opt, 20, each=lambda t: masks.append({k: v.clone() for k, v in sp.masks().items()}))
    for layer in sp.layers:
        by_hand = sum(int((masks[t][layer.name] != masks[t - 1][layer.name]).sum()) for t in range(1, 21))
        assert by_hand > 0
        assert layer.stats["total_flips"] == by_hand and layer.stats["updates"] == 20
    text = repr(sp)
    assert "flips=0" not in text and f"flips={sp.layers[0].stats['total_flips']}" in text
    # One aggregated event per layer every record_every re-selections (ceil(20 / 200) = 1: every one).
    events = [e for e in sp.pop_events() if e["layer"] == sp.layers[0].name]
    assert sp.record_every == 1 and len(events) == 20
    assert sum(e["last_flips"] for e in events) == sp.layers[0].stats["total_flips"]


@pytest.mark.parametrize("accept", [False, True], ids=["held", "accepted"])
@pytest.mark.parametrize("storage", ["dense", "compressed"])
def test_evolution_events_count_proposed_and_committed_flips_against_the_old_mask(storage, accept, monkeypatch):
    """OBF holding every block back, or letting every proposal through: the flips LMA proposed and those
    committed, both counted against the mask before the update (in dense storage the old mask is a view
    of the mask the commit changes)."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sp = bame.sparsify(model, opt, "bame", "1:4", total_steps=40, t_i=0, t_f=40, delta_t=2,
                       layer_filter=lambda n, m: True, verbose=False, storage=storage)
    seen = []

    def restrict(t, layer, old, proposal, w):
        seen.append(int((proposal != old).sum()))
        return (proposal if accept else old).clone(), 0.0 if accept else 1.0

    monkeypatch.setattr(sp.method, "restrict", restrict)
    run(model, opt, 5)
    events = [e for e in sp.pop_events() if "proposed_flips" in e]
    assert len(events) == len(seen) == 3 * len(sp.layers)  # updates at t = 0, 2, 4
    assert [e["proposed_flips"] for e in events] == seen and sum(seen) > 0
    assert [e["last_flips"] for e in events] == (seen if accept else [0] * len(seen))


def test_reselection_events_are_aggregated_over_windows():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = bame.sparsify(model, opt, "sr_ste", "2:4", total_steps=1000, verbose=False)
    assert sp.record_every == 5  # ceil(1000 / 200)
    run(model, opt, 12)
    events = [e for e in sp.pop_events() if e["layer"] == sp.layers[0].name]
    assert [(e["step"], e["window"]) for e in events] == [(5, 5), (10, 5)]  # re-selections at t = 1..5, 6..10
    state = sp.state_dict()["layers"][sp.layers[0].name]["stats"]
    assert state["window"] == 2  # t = 11, 12 wait for the next event; resumed exactly from the state


# ------------------------------------------------------------------------------------------ options
def test_options_are_checked_when_built():
    bame_cls = methods.get("bame")
    with pytest.raises(ConfigError, match="delta_t=0 must be at least 1"):
        bame_cls.make_options(delta_t=0)
    with pytest.raises(ConfigError, match="delta_t must be int"):
        bame_cls.make_options(delta_t="5")
    with pytest.raises(ConfigError, match="alpha=2 must be at most 1"):
        bame_cls.make_options(alpha=2)
    with pytest.raises(ConfigError, match="freeze must be one of and, or"):
        bame_cls.make_options(freeze="xor")
    with pytest.raises(ConfigError, match="t_f >= t_i"):
        bame_cls.make_options(t_i=0.5, t_f=0.25)
    with pytest.raises(ConfigError, match="t_i=1.5 is a float"):
        bame_cls.make_options(t_i=1.5)
    with pytest.raises(ConfigError, match="delta_t=0"):
        config.build({"method": "bame", "method_options": {"delta_t": 0}})
    bame_cls.make_options(t_i=100, t_f=0.5)  # an iteration and a fraction: compared once T is known
    for cls in methods.REGISTRY.values().values():  # every default is a valid value
        cls.make_options()
        for f in dataclasses.fields(cls.Options):
            assert f.metadata.get("help"), f"{cls.name}.{f.name} has no help"


def test_a_bad_option_fails_before_the_data_set_is_opened(tmp_path):
    missing = tmp_path / "no-such-dir"
    for extra in ([], ["--nproc", "2"]):
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "bame", "train", "--dataset", "fashion-mnist", "--data-dir",
                               str(missing), "--delta-t", "0", "--out", str(tmp_path / "run"), *extra],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert done.returncode == 2
        assert done.stderr.strip().splitlines() == ["bame: error: delta_t=0 must be at least 1"]
        assert time.monotonic() - started < 60 and not (tmp_path / "run").exists()


def test_help_says_what_each_option_does_for_each_method(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # words argparse wrapped at a hyphen
    assert "MOPT_" not in text and "0.3333333333" not in text
    alpha = re.search(r"--alpha X (.*?) --", text).group(1)
    assert "[bame, bame_bi] OBF: a block is heavy" in alpha and "[rigl_nm] RigL-NM: initial drop fraction" in alpha
    assert "(default 0.3333)" in text and "--model-option KEY=VALUE" in text


# --------------------------------------------------------------------------------------- saved state
def test_masks_and_method_state_are_saved_once():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = bame.sparsify(model, opt, "bame", "1:4", total_steps=30, t_i=0, delta_t=2, verbose=False)
    run(model, opt, 5)
    keys = list(model.state_dict())
    assert not [k for k in keys if ".parametrizations.weight.0." in k]
    assert [k for k in keys if k.endswith("original")] == [f"{layer.module_name}.parametrizations.weight.original"
                                                            for layer in sp.layers]
    state = sp.state_dict()
    assert {"mask", "osc", "sad", "stats"} <= set(state["layers"][sp.layers[0].name])
    # A model state dict from before (masks and state saved there too) still loads: the extra keys are
    # ignored, the sparsifier's state restores them.
    legacy = dict(model.state_dict())
    for layer in sp.layers:
        for name in ("mask", *layer.state_names):
            legacy[f"{layer.module_name}.parametrizations.weight.0.{name}"] = getattr(layer.par, name).clone()
    model2 = mlp()
    sp2 = bame.sparsify(model2, torch.optim.SGD(model2.parameters(), lr=0.1), "bame", "1:4", total_steps=30,
                        t_i=0, delta_t=2, verbose=False)
    model2.load_state_dict(legacy)  # strict
    sp2.load_state_dict(state)
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(sp.layers, sp2.layers, strict=True))


def test_step_is_a_count_and_step_is_a_harmless_call():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = bame.sparsify(model, opt, "static", "1:4", total_steps=10, verbose=False)
    run(model, opt, 3)
    assert sp.step_count == 3
    with pytest.warns(UserWarning, match="does nothing"):
        sp.step()  # a torch.ao.pruning habit: no error, no double update
    assert sp.step_count == 3


def test_resolved_options_go_into_config_yaml(tmp_path):
    cfg = config.build({"dataset": "digits", "method": "bame", "nm": "1:4", "epochs": 2, "batch_size": 128,
                        "width": 0.5, "method_options": {"delta_t": 3}})
    from bame.engine import fit

    fit(cfg, tmp_path / "run")
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    resolved = written["resolved"]
    assert resolved["total_steps"] == 2 * (1437 // 128) == 22 and resolved["steps_per_epoch"] == 11
    assert resolved["method_options"]["t_i"] == round(22 / 3) == 7 and resolved["method_options"]["t_f"] == 15
    assert written["method_options"] == {"delta_t": 3}  # the options as given stay as given
    assert config.load_recipe(tmp_path / "run" / "config.yaml")["method"] == "bame"  # still a valid recipe


# --------------------------------------------------------------------------------------- model options
def test_model_options_reach_the_model_from_config_cli_and_recipes(tmp_path):
    from bame.cli.options import resolve
    from bame.engine import create_model

    def shortcut_convs(cfg) -> int:
        model = create_model(cfg)
        return sum(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules())

    base = {"dataset": "cifar10", "model": "resnet20"}
    assert shortcut_convs(config.build(base)) == 0  # option A: parameter-free shortcuts
    assert shortcut_convs(config.build(base, {"model_options": {"shortcut": "B"}})) == 2
    recipe = tmp_path / "r.yaml"
    recipe.write_text("dataset: cifar10\nmodel: resnet20\nmodel_options: {shortcut: B}\n")
    parser = __import__("bame.cli", fromlist=["build_parser"]).build_parser()
    args = parser.parse_args(["train", "--config", str(recipe)])
    assert shortcut_convs(resolve(args)) == 2
    args = parser.parse_args(["train", "--dataset", "cifar10", "--model", "resnet20", "--model-option", "shortcut=B"])
    assert resolve(args).model_options == {"shortcut": "B"}
    with pytest.raises(ConfigError, match="has no option 'depth'"):
        create_model(config.build(base, {"model_options": {"depth": 3}}))


def test_an_option_that_does_not_fit_the_run_fails_before_the_data_is_read(tmp_path):
    # t_i = 500 iterations after t_f = 0.5 of a 2-epoch fashion-mnist run (2 x 234 steps): only T tells
    cfg = config.build({"dataset": "fashion-mnist", "data_dir": str(tmp_path / "nothing-here"), "epochs": 2,
                        "method": "bame", "method_options": {"t_i": 500, "t_f": 0.5}})
    from bame.engine import fit

    with pytest.raises(ConfigError, match="t_f=234 must not come before t_i=500"):
        fit(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_step_with_a_closure_masks_the_closures_gradient():
    """``optimizer.step(closure)`` (Lightning's automatic optimization): the gradient exists only once the
    closure ran; the pre-hook runs it first, once, and the result equals a step without closure."""
    results = []
    for with_closure in (False, True):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sp = bame.sparsify(model, opt, "bame", "1:4", total_steps=12, t_i=0, delta_t=3, verbose=False)
        calls = []
        g = torch.Generator().manual_seed(0)
        for _ in range(6):
            x, y = torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)

            def closure(model=model, opt=opt, x=x, y=y, calls=calls):
                calls.append(1)
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            if with_closure:
                opt.step(closure)
            else:
                closure()
                opt.step()
        assert len(calls) == 6  # evaluated once per step
        results.append([p.detach().clone() for p in model.parameters()] + list(sp.masks().values()))
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
    model = mlp()
    lbfgs = torch.optim.LBFGS(model.parameters())
    bame.sparsify(model, lbfgs, "static", "1:4", verbose=False)
    with pytest.raises(ConfigError, match="not LBFGS"):
        lbfgs.step(lambda: F.cross_entropy(model(torch.randn(2, 16)), torch.tensor([0, 1])))


def test_lma_regrowth_statistics_by_hand():
    from bame.lma import regrowth

    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [2.0, 0.0, 0.0, 1.0]])
    g = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 4.0, 0.0, 1.0]])
    mask = torch.tensor([[False, False, True, True], [True, False, False, True]])
    # block 0: kept |G W| = 3, 4; pruned 0.5 G^2 = 0.5: ratio 0.5 / 3. Block 1: kept 2, 1; pruned 8, 0: ratio 8.
    stats = regrowth(w, g, mask, 2, 0.5)
    assert stats == {"regrow_share": 0.5, "regrow_ratio": float(f"{0.5 / 3:.4g}")}  # median: the lower middle
