"""The compressed products as PyTorch custom operators (issue: bame at full speed on the stack users train
with): ``torch.library.opcheck`` (schema, fake tensors, autograd registration, AOT dispatch) and the
operators' numbers against the masked-dense reference, for every formulation a plan can name."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bame import native
from bame.kernels import ops  # registers bame::
from bame.nm import from_blocks, kept_indices, to_blocks

needs_cc = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable_reason()}")
LINEAR_FORMS = [("dense", "dense", "dense"),
                pytest.param(("native", "native", "native"), marks=needs_cc),
                pytest.param(("chunked", "chunked", "native"), marks=needs_cc)]
CONV_FORMS = [("dense", "dense", "dense"), pytest.param(("native", "native", "native"), marks=needs_cc)]


def compressed(shape: tuple[int, ...], n: int, m: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A random N:M weight: its dense form, values (K, N) and uint8 in-block positions (K, N)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=g)
    blocks = to_blocks(weight, m, "cin")
    mask = torch.zeros_like(blocks, dtype=torch.bool)
    mask.scatter_(1, torch.rand(blocks.shape, generator=g).topk(n, dim=1).indices, True)
    indices = kept_indices(mask, n)
    values = blocks.gather(1, indices)
    dense = from_blocks(blocks * mask, shape, "cin")
    return dense, values, indices.to(torch.uint8)


@pytest.mark.parametrize("forms", LINEAR_FORMS)
def test_compressed_linear_operator(forms):
    dense, values, indices = compressed((16, 32), 1, 4)
    x = torch.randn(3, 5, 32, requires_grad=True)
    bias = torch.randn(16, requires_grad=True)
    values.requires_grad_(True)
    args = (x, values, indices, bias, None, 16, 32, 1, 4, *forms)
    torch.library.opcheck(torch.ops.bame.compressed_linear.default, args)
    y = torch.ops.bame.compressed_linear(*args)
    ref_w = dense.clone().requires_grad_(True)
    ref = F.linear(x, ref_w, bias)
    assert torch.allclose(y, ref, atol=1e-5)
    dy = torch.randn_like(y)
    gx, gv, gb = torch.autograd.grad(y, (x, values, bias), dy)
    rx, rw, rb = torch.autograd.grad(ref, (x, ref_w, bias), dy)
    assert torch.allclose(gx, rx, atol=1e-5) and torch.allclose(gb, rb, atol=1e-5)
    assert torch.allclose(gv, to_blocks(rw, 4, "cin").gather(1, indices.long()), atol=1e-5)  # at the slots only


def test_linear_operator_input_gradient_through_a_backward_mask():
    """BAME-dagger: dX uses only the slots ``bwd_keep`` marks; the values' gradient is the forward's."""
    dense, values, indices = compressed((16, 32), 2, 4, seed=1)
    keep = torch.rand(values.shape, generator=torch.Generator().manual_seed(2)) < 0.5
    x = torch.randn(7, 32, requires_grad=True)
    y = torch.ops.bame.compressed_linear(x, values, indices, None, keep, 16, 32, 2, 4, "dense", "dense", "dense")
    dy = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, (x,), dy)
    w_bwd = from_blocks(torch.zeros(values.shape[0], 4).scatter_(1, indices.long(), values * keep), (16, 32), "cin")
    assert torch.allclose(gx, dy @ w_bwd, atol=1e-5)
    args = (x, values.requires_grad_(True), indices, None, keep, 16, 32, 2, 4, "dense", "dense", "dense")
    torch.library.opcheck(torch.ops.bame.compressed_linear.default, args)


@pytest.mark.parametrize("forms", CONV_FORMS)
@pytest.mark.parametrize("padding, dilation", [(1, 1), (2, 2), (0, 1)])
def test_compressed_conv_operator(forms, padding, dilation):
    dense, values, indices = compressed((8, 16, 3, 3), 1, 4, seed=3)
    x = torch.randn(2, 16, 6, 7, requires_grad=True)
    bias = torch.randn(8, requires_grad=True)
    values.requires_grad_(True)
    args = (x, values, indices, bias, None, [8, 16, 3, 3], 1, 4, [1, 1], [padding] * 2, [dilation] * 2, *forms)
    torch.library.opcheck(torch.ops.bame.compressed_conv.default, args)
    y = torch.ops.bame.compressed_conv(*args)
    ref_w = dense.clone().requires_grad_(True)
    ref = F.conv2d(x, ref_w, bias, 1, padding, dilation)
    assert y.shape == ref.shape and torch.allclose(y, ref, atol=1e-4)
    dy = torch.randn_like(y)
    gx, gv, gb = torch.autograd.grad(y, (x, values, bias), dy)
    rx, rw, rb = torch.autograd.grad(ref, (x, ref_w, bias), dy)
    assert torch.allclose(gx, rx, atol=1e-4) and torch.allclose(gb, rb, atol=1e-4)
    assert torch.allclose(gv, to_blocks(rw, 4, "cin").gather(1, indices.long()), atol=1e-4)


def test_strided_conv_operator_runs_dense_products():
    dense, values, indices = compressed((8, 16, 3, 3), 2, 8, seed=4)
    x = torch.randn(2, 16, 9, 9)
    y = torch.ops.bame.compressed_conv(x, values, indices, None, None, [8, 16, 3, 3], 2, 8, [2, 2], [1, 1], [1, 1],
                                       "dense", "dense", "dense")
    assert torch.allclose(y, F.conv2d(x, dense, None, 2, 1), atol=1e-5)


@pytest.mark.parametrize("shape, n, m", [((8, 16), 2, 4), ((6, 32, 1, 1), 1, 16)])
def test_slot_values_and_their_gradient(shape, n, m):
    """A dense weight's values at the slots, and back: the gradient of the values lands at the slots only."""
    torch.manual_seed(0)
    k = torch.Size(shape).numel() // m
    positions = torch.stack([torch.randperm(m)[:n] for _ in range(k)]).to(torch.uint8)
    weight = torch.randn(shape, requires_grad=True)
    torch.library.opcheck(torch.ops.bame.slot_values.default, (weight, positions))
    values = torch.ops.bame.slot_values(weight, positions)
    blocks = weight.detach().reshape(k, m)
    assert torch.equal(values, torch.stack([blocks[i, positions[i].long()] for i in range(k)]))
    grad = torch.randn(k, n)
    (gw,) = torch.autograd.grad(values, weight, grad)
    expected = torch.zeros(k, m)
    for i in range(k):
        expected[i, positions[i].long()] = grad[i]
    assert torch.equal(gw, expected.reshape(shape))
    torch.library.opcheck(torch.ops.bame.slot_scatter.default, (grad, positions, list(shape)))


def test_operators_keep_the_slot_structure_of_their_indices_until_they_change():
    """The structure derived from an indices tensor is built once per in-place change, not per call, and the
    cache stays bounded."""
    _, values, indices = compressed((16, 32), 1, 4, seed=5)
    first = ops._slots([16, 32], 1, 4, indices, None)
    assert ops._slots([16, 32], 1, 4, indices, None) is first
    assert not indices.__dict__  # nothing kept on the tensor: a checkpoint holding it stays weights_only-loadable
    cols = first.packed(values).cols
    assert first.packed(values).cols is cols  # derived once
    with torch.no_grad():
        indices.copy_((indices + 1) % 4)  # a mask change, in place
    assert ops._slots([16, 32], 1, 4, indices, None) is first and first.packed(values).cols is not cols
    assert ops._slots([16, 32], 1, 4, indices.clone(), None) is not first  # another tensor, another entry
    for _ in range(ops._SLOTS_KEPT + 5):
        ops._slots([16, 32], 1, 4, indices.clone(), None)
    assert len(ops._SLOTS) == ops._SLOTS_KEPT
    ops.clear_slots()
    assert not ops._SLOTS
