"""``kernel="sparse"`` changes nothing numerically: a run equals the masked-dense run (issue 7, section 2)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bame
from bame.kernels import Plan, attach

PLANS = [Plan(fwd="embag", dx="embag", dw="sampled"), Plan(fwd="csr", dx="csr", dw="dense")]


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(),
                         nn.Unflatten(1, (64, 1, 1)), nn.Conv2d(64, 32, 1), nn.Flatten(), nn.Linear(32, 5))


@pytest.mark.parametrize("plan", PLANS, ids=["embag", "csr"])
@pytest.mark.parametrize("method,options", [("bame", {"t_i": 4, "t_f": 14, "delta_t": 3}), ("sr_ste", {}),
                                            ("bame_bi", {"t_i": 0, "t_f": 10, "delta_t": 2})])
def test_sparse_kernels_match_masked_dense(monkeypatch, plan, method, options):
    monkeypatch.setattr(attach, "choose_plan", lambda *a, **k: plan)
    calls = []
    original = attach.NMLinearFunction

    class Counting(original):
        @staticmethod
        def forward(ctx, *args):
            calls.append(args[6])  # dense_wgrad
            return original.forward(ctx, *args)

    monkeypatch.setattr(attach, "NMLinearFunction", Counting)
    torch.manual_seed(0)
    base = mlp()
    runs = {}
    for kernel in ("dense", "sparse"):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sp = bame.sparsify(model, opt, method, "1:4", total_steps=20, kernel=kernel, verbose=False, **options)
        g = torch.Generator().manual_seed(1)
        for _ in range(20):
            x, y = torch.randn(16, 32, generator=g), torch.randint(0, 5, (16,), generator=g)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        runs[kernel] = (model, sp)
    (dense_model, dense_sp), (sparse_model, sparse_sp) = runs["dense"], runs["sparse"]
    for name, mask in dense_sp.masks().items():
        assert torch.equal(mask, sparse_sp.masks()[name]), name
    for (name, a), b in zip(dense_model.state_dict().items(), sparse_model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5), name
    assert len(calls) >= 3 * 10  # three eligible layers ran the kernels once their masks were N:M
    if method == "bame":
        assert True in calls and False in calls  # dense weight gradient on update iterations only


def test_layers_without_kernels_say_why():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3), nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn(1, 3, 8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = bame.sparsify(model, opt, "static", "1:4", kernel="sparse", verbose=False)
    assert "1x1" in sp.layers[0].kernel_note
