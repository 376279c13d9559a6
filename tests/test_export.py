"""``bame export`` and ``bame.load_compressed`` (issue 7, section 3)."""

import pytest
import torch
from safetensors.torch import load_file

import bame
from bame import config, models
from bame.cli import main
from bame.engine import fit
from bame.export import compress, decompress


def test_compress_round_trip_hand_computed():
    w = torch.tensor([[0.0, 5.0, 0.0, -1.0, 2.0, 0.0, 0.0, 3.0]])  # Linear [1, 8], 2:4 along in
    mask = w != 0
    packed = compress({"w": w, "w.mask": mask}, 2, 4, "cin")
    assert packed["w.values"].tolist() == [[5.0, -1.0], [2.0, 3.0]]
    assert packed["w.indices"].tolist() == [[1, 3], [0, 3]] and packed["w.indices"].dtype == torch.uint8
    assert torch.equal(decompress(packed, {"w": [1, 8]}, 4, "cin")["w"], w)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    cfg = config.build({"dataset": "digits", "method": "bame", "nm": "1:16", "epochs": 1, "batch_size": 64,
                        "method_options": {"delta_t": 4}})
    fit(cfg, out)
    return out


def test_compressed_export_rebuilds_identical_model(run_dir, capsys):
    assert main(["export", str(run_dir), "--format", "compressed"]) == 0
    assert main(["export", str(run_dir), "--format", "dense"]) == 0
    assert "x the dense weights" in capsys.readouterr().out
    trained = models.create("smallcnn", num_classes=10, in_channels=1, image_size=8)
    tensors = load_file(run_dir / "model.safetensors")
    trained.load_state_dict({k: v for k, v in tensors.items() if not k.endswith(".mask")})
    trained.eval()
    rebuilt = bame.load_compressed(run_dir / "model.compressed.safetensors")
    x = torch.randn(16, 1, 8, 8)
    assert torch.equal(rebuilt(x), trained(x))
    dense_size = (run_dir / "model.dense.safetensors").stat().st_size
    compressed_size = (run_dir / "model.compressed.safetensors").stat().st_size
    assert compressed_size < 0.5 * dense_size  # 1:16: 1/16 of the sparse weights + 1 byte per kept value
    packed = load_file(run_dir / "model.compressed.safetensors")
    for name in ("conv2.weight", "conv3.weight", "fc1.weight"):
        values = packed[f"{name}.values"]
        assert values.shape[1] == 1 and values.numel() == tensors[name].numel() // 16


def test_export_refuses_a_non_run(tmp_path, capsys):
    assert main(["export", str(tmp_path)]) == 2
    assert "not a finished run" in capsys.readouterr().err
