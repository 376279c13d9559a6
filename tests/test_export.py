"""``bame export`` and ``load_compressed``: run directories (issue 7, section 3), and any model sparsified in
one's own loop, its checkpoints and squashed weights (issue 16, section 4)."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import bame
from bame import config, models
from bame.cli import main
from bame.engine import fit
from bame.errors import CheckpointError, ConfigError
from bame.export import Pattern, compress, decompress, export, infer_pattern, load_compressed


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
    rebuilt = load_compressed(run_dir / "model.compressed.safetensors")
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


# -- any model, sparsified in one's own loop (issue 16, section 4) ---------------------------------------------
class Net(nn.Module):
    """A user's own model: a stem bame keeps dense (3 input channels), a 3x3 conv, a Linear and a head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x)))).mean((2, 3))
        return self.head(F.relu(self.fc1(x)))


def train_own_loop(model, method="bame", nm="2:8", steps=6):
    """Six steps of a plain loop with the one-line sparsify; BAME's masks are final N:M after t_f = 4."""
    torch.manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = bame.sparsify(model, optimizer, method, nm, total_steps=steps, delta_t=2)
    for _ in range(steps):
        x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return sparsifier


def test_infer_pattern_hand_computed():
    # [1, 8] with one kept per 4: 1:2 stores 4 values, 1:4 stores 2, 2:8 stores 2 too (the tie goes to M=4).
    keep = {"fc.weight": torch.tensor([[1, 0, 0, 0, 0, 1, 0, 0]], dtype=torch.bool),
            "head.weight": torch.ones(2, 8, dtype=torch.bool)}  # dense: never N:M
    assert infer_pattern(keep) == Pattern(1, 4, "cin", ("fc.weight",))
    # A large 2:4 layer and a small one that happens to be 1:2 as well: 2:4 for both stores least.
    big = torch.tensor([[1, 1, 0, 0] * 4] * 4, dtype=torch.bool)  # [4, 16], pairs (1, 1) and (0, 0)
    small = torch.tensor([[1, 0, 0, 1]], dtype=torch.bool)  # 1:2 and 2:4
    assert infer_pattern({"big": big, "small": small}) == Pattern(2, 4, "cin", ("big", "small"))


def test_infer_pattern_refuses_ambiguity_and_no_structure():
    # Conv [1, 4, 1, 2] keeping (c0, k0) and (c2, k1): 1:4 along cin (per kernel position) and along kflat.
    conv = torch.zeros(1, 4, 1, 2, dtype=torch.bool)
    conv[0, 0, 0, 0] = conv[0, 2, 0, 1] = True
    with pytest.raises(ConfigError, match="along both cin and kflat"):
        infer_pattern({"conv.weight": conv})
    assert infer_pattern({"conv.weight": conv}, axes=("kflat",)) == Pattern(1, 4, "kflat", ("conv.weight",))
    with pytest.raises(ConfigError, match="no N:M pattern"):
        infer_pattern({"fc.weight": torch.ones(4, 8, dtype=torch.bool)})


def test_export_from_sparsifier_attached_and_squashed_model_agree(tmp_path):
    model = Net()
    sparsifier = train_own_loop(model)
    export(sparsifier, tmp_path / "sp.safetensors")  # masks and 2:8 from the sparsifier
    export(model, tmp_path / "attached.safetensors")  # masks read from the layers, 2:8 inferred from them
    sparsifier.squash()
    export(model, tmp_path / "squashed.safetensors")  # no masks: 2:8 inferred from the zeros
    files = [load_file(tmp_path / f"{k}.safetensors") for k in ("sp", "attached", "squashed")]
    assert all(sorted(f) == sorted(files[0]) for f in files)
    assert all(torch.equal(f[k], files[0][k]) for f in files for k in f)
    # conv2 [16, 8, 3, 3] at 2:8 along cin: K = 16*3*3 blocks of 2 kept values; the stem and head stay whole.
    assert files[0]["conv2.weight.values"].shape == (144, 2) and files[0]["fc1.weight.values"].shape == (64, 2)
    assert "conv1.weight" in files[0] and "head.weight" in files[0]
    model.eval()
    rebuilt = load_compressed(tmp_path / "squashed.safetensors", model=Net())
    x = torch.randn(3, 3, 8, 8)
    assert torch.equal(rebuilt(x), model(x))


