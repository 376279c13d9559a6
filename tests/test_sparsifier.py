"""The sparsifier's lifecycle and the invariants of the core issue (SPEC sections 1-5)."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

import bame
from bame.errors import CheckpointError, ConfigError
from bame.nm import is_nm, to_blocks
from bame.schedules import gradual_budget, is_update_step


def small_cnn(cin_mult: int = 4, classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4 * cin_mult, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4 * cin_mult, 8 * cin_mult, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32 * cin_mult, 16 * cin_mult), nn.ReLU(),
        nn.Linear(16 * cin_mult, classes),
    )


def batches(n: int, seed: int = 0, shape=(8, 3, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g), torch.randint(0, 10, (shape[0],), generator=g)) for _ in range(n)]


def train(model, opt, data, steps=None):
    for x, y in data[:steps]:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def setup(method="bame", nm="2:4", total=40, seed=0, opt="sgd", **opts):
    torch.manual_seed(seed)
    model = small_cnn()
    if opt == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-3)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sp = bame.sparsify(model, optimizer, method=method, nm=nm, total_steps=total, verbose=False, **opts)
    return model, optimizer, sp


def test_masks_names_effective_weight_and_report():
    model, _, sp = setup()
    assert set(sp.masks()) == {"2.weight", "6.weight"}
    assert set(sp.dense_layers) == {"0.weight", "8.weight"}
    assert "not divisible" in sp.dense_layers["0.weight"] and sp.dense_layers["8.weight"] == "classifier head"
    for layer in sp.layers:
        assert torch.equal(layer.module.weight, layer.weight * layer.mask)
        assert sp.masks()[layer.name].dtype == torch.bool and sp.masks()[layer.name].shape == layer.shape
    rows = {row["name"]: row for row in sp.layer_report()}
    assert rows["2.weight"]["sparse"] and rows["2.weight"]["nm"] == "2:4" and rows["2.weight"]["group_axis"] == "cin"
    assert rows["0.weight"]["reason"] and "dense" in repr(sp)


@settings(max_examples=12, deadline=None)
@given(
    nm=st.sampled_from(["1:2", "2:4", "1:4", "3:8", "1:8"]), delta_t=st.integers(1, 6),
    t_i=st.integers(0, 12), span=st.integers(0, 15), freeze=st.sampled_from(["and", "or"]),
    opt=st.sampled_from(["sgd", "adamw"]), axis=st.sampled_from(["cin", "kflat"]),
    grad_mode=st.sampled_from(["dense", "sparse"]), seed=st.integers(0, 1000),
)
def test_invariants_every_step(nm, delta_t, t_i, span, freeze, opt, axis, grad_mode, seed):
    total = 30
    t_f = t_i + span
    model, optimizer, sp = setup(nm=nm, total=total, seed=seed, opt=opt, delta_t=delta_t, t_i=t_i, t_f=t_f,
                                 freeze=freeze, group_axis=axis, gradual_grad=grad_mode)
    n, m = sp.n, sp.m
    for t, (x, y) in enumerate(batches(total, seed)):
        before = {name: mask.clone() for name, mask in sp.masks().items()}
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        for layer in sp.layers:
            changed = not torch.equal(before[layer.name], layer.mask)
            if t >= t_i:  # the mask changes only on update iterations, never after t_f
                assert not changed or is_update_step(t, t_i, t_f, delta_t)
            counts = to_blocks(layer.mask, m, axis).sum(-1)
            if t + 1 >= t_i:
                assert (counts == n).all() and is_nm(layer.module.weight != 0, n, m, axis, exact=False)
                assert not layer.weight[~layer.mask].any()
                for value in optimizer.state[layer.weight].values():
                    if value.shape == layer.shape:
                        assert not value[~layer.mask].any()
            else:  # the gradual budget k(t) of the next iteration
                assert (counts == gradual_budget(t + 1, t_i, delta_t, n, m)).all()
    assert sp.step_count == total


def test_gradual_phase_dense_gradient_lets_pruned_weights_train():
    model, optimizer, sp = setup(total=40, t_i=20, t_f=30, delta_t=5)
    train(model, optimizer, batches(12))
    layer = sp.layers[0]
    assert (~layer.mask).any() and layer.weight[~layer.mask].abs().sum() > 0


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_masked_layer_equals_pre_pruned_layer(kind):
    torch.manual_seed(0)
    layer = nn.Linear(16, 8) if kind == "linear" else nn.Conv2d(8, 4, 3, padding=1)
    model = nn.Sequential(layer, nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(5, 16) if kind == "linear" else torch.randn(2, 8, 5, 5)
    model(x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = bame.sparsify(model, opt, method="static", nm="1:4", verbose=False)
    plain = copy.deepcopy(layer)
    sp_layer = sp.layers[0]
    ref = nn.Linear(16, 8) if kind == "linear" else nn.Conv2d(8, 4, 3, padding=1)
    with torch.no_grad():
        ref.weight.copy_(sp_layer.weight * sp_layer.mask)
        ref.bias.copy_(layer.bias)
    del plain
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = layer(xa), ref(xb)
    gy = torch.randn_like(ya)
    ya.backward(gy)
    yb.backward(gy)
    assert torch.allclose(ya, yb, rtol=0, atol=1e-6)
    assert torch.allclose(xa.grad, xb.grad, rtol=0, atol=1e-6)
    # straight-through: the raw weight receives the dense gradient of the effective weight
    assert torch.allclose(sp_layer.weight.grad, ref.weight.grad, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_bidirectional_input_gradient_uses_backward_mask(kind):
    torch.manual_seed(1)
    layer = nn.Linear(8, 8) if kind == "linear" else nn.Conv2d(4, 4, 3, padding=1, bias=False)
    model = nn.Sequential(layer, nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(3, 8) if kind == "linear" else torch.randn(2, 4, 5, 5)
    model(x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = bame.sparsify(model, opt, method="bame_bi", nm="1:2", t_i=0, t_f=10, total_steps=10, verbose=False)
    sl = sp.layers[0]
    bwd = sl.par.bwd_mask
    assert bwd is not None and not (bwd & ~sl.mask).any() and (to_blocks(bwd, 2, "out").sum(-1) <= 1).all()
    assert not torch.equal(bwd, sl.mask)
    fwd_ref = nn.functional.linear if kind == "linear" else (lambda a, w, b: F.conv2d(a, w, b, padding=1))
    xa = x.clone().requires_grad_()
    y = layer(xa)
    assert torch.allclose(y, fwd_ref(x, sl.weight * sl.mask, layer.bias), atol=1e-6)
    gy = torch.randn_like(y)
    y.backward(gy)
    xb = x.clone().requires_grad_()
    fwd_ref(xb, (sl.weight * bwd).detach(), None).backward(gy)
    assert torch.allclose(xa.grad, xb.grad, atol=1e-6)
    wref = (sl.weight * sl.mask).detach().requires_grad_()
    fwd_ref(x, wref, None).backward(gy)
    assert torch.allclose(sl.weight.grad, wref.grad, atol=1e-5)


def _snapshot(model, opt, sp):
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sp": sp.state_dict()}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("method", ["bame", "bame_bi", "lma", "static"])
def test_state_dict_round_trip_is_bit_identical(method):
    data = batches(40, seed=5)
    opts = {"delta_t": 4, "t_i": 8, "t_f": 30} if method != "static" else {}
    model_a, opt_a, sp_a = setup(method, total=40, **opts)
    train(model_a, opt_a, data)
    model_b, opt_b, sp_b = setup(method, total=40, **opts)
    train(model_b, opt_b, data[:18])
    state = _snapshot(model_b, opt_b, sp_b)
    model_c, opt_c, sp_c = setup(method, total=40, seed=99, **opts)  # a different init, overwritten by the load
    model_c.load_state_dict(state["model"])
    opt_c.load_state_dict(state["opt"])
    sp_c.load_state_dict(state["sp"])
    assert sp_c.step_count == 18
    train(model_c, opt_c, data[18:])
    for (name, pa), pc in zip(model_a.state_dict().items(), model_c.state_dict().values()):
        assert torch.equal(pa, pc), name
    for key, value in sp_a.state_dict()["layers"].items():
        for name, tensor in value.items():
            if torch.is_tensor(tensor):
                assert torch.equal(tensor, sp_c.state_dict()["layers"][key][name])


def test_load_state_dict_refuses_mismatch():
    _, _, sp = setup(nm="2:4")
    _, _, other = setup(nm="1:4")
    with pytest.raises(CheckpointError, match="nm"):
        sp.load_state_dict(other.state_dict())
    state = sp.state_dict()
    state["layers"]["2.weight"]["mask"] = torch.ones(3, 3, dtype=torch.bool)
    with pytest.raises(CheckpointError, match="shape"):
        sp.load_state_dict(state)


def test_squash_leaves_plain_modules_with_nm_weights():
    model, opt, sp = setup(t_i=0, t_f=10, delta_t=2)
    train(model, opt, batches(6))
    x = torch.randn(4, 3, 8, 8)
    expected = model(x)
    masks = {k: v.clone() for k, v in sp.masks().items()}
    sp.squash()
    assert type(model[2]) is nn.Conv2d and type(model[6]) is nn.Linear
    assert not any("parametrizations" in k for k in model.state_dict())
    assert torch.equal(model(x), expected)
    assert is_nm(model[2].weight != 0, 2, 4, exact=False) and torch.equal(model[2].weight != 0, masks["2.weight"]
                                                                            | (model[2].weight != 0))
    step = sp.step_count
    train(model, opt, batches(1))
    assert sp.step_count == step  # no hooks left


def test_grad_scaler_skipped_step_and_accumulation():
    model, opt, sp = setup(t_i=0, t_f=10, delta_t=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    x, y = batches(1)[0]
    opt.zero_grad()
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    model[2].parametrizations.weight.original.grad[0, 0, 0, 0] = float("inf")
    masks = {k: v.clone() for k, v in sp.masks().items()}
    scaler.step(opt)
    scaler.update()
    assert sp.step_count == 0 and all(torch.equal(masks[k], v) for k, v in sp.masks().items())
    opt.zero_grad()
    for _ in range(2):  # two micro-batches, one optimizer step
        scaler.scale(F.cross_entropy(model(x), y) / 2).backward()
    scaler.step(opt)
    assert sp.step_count == 1


def test_lr_of_follows_the_schedule():
    model, opt, sp = setup()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    seen = []
    sp.step_callbacks.append(lambda t: seen.append(sp.lr_of(sp.layers[0].weight)))
    for x, y in batches(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.05, 0.025, 0.0125])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_float_dtypes(dtype):
    torch.manual_seed(0)
    model = small_cnn().to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sp = bame.sparsify(model, opt, "bame", "2:4", total_steps=6, t_i=0, t_f=6, delta_t=2, verbose=False)
    for x, y in batches(6):
        opt.zero_grad()
        F.cross_entropy(model(x.to(dtype)), y).backward()
        opt.step()
    for layer in sp.layers:
        assert layer.weight.dtype == dtype and is_nm(layer.mask, 2, 4)


def test_user_errors_are_clear():
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="N:M"):
        bame.sparsify(model, opt, nm="4:2")
    with pytest.raises(ConfigError, match="unknown method 'nope'; available: dense"):
        bame.sparsify(model, opt, method="nope")
    with pytest.raises(ConfigError, match="no option delta"):
        bame.sparsify(model, opt, method="static", delta=3)
    with pytest.raises(ConfigError, match="total_steps"):
        bame.sparsify(model, opt, method="bame")
    with pytest.raises(ConfigError, match="t_f"):
        bame.sparsify(model, opt, method="bame", t_i=10, t_f=5)
    with pytest.raises(ConfigError, match="no layer that can be made"):
        bame.sparsify(nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2)), opt, method="static")
    other = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ConfigError, match="does not update"):
        bame.sparsify(small_cnn(), other, method="static", verbose=False)


def test_layer_selection_options():
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = bame.sparsify(model, opt, method="static", exclude=["6"], include=["8"], verbose=False)
    assert set(sp.masks()) == {"2.weight", "8.weight"} and sp.dense_layers["6.weight"] == "excluded by the user"
    model = small_cnn()
    sp = bame.sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), method="static", verbose=False,
                       layer_filter=lambda name, mod: isinstance(mod, nn.Linear))
    assert set(sp.masks()) == {"6.weight", "8.weight"}
    with pytest.raises(ConfigError, match="cannot be"):
        bame.sparsify(small_cnn(), opt, method="static", include=["0"], verbose=False)


def test_depthwise_and_grouped_convs_stay_dense_with_reasons():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 8, 1, groups=4), nn.Conv2d(8, 8, 1),
                          nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 8, 4, 4))
    sp = bame.sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), method="static", verbose=False)
    assert sp.dense_layers["0.weight"] == "depthwise conv"
    assert "per group" in sp.dense_layers["1.weight"] and set(sp.masks()) == {"2.weight"}


def test_lma_update_uses_regrown_weight_step():
    """On an update step a revived weight starts at 0 and moves to -lr*G in the same step (SPEC 3)."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 1, bias=False)
    model = nn.Sequential(lin, nn.Linear(1, 1))
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.01, 2.0, 0.5, 0.3]]))
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    sp = bame.sparsify(model, opt, "lma", "1:4", total_steps=10, t_i=0, t_f=10, delta_t=1, verbose=False,
                       layer_filter=lambda n, m: m is lin)
    assert sp.masks()["0.weight"].tolist() == [[False, True, False, False]]  # top-1 |W| at init
    assert lin.weight.tolist() == [[0.0, 2.0, 0.0, 0.0]]
    x = torch.tensor([[10.0, 0.01, 0.0, 0.0]])
    opt.zero_grad()
    lin(x).sum().backward()
    g = lin.parametrizations.weight.original.grad.clone()  # dense G = x
    # scores: kept |G W| = .01*2 = .02; revived lr G^2 = .1*100 = 10 -> position 0 wins
    opt.step()
    assert sp.masks()["0.weight"].tolist() == [[True, False, False, False]]
    assert torch.allclose(lin.parametrizations.weight.original, torch.tensor([[-0.1 * g[0, 0], 0, 0, 0]]))


