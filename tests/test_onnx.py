"""ONNX (issue 16, section 5): docs/deployment.md's example as printed, then the exported graph checked with
onnx and onnxruntime: every sparse layer's initializer is the PyTorch weight, 2:4 along the input channels
(TensorRT's layout), and the outputs match PyTorch's for another batch size."""

import re

import numpy as np
import pytest
import torch
from helpers import ROOT

from bame.nm import is_nm

onnx = pytest.importorskip("onnx", reason="onnx comes with bame[onnx]")
onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime comes with bame[onnx]")
pytest.importorskip("onnxscript", reason="torch.onnx's exporter needs onnxscript (bame[onnx])")

DOC = ROOT / "docs" / "deployment.md"


def weight_along_inputs(node, weights):
    """A Conv's [K, C, R, S] or a Gemm's weight as [out, in, ...], so that axis 1 is the input channels."""
    w = weights[node.input[1]]
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return w if trans_b else w.T
    return w


def test_doc_example_exports_nm_weights_that_onnxruntime_runs(tmp_path, monkeypatch, capsys):
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "doc"}
    exec(compile(code, str(DOC), "exec"), scope)
    assert "max difference from PyTorch:" in capsys.readouterr().out
    model, sparsifier = scope["model"], scope["sparsifier"]
    graph = onnx.load("model.onnx").graph
    weights = {init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer}
    exported = {node.input[1]: weight_along_inputs(node, weights) for node in graph.node
                if node.op_type in ("Conv", "Gemm") and node.input[1] in weights}
    torch_weights = dict(model.state_dict())
    sparse = [layer.name for layer in sparsifier.layers]
    assert sparse == ["2.weight", "6.weight"]  # the stem (3 input channels) and the head stay dense
    for name in sparse:
        assert np.array_equal(exported[name], torch_weights[name].numpy()), name
        assert is_nm(torch.from_numpy(exported[name]) != 0, 2, 4, "cin", exact=False), name
    session = onnxruntime.InferenceSession("model.onnx")
    images = torch.randn(3, 3, 8, 8)
    (logits,) = session.run(None, {"image": images.numpy()})
    np.testing.assert_allclose(logits, model(images).detach().numpy(), rtol=1e-5, atol=1e-5)