def test_dense_export_of_an_attached_model_has_plain_names(tmp_path):
    model = Net()
    mask = train_own_loop(model).masks()["fc1.weight"]
    export(model, tmp_path / "dense.safetensors", format="dense")
    tensors = load_file(tmp_path / "dense.safetensors")
    assert sorted(tensors) == sorted(Net().state_dict())
    assert torch.equal(tensors["fc1.weight"], model.fc1.weight)  # the effective W * B ...
    assert not tensors["fc1.weight"][~mask].any() and int(mask.sum()) == 32 * 16 // 4  # ... zero outside 2:8


def test_torchvision_resnet_round_trip(tmp_path):
    torchvision = pytest.importorskip("torchvision", reason="torchvision comes with bame[vision]")
    model = torchvision.models.resnet18(num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = bame.sparsify(model, optimizer, "static", "2:4", total_steps=1)
    F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([1, 2])).backward()
    optimizer.step()
    sparsifier.squash()
    result = export(model.eval(), tmp_path / "resnet18.safetensors")
    assert result["ratio"] < 0.65  # the 2:4 convs at half their bytes plus one index byte per kept value
    rebuilt = load_compressed(tmp_path / "resnet18.safetensors", model=torchvision.models.resnet18(num_classes=10))
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(rebuilt(x), model(x))


def test_cli_exports_a_checkpoint_from_ones_own_loop(tmp_path, capsys):
    model = Net()
    sparsifier = train_own_loop(model)
    torch.save({"model": model.state_dict(), "sparsifier": sparsifier.state_dict()}, tmp_path / "ckpt.pt")
    assert main(["export", str(tmp_path / "ckpt.pt")]) == 0
    assert "ckpt.compressed.safetensors" in capsys.readouterr().out
    rebuilt = load_compressed(tmp_path / "ckpt.compressed.safetensors", model=Net())
    x = torch.randn(3, 3, 8, 8)
    assert torch.equal(rebuilt(x), model.eval()(x))


def test_cli_infers_nm_of_a_squashed_state_dict(tmp_path):
    model = Net()
    train_own_loop(model).squash()
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    plain, out, given = (str(tmp_path / name) for name in ("plain.pt", "out.safetensors", "given.safetensors"))
    assert main(["export", plain, "--out", out]) == 0
    assert main(["export", plain, "--nm", "2:8", "--out", given]) == 0
    inferred, given = load_file(tmp_path / "out.safetensors"), load_file(tmp_path / "given.safetensors")
    assert sorted(inferred) == sorted(given) and "fc1.weight.values" in inferred


class Payload:
    """An object whose unpickling would import and call code."""


@pytest.mark.parametrize("content, message", [
    ("raw", "holds the raw weight of bame layer conv2.weight but no sparsifier state"),
    ("code", "refused: loading it would import and call code"),
    ("text", "not a checkpoint written by torch.save"),
])
def test_cli_refuses_unusable_checkpoints_in_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "bad.pt"
    if content == "raw":
        model = Net()
        train_own_loop(model)
        torch.save({"model": model.state_dict()}, path)  # an attached model's raw weights, masks missing
    elif content == "code":
        torch.save({"model": {"w": torch.ones(2)}, "extra": Payload()}, path)
    else:
        path.write_text("not a checkpoint")
    assert main(["export", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_load_compressed_needs_a_plain_fitting_model(tmp_path):
    model = Net()
    sparsifier = train_own_loop(model)
    export(sparsifier, tmp_path / "net.safetensors")
    with pytest.raises(CheckpointError, match="pass model="):
        load_compressed(tmp_path / "net.safetensors")
    with pytest.raises(ConfigError, match="conv2 has bame masks attached"):
        load_compressed(tmp_path / "net.safetensors", model=model)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_compressed(tmp_path / "net.safetensors", model=nn.Sequential(nn.Linear(16, 32)))