def test_lr_of_survives_optimizer_load_state_dict():
    model, opt, sp = setup()
    state = opt.state_dict()
    state["param_groups"][0]["lr"] = 0.0123
    opt.load_state_dict(state)  # replaces the param-group dicts
    assert sp.lr_of(sp.layers[0].weight) == pytest.approx(0.0123)


OPTIMIZER_CASES = [
    (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-3}),
    (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 5e-3, "maximize": True}),
    (torch.optim.Adam, {"lr": 1e-2, "weight_decay": 1e-2, "amsgrad": True}),
    (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    (torch.optim.RMSprop, {"lr": 1e-3, "momentum": 0.9, "centered": True, "weight_decay": 1e-2}),
    (torch.optim.Adagrad, {"lr": 1e-2, "initial_accumulator_value": 0.1, "weight_decay": 1e-2}),
    (torch.optim.NAdam, {"lr": 1e-2, "weight_decay": 1e-2, "decoupled_weight_decay": True}),
    (torch.optim.RAdam, {"lr": 1e-2, "weight_decay": 1e-2}),
    (torch.optim.Adamax, {"lr": 1e-2, "weight_decay": 1e-2}),
]


@pytest.mark.parametrize("method", ["static", "bame"])
@pytest.mark.parametrize("opt_cls,kwargs", OPTIMIZER_CASES, ids=lambda v: getattr(v, "__name__", ""))
def test_zero_preserving_optimizers_keep_pruned_weights_zero_without_remasking(method, opt_cls, kwargs):
    assert opt_cls in bame.sparsifier.ZERO_PRESERVING_OPTIMIZERS
    torch.manual_seed(0)
    model = small_cnn()
    opt = opt_cls(model.parameters(), **kwargs)
    schedule = {"t_i": 4, "t_f": 20, "delta_t": 3} if method == "bame" else {}
    sp = bame.sparsify(model, opt, method=method, nm="2:4", total_steps=24, verbose=False, **schedule)
    assert sp.optimizer_keeps_zeros
    remasked = []
    for layer in sp.layers:  # record every re-masking multiply of the weight while it is declared pruned
        def spy(like, _par=layer.par, _w=layer.weight, _orig=layer.par.mask_as):
            if like is _w and _par.weights_pruned:
                remasked.append(1)
            return _orig(like)
        layer.par.mask_as = spy
    for t, (x, y) in enumerate(batches(24, seed=1)):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        for layer in sp.layers:
            if layer.par.weights_pruned:  # the skip is active: the optimizer alone kept the zeros
                assert not layer.weight[~layer.mask].any(), (t, layer.name)
    assert not remasked and sp.layers[0].par.weights_pruned


