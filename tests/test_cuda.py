"""bame on an accelerator (issue: bame on the stack users train with).

Two kinds of tests:

* everywhere: the ordinary training step of every method runs on the ``meta`` device, whose tensors hold
  no values. Any line of bame that reads a tensor's value on the host (``.item()``, ``int(t)``,
  ``bool(t)``, ``.tolist()``: a device-to-host sync on CUDA) fails there, so this proves the steps are free
  of hidden syncs without a GPU. Update iterations and attach time read values on purpose (events,
  statistics), a few times per ``delta_t``, not per step.
* on CUDA (``benchmarks/gpu_check.sh`` runs them on a GPU machine; skipped elsewhere, with that reason):
  the kernels, masking, every method's invariants under AMP, resume and the sync check with
  ``torch.cuda.set_sync_debug_mode``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bame
from bame import methods
from bame.nm import is_nm

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device: benchmarks/gpu_check.sh runs these on a GPU")
#: Options that put iteration 101 in each method's steady phase and 100 on an update (BAME's family).
STEADY = {"bame": {"t_i": 0, "t_f": 10**6, "delta_t": 100}, "lma": {"t_i": 0, "t_f": 10**6, "delta_t": 100},
          "rigl_nm": {"t_i": 0, "t_f": 10**6, "delta_t": 100}, "bame_bi": {"t_i": 0, "t_f": 10**6, "delta_t": 100},
          "asp": {"prune_at": 0}, "maxq": {"decay_start": 0, "decay_end": 0},
          "lbc": {"t_i": 0, "t_f": 2000, "granularity": "iteration"}, "bi_mask": {"perm_interval": 1000}}
#: Methods whose attach reads values once (Bi-Mask's permutation search, LBC's covered fraction): their
#: ordinary step is the same code as SR-STE's (Bi-Mask) or reads nothing (LBC), checked on CUDA below.
ATTACH_READS = {"bi_mask", "lbc"}


def mlp(device: str | torch.device = "cpu") -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).to(device)


def masked_methods() -> list[str]:
    return [name for name, cls in methods.REGISTRY.values().items() if cls.uses_masks]


def steady_step(model: nn.Module, opt: torch.optim.Optimizer, sp: bame.Sparsifier, t: int,
                device: str | torch.device) -> None:
    sp.step_count = t  # harness: the iteration to run (as benchmarks/common.py does)
    sp.prepare(t)
    x = torch.randn(8, 16, device=device)
    y = torch.zeros(8, dtype=torch.long, device=device)
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


# Compressed storage for the methods that can have it (the others refuse it: tested in test_compressed.py).
@pytest.mark.parametrize("method, storage", [
    (method, storage) for method in sorted(set(masked_methods()) - ATTACH_READS) for storage in ("dense", "compressed")
    if storage == "dense" or not methods.get(method).dense_every_step])
def test_ordinary_steps_read_nothing_back_to_the_host(method, storage):
    model = mlp("meta")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = bame.sparsify(model, opt, method, "1:4", total_steps=10**6, verbose=False, storage=storage,
                       kernel="dense", **STEADY.get(method, {}))
    for _ in range(2):
        steady_step(model, opt, sp, 101, "meta")  # a value read on the host would raise here
    assert sp.step_count == 102


# ------------------------------------------------------------------------------------------- on CUDA
@needs_cuda
@pytest.mark.parametrize("method", masked_methods())
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_every_method_trains_on_cuda_with_amp(method, amp):
    model = mlp("cuda")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = bame.sparsify(model, opt, method, "2:4", total_steps=40, verbose=False,
                       **({"delta_t": 5} if "delta_t" in dir(methods.get(method).Options) else {}))
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    for _ in range(40):
        x, y = torch.randn(16, 16, device="cuda"), torch.randint(0, 4, (16,), device="cuda")
        with torch.autocast("cuda", dtype=dtype):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    assert torch.isfinite(loss)
    if sp.method.mask_is_final(sp.step_count - 1):
        assert all(is_nm(layer.mask, 2, 4) for layer in sp.layers)


@needs_cuda
@pytest.mark.parametrize("method", ["static", "sr_ste", "bame", "bame_bi", "maxq"])
def test_ordinary_cuda_steps_do_not_sync(method):
    model = mlp("cuda")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = bame.sparsify(model, opt, method, "1:4", total_steps=10**6, verbose=False, **STEADY.get(method, {}))
    steady_step(model, opt, sp, 101, "cuda")  # warm up (caches, lazy state)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in (102, 103):
            steady_step(model, opt, sp, t, "cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
@pytest.mark.parametrize("storage", ["dense", "compressed"])
def test_cuda_training_equals_cpu_training(storage):
    results = []
    for device in ("cpu", "cuda"):
        model = mlp(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sp = bame.sparsify(model, opt, "bame", "2:8", total_steps=30, delta_t=3, verbose=False, storage=storage,
                           group_axis="cin")
        g = torch.Generator().manual_seed(0)
        for _ in range(30):
            x, y = torch.randn(16, 16, generator=g), torch.randint(0, 4, (16,), generator=g)
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
        results.append([layer.mask.cpu() for layer in sp.layers] + [loss.item()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b) if torch.is_tensor(a) else a == pytest.approx(b, abs=1e-4)


@needs_cuda
def test_cuda_resume_is_bit_exact():
    def run(stop: int, state=None):
        model = mlp("cuda")
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sp = bame.sparsify(model, opt, "bame", "1:4", total_steps=20, delta_t=2, verbose=False)
        start = 0
        if state is not None:
            model.load_state_dict(state[0])
            opt.load_state_dict(state[1])
            sp.load_state_dict(state[2])
            start = sp.step_count
        for t in range(start, stop):
            g = torch.Generator().manual_seed(t)
            x, y = torch.randn(8, 16, generator=g).cuda(), torch.randint(0, 4, (8,), generator=g).cuda()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model, opt, sp

    full = run(20)
    head = run(11)
    tail = run(20, copy.deepcopy((head[0].state_dict(), head[1].state_dict(), head[2].state_dict())))
    assert all(torch.equal(a, b) for a, b in zip(full[0].state_dict().values(), tail[0].state_dict().values()))


@needs_cuda
def test_semi_structured_products_equal_the_dense_ones():
    from bame.kernels.semi import semi_structured_linear, semi_structured_problem

    out, in_, tokens = 128, 256, 64
    weight = torch.randn(out, in_, device="cuda", dtype=torch.bfloat16)
    mask = torch.rand(out, in_ // 4, 4, device="cuda").argsort(-1).argsort(-1).lt(2).view(out, in_)
    x = torch.randn(tokens, in_, device="cuda", dtype=torch.bfloat16)
    problem = semi_structured_problem(x, 2, 4, (out, in_))
    if problem is not None:
        pytest.skip(f"this GPU or PyTorch has no semi-structured 2:4: {problem}")
    y = semi_structured_linear(x, weight * mask)
    assert torch.allclose(y.float(), (x @ (weight * mask).t()).float(), atol=1e-1, rtol=1e-2)
