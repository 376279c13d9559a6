"""Behaviour preserved across the reshaping of the method contract (issue: one method contract).

``tests/data/golden.json`` holds fixed-seed runs of every method recorded *before* the reshaping
(``tests/golden_runs.py``): losses, masks, weights, the FLOPs ledger and the layers' statistics. The same
runs must give identical values, with exactly two intended differences, each checked here:

* rule "nm-hardware" is one function for every method (:func:`bame.flops.hardware`): a block that keeps
  more than N (BAME's gradual budget k(t) > N) is charged dense, as LBC and MaxQ were already charged.
  Only the gradual phase's ``fwd_hw`` of the BAME family changes, to the dense forward FLOPs;
* SR-STE, Bi-Mask and MaxQ re-choose their masks every iteration through the one commit path, so their
  statistics now count those flips (they said "flips=0"); the counts are checked against a hand count in
  ``tests/test_contract.py``.
"""

import json

import pytest
from golden_runs import ENGINE_RUNS, GOLDEN, LOOP_RUNS, VARIANTS, all_runs

EXPECTED = json.loads(GOLDEN.read_text())
GRADUAL_HW = {"bame", "lma", "bame_bi", "rigl_nm", "bame-adamw", "bame-nesterov-sparse-gradual", "rigl_nm-every-block"}
COUNTS_FLIPS = {"sr_ste", "bi_mask", "maxq", "maxq-per-block-iteration"}
STEPS = 44  # 2 epochs of 22 steps


def _dense_forward_per_step() -> float:
    dense = EXPECTED["dense"]["flops_by_phase"]["dense"]
    return dense["fwd"] / dense["steps"]


@pytest.mark.parametrize("name", [*ENGINE_RUNS, *VARIANTS, *LOOP_RUNS])
def test_golden_run_is_unchanged(name):
    got, want = all_runs([name])[name], EXPECTED[name]
    assert got["losses"] == want["losses"]
    assert got["masks"] == want["masks"]
    assert got["weights"] == want["weights"]
    if "flops" not in want:
        return
    phases, want_phases = got["flops_by_phase"], want["flops_by_phase"]
    if name in GRADUAL_HW:  # the one intended FLOPs difference: gradual blocks keep k > N, charged dense
        gradual = phases["gradual"]
        assert gradual["fwd_hw"] == pytest.approx(_dense_forward_per_step() * gradual["steps"], rel=1e-12)
        delta = gradual["fwd_hw"] - want_phases["gradual"]["fwd_hw"]
        assert delta > 0
        assert got["flops"]["train_flops_hw"] == pytest.approx(want["flops"]["train_flops_hw"] + delta, rel=1e-12)
        want_phases = {**want_phases, "gradual": {**want_phases["gradual"], "fwd_hw": gradual["fwd_hw"]}}
        want = {**want, "flops": {**want["flops"], "train_flops_hw": got["flops"]["train_flops_hw"]}}
    assert phases == want_phases
    assert got["flops"] == want["flops"]
    if name in COUNTS_FLIPS:  # the intended statistics difference: every re-selection is counted now
        for layer, stats in got["stats"].items():
            assert want["stats"][layer]["total_flips"] == 0
            assert stats["updates"] == STEPS and stats["total_flips"] > 0, layer
    else:
        assert got["stats"] == want["stats"]