def test_unknown_optimizer_is_remasked_after_each_step():
    class NoisySGD(torch.optim.SGD):  # moves every entry, zero gradient or not
        @torch.no_grad()
        def step(self, closure=None):
            super().step(closure)
            for group in self.param_groups:
                for p in group["params"]:
                    p.add_(1e-3)

    torch.manual_seed(0)
    model = small_cnn()
    opt = NoisySGD(model.parameters(), lr=0.05)
    sp = bame.sparsify(model, opt, method="static", nm="2:4", verbose=False)
    assert not sp.optimizer_keeps_zeros
    train(model, opt, batches(3))
    for layer in sp.layers:
        assert not layer.weight[~layer.mask].any()
        assert (layer.weight[layer.mask] != 0).all()


def test_float_mask_copy_follows_every_in_place_change():
    model, opt, sp = setup(method="sr_ste")  # W*B is computed (pruned weights are not zero)
    layer = sp.layers[0]
    first = layer.par.mask_as(layer.weight)
    assert first.dtype == layer.weight.dtype and torch.equal(first, layer.mask.float())
    assert layer.par.mask_as(layer.weight) is first  # cached while the mask is unchanged
    new = ~layer.mask
    layer.mask.copy_(new)
    refilled = layer.par.mask_as(layer.weight)
    assert torch.equal(refilled, new.float())
    assert refilled.data_ptr() == first.data_ptr()  # the same memory, refilled in place
    assert torch.equal(layer.module.weight, layer.weight * new)
    layer.par.mask[0].zero_()
    assert not layer.par.mask_as(layer.weight)[0].any()
    assert layer.par.mask_as(layer.weight.double()).dtype == torch.float64


class _Doubled(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


@pytest.mark.parametrize("method", ["static", "bame"])
def test_the_eager_product_of_a_sparse_layer_equals_the_parametrized_one(method, monkeypatch):
    """Eager Linear and convolution layers compute their effective weight and product without going through
    ``module.weight`` (parametrize's property): the same outputs and gradients, bit for bit, in training and
    inference; a subclass with its own forward keeps it."""
    torch.manual_seed(0)
    layers = [nn.Linear(16, 8), nn.Conv1d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), _Doubled(16, 8)]
    inputs = [torch.randn(5, 16), torch.randn(2, 8, 7), torch.randn(2, 8, 6, 6), torch.randn(5, 16)]
    model = nn.ModuleList(layers)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = bame.sparsify(model, opt, method, "2:4", total_steps=10, verbose=False, layer_filter=lambda n, m: True,
                       **({"delta_t": 2} if method == "bame" else {}))
    assert len(sp.layers) == 4 and layers[3]._bame_product is None and layers[0]._bame_product is not None
    reads = []  # module.weight reads through parametrize
    listed = parametrize.ParametrizationList.forward
    monkeypatch.setattr(parametrize.ParametrizationList, "forward", lambda self: reads.append(1) or listed(self))
    for layer, x in zip(layers, inputs, strict=True):
        reads.clear()
        layer(x)
        assert len(reads) == (1 if layer is layers[3] else 0)
    for layer, x, sparse in zip(layers, inputs, sp.layers, strict=True):
        for pruned in (False, True):  # W * B (the gradual phase) and W itself (pruned weights zero)
            layer.parametrizations.weight[0].weights_pruned = pruned
            if pruned:
                sparse.weight.data.mul_(sparse.mask)
            got = layer(x)
            want = layer._bame_base.forward(layer, x)  # through module.weight
            assert torch.equal(got, want)
            (g_got,) = torch.autograd.grad(got.square().sum(), sparse.weight)
            (g_want,) = torch.autograd.grad(want.square().sum(), sparse.weight)
            assert torch.equal(g_got, g_want)
            with torch.no_grad():
                assert torch.equal(layer(x), want)
    y = layers[3](inputs[3])
    assert torch.equal(y, 2 * torch.nn.functional.linear(inputs[3], layers[3].weight, layers[3].bias))
