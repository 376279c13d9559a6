"""Tests for bame.models: the registry, every model's shape and layer-policy contract, and sizes checked
against the architectures' definitions."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bame
from bame import models
from bame.errors import BameError, ConfigError
from bame.models.cifar_resnet import ShortcutA
from bame.models.mobilenetv2 import InvertedResidual
from bame.models.vit import Attention

ALL_MODELS = [
    "resnet20",
    "resnet32",
    "resnet56",
    "mobilenetv2",
    "mobilenetv2_fullconv",
    "smallcnn",
    "mlp",
    "vit_tiny",
    "resnet18",
    "resnet50",
    "deit_small",
]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    # The suite runs as two xdist workers on two cores; more intra-op threads per worker only contend
    # (measured: 20x slower small convolutions).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def cifar_resnet_params(
    blocks: int, channels: tuple[int, int, int], classes: int = 10, in_channels: int = 3, shortcut: str = "A"
) -> int:
    """Parameter count of a CIFAR ResNet, from He et al. 2016 section 4.2 (no biases before a BN)."""

    def conv_bn(cin: int, cout: int, k: int) -> int:
        return cin * cout * k * k + 2 * cout  # conv weight + BN scale and shift

    total = conv_bn(in_channels, channels[0], 3)
    cin = channels[0]
    for c in channels:
        for _ in range(blocks):
            total += conv_bn(cin, c, 3) + conv_bn(c, c, 3)
            if shortcut == "B" and cin != c:
                total += conv_bn(cin, c, 1)
            cin = c
    return total + channels[-1] * classes + classes


# --- the registry ---------------------------------------------------------------------------------


def test_available_lists_every_model_in_order_with_one_line_descriptions() -> None:
    listed = models.available()
    assert list(listed) == ALL_MODELS
    for description in listed.values():
        assert description and "\n" not in description
    assert "NOT the real MobileNetV2" in listed["mobilenetv2_fullconv"]


def test_register_adds_a_model_and_refuses_a_duplicate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models.REGISTRY, "_entries", dict(models.REGISTRY._entries))

    @models.register("tiny_linear", "one linear layer")
    def tiny_linear(*, num_classes: int, in_channels: int, image_size: int, width: float) -> nn.Module:
        model = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, num_classes))
        model.bame_dense_layers = ("1",)
        return model

    assert models.available()["tiny_linear"] == "one linear layer"
    model = models.create("tiny_linear", num_classes=4, in_channels=1, image_size=5)
    assert model(torch.zeros(3, 1, 5, 5)).shape == (3, 4)
    assert model.bame_input_shape == (1, 5, 5)
    with pytest.raises(ValueError, match="twice"):
        models.register("tiny_linear", "again")(tiny_linear)


def test_unknown_model_lists_the_valid_names() -> None:
    with pytest.raises(ConfigError, match="unknown model 'resnet21'") as info:
        models.create("resnet21", num_classes=10)
    assert isinstance(info.value, BameError)
    assert all(name in str(info.value) for name in ALL_MODELS)


@pytest.mark.parametrize(
    ("name", "arguments", "message"),
    [
        ("resnet20", {"num_classes": 0}, "num_classes must be an integer >= 1"),
        ("resnet20", {"num_classes": 10, "in_channels": 2.5}, "in_channels must be an integer"),
        ("resnet20", {"num_classes": 10, "width": 0}, "width must be a number > 0"),
        ("resnet20", {"num_classes": 10, "width": True}, "width must be a number > 0"),
        ("resnet20", {"num_classes": 10, "width": 0.01}, "none"),
        ("resnet20", {"num_classes": 10, "shortcut": "C"}, "shortcut must be 'A' or 'B'"),
        ("resnet20", {"num_classes": 10, "depth": 8}, "has no option 'depth'; its options: shortcut"),
        ("mobilenetv2", {"num_classes": 10, "shortcut": "B"}, "its options: none"),
        ("mlp", {"num_classes": 10, "depth": 0}, "depth must be an integer >= 1"),
        ("mlp", {"num_classes": 10, "patch_size": 5}, "patch_size 5 does not divide image_size 32"),
        ("vit_tiny", {"num_classes": 10, "patch_size": 3}, "patch_size 3 does not divide"),
        ("vit_tiny", {"num_classes": 10, "heads": 5}, "not a multiple of heads=5"),
        ("smallcnn", {"num_classes": 10, "image_size": 1}, "image_size >= 2"),
        ("resnet50", {"num_classes": 10, "width": 2}, "only the published width"),
        ("resnet50", {"num_classes": 10, "shortcut": "B"}, "invalid option"),
        ("deit_small", {"num_classes": 10, "image_size": 30}, "multiple of 16"),
    ],
)
def test_invalid_arguments_raise_config_error(name: str, arguments: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        models.create(name, **arguments)


@pytest.mark.parametrize(
    ("name", "module", "package"),
    [("resnet50", "torchvision", "torchvision"), ("deit_small", "timm", "timm")],
)
def test_missing_optional_dependency_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, name: str, module: str, package: str
) -> None:
    # A None entry in sys.modules makes `import <module>` raise ImportError, as when it is not installed.
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ConfigError) as info:
        models.create(name, num_classes=10)
    assert str(info.value) == f"{name} needs {package}: pip install 'bame[vision]'"


def test_importing_bame_models_imports_neither_torchvision_nor_timm(monkeypatch: pytest.MonkeyPatch) -> None:
    # Import a fresh copy of the package while any import of torchvision or timm would fail; monkeypatch
    # puts the original modules back afterwards.
    for module in [m for m in sys.modules if m == "bame.models" or m.startswith("bame.models.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setattr(bame, "models", models)
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "timm", None)
    fresh = importlib.import_module("bame.models")
    assert fresh is not models
    assert list(fresh.available()) == ALL_MODELS


# --- every model ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_backward_and_layer_policy(name: str) -> None:
    torch.manual_seed(0)
    # 16x16 keeps the heavy models fast; every model handles it (the CIFAR ones end at 4x4 -> 2x2).
    model = models.create(name, num_classes=7, image_size=16)
    out = model(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([1, 5])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.bame_input_shape == (3, 16, 16)

    modules = dict(model.named_modules())
    dense = model.bame_dense_layers
    assert isinstance(dense, tuple) and dense
    assert all(isinstance(modules.get(layer), (nn.Linear, nn.Conv2d)) for layer in dense)
    # The classifier (the only layer with num_classes outputs) is always kept dense ...
    heads = {n for n, m in modules.items() if isinstance(m, nn.Linear) and m.out_features == 7}
    assert len(heads) == 1 and heads <= set(dense)
    # ... and so is the stem of the ImageNet models; the small-image models list nothing else.
    if name in ("resnet18", "resnet50"):
        assert dense == ("conv1", "fc")
    elif name == "deit_small":
        assert dense == ("patch_embed.proj", "head")
    else:
        assert dense == tuple(heads)


@pytest.mark.parametrize("name", ["resnet50", "deit_small"])
def test_imagenet_models_at_224(name: str) -> None:
    model = models.create(name, num_classes=10, image_size=224).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 10)
    assert model.bame_input_shape == (3, 224, 224)


def test_torchvision_resnet_takes_other_input_channels() -> None:
    model = models.create("resnet18", num_classes=5, in_channels=1, image_size=64)
    assert model.conv1.in_channels == 1
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 5)
    assert model.bame_input_shape == (1, 64, 64)


# --- CIFAR ResNets --------------------------------------------------------------------------------


def test_resnet20_parameter_count_by_hand() -> None:
    # Stem 3*16*9 + 32 = 464. Stage 1: 3 blocks of 2*(16*16*9 + 32) = 14,016. Stage 2: first block
    # 16*32*9 + 64 + 32*32*9 + 64 = 13,952, then 2 blocks of 2*(32*32*9 + 64) = 37,120. Stage 3: first
    # block 32*64*9 + 128 + 64*64*9 + 128 = 55,552, then 2 blocks of 2*(64*64*9 + 128) = 147,968.
    # Head 64*10 + 10 = 650. Option A shortcuts add nothing.
    by_hand = 464 + 14_016 + (13_952 + 37_120) + (55_552 + 147_968) + 650
    assert by_hand == 269_722 == cifar_resnet_params(3, (16, 32, 64))
    assert n_params(models.create("resnet20", num_classes=10)) == by_hand
    # Option B adds two 1x1 conv + BN shortcuts: 16*32 + 64 + 32*64 + 128 = 2,752, giving the 272,474
    # that is often quoted for ResNet-20.
    assert n_params(models.create("resnet20", num_classes=10, shortcut="B")) == by_hand + 2_752 == 272_474


@pytest.mark.parametrize(
    ("name", "blocks", "millions"), [("resnet20", 3, 0.27), ("resnet32", 5, 0.46), ("resnet56", 9, 0.85)]
)
def test_cifar_resnet_sizes_match_the_paper(name: str, blocks: int, millions: float) -> None:
    count = n_params(models.create(name, num_classes=10))
    assert count == cifar_resnet_params(blocks, (16, 32, 64))
    assert round(count / 1e6, 2) == millions  # table 6 of He et al. 2016
    layers = [
        m for m in models.create(name, num_classes=10).modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    assert len(layers) == 6 * blocks + 2


def test_width_two_doubles_the_channels() -> None:
    model = models.create("resnet32", num_classes=100, width=2)
    assert model.conv1.out_channels == 32
    assert [model.layer1[0].conv1.out_channels, model.layer2[0].conv1.out_channels] == [32, 64]
    assert model.layer3[-1].conv2.out_channels == 128 and model.fc.in_features == 128
    assert n_params(model) == cifar_resnet_params(5, (32, 64, 128), classes=100)


def test_option_a_shortcut_is_parameter_free_subsampling_and_zero_padding() -> None:
    model = models.create("resnet20", num_classes=10)
    shortcuts = [m for m in model.modules() if isinstance(m, ShortcutA)]
    assert len(shortcuts) == 2  # first blocks of stages 2 and 3
    assert sum(n_params(m) for m in shortcuts) == 0
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules())

    x = torch.randn(2, 16, 7, 7)
    y = ShortcutA(16, 32, stride=2)(x)
    assert y.shape == (2, 32, 4, 4)  # ceil(7 / 2), like the strided 3x3 conv beside it
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert not y[:, :8].any() and not y[:, 24:].any()


@pytest.mark.parametrize(("in_channels", "size"), [(1, 8), (1, 28), (3, 28), (3, 7)])
def test_cifar_resnet_on_small_and_odd_images(in_channels: int, size: int) -> None:
    for shortcut in ("A", "B"):
        model = models.create(
            "resnet20", num_classes=10, in_channels=in_channels, image_size=size, shortcut=shortcut
        )
        assert model(torch.randn(2, in_channels, size, size)).shape == (2, 10)
        assert model.bame_input_shape == (in_channels, size, size)


def test_cifar_resnet_convs_use_kaiming_normal_init() -> None:
    torch.manual_seed(0)
    conv = models.create("resnet56", num_classes=10).layer3[0].conv2  # 64 -> 64, 3x3
    expected = (2 / (64 * 9)) ** 0.5  # He et al. 2015, fan-out
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.05)


# --- MobileNetV2 ----------------------------------------------------------------------------------


def test_mobilenetv2_middle_convs_are_depthwise() -> None:
    model = models.create("mobilenetv2", num_classes=10)
    blocks = [m for m in model.modules() if isinstance(m, InvertedResidual)]
    assert len(blocks) == 1 + 2 + 3 + 4 + 3 + 3 + 1
    for block in blocks:
        conv = block.conv2
        assert conv.kernel_size == (3, 3)
        assert conv.groups == conv.in_channels == conv.out_channels
    # Residuals only where the shape is unchanged, and never through a convolution (the paper's rule).
    assert sum(block.residual for block in blocks) == 10
    assert all(isinstance(block.shortcut, nn.Identity) for block in blocks)
    assert model.conv2.out_channels == 1280


def test_mobilenetv2_matches_torchvision_size() -> None:
    # Same layers as torchvision's ImageNet MobileNetV2 (only the strides differ), so the same size.
    torchvision = pytest.importorskip("torchvision")
    for width in (1.0, 0.5):
        ours = n_params(models.create("mobilenetv2", num_classes=10, width=width))
        theirs = n_params(torchvision.models.mobilenet_v2(num_classes=10, width_mult=width))
        assert ours == theirs
    assert ours == 700_490


def test_mobilenetv2_fullconv_is_the_heavy_full_convolution_variant() -> None:
    model = models.create("mobilenetv2_fullconv", num_classes=10)
    blocks = [m for m in model.modules() if isinstance(m, InvertedResidual)]
    assert len(blocks) == 17
    for block in blocks:
        assert block.conv2.groups == 1 and block.conv2.in_channels == block.conv2.out_channels
    # Every stride-1 block is residual; where it changes channels, through a 1x1 conv + BN.
    convs = [b for b in blocks if isinstance(b.shortcut, nn.Sequential)]
    assert sum(b.residual for b in blocks) == 17 - 3 and len(convs) == 4
    assert all(b.shortcut[0].kernel_size == (1, 1) for b in convs)
    assert n_params(model) > 15 * n_params(models.create("mobilenetv2", num_classes=10))


# --- small models ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [8, 28])
def test_smallcnn_on_digits_and_fashion_mnist_sizes(size: int) -> None:
    model = models.create("smallcnn", num_classes=10, in_channels=1, image_size=size)
    assert model(torch.randn(2, 1, size, size)).shape == (2, 10)
    assert n_params(model) < 200_000
    # Every layer but the stem and the head can take a 1:16 pattern along its input.
    for name, layer in model.named_modules():
        if isinstance(layer, nn.Conv2d) and name != "conv1":
            assert layer.in_channels % 16 == 0 and layer.out_channels % 16 == 0
    assert model.fc1.in_features % 16 == 0 and model.fc1.out_features % 16 == 0


def test_smallcnn_width_keeps_multiples_of_16() -> None:
    model = models.create("smallcnn", num_classes=10, in_channels=1, image_size=8, width=0.5)
    assert [model.conv1.out_channels, model.conv2.out_channels, model.conv3.out_channels] == [16, 32, 64]


def test_smallcnn_learns_digits() -> None:
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(digits.target)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=generator)
    train, test = order[:1400], order[1400:]
    torch.manual_seed(0)
    model = models.create("smallcnn", num_classes=10, in_channels=1, image_size=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(3):
        model.train()
        for batch in train[torch.randperm(len(train), generator=generator)].split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    assert accuracy > 0.95


def test_mlp_size_and_options() -> None:
    # Embed 3072*256 + 256; 4 blocks of LayerNorm 2*256, fc1 256*1024 + 1024, fc2 1024*256 + 256;
    # final LayerNorm 2*256; head 256*10 + 10.
    block = 2 * 256 + 256 * 1024 + 1024 + 1024 * 256 + 256
    assert n_params(models.create("mlp", num_classes=10)) == 3072 * 256 + 256 + 4 * block + 512 + 2570

    model = models.create("mlp", num_classes=10, dim=64, depth=2, mlp_ratio=2)
    assert len(model.blocks) == 2 and model.blocks[0].fc1.weight.shape == (128, 64)
    assert models.create("mlp", num_classes=10, width=0.5).embed.out_features == 128

    patched = models.create("mlp", num_classes=10, in_channels=1, image_size=28, patch_size=7)
    assert patched.embed.in_features == 49 and patched.pos_embed.shape == (1, 16, 256)
    assert patched(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_mlp_patches_are_the_image_tiles() -> None:
    model = models.create("mlp", num_classes=10, in_channels=2, image_size=4, patch_size=2)
    seen: list[torch.Tensor] = []
    model.embed.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    x = torch.arange(32.0).reshape(1, 2, 4, 4)
    model(x)
    tokens = seen[0]
    assert tokens.shape == (1, 4, 8)
    # The second token is the top-right 2x2 tile, channel by channel.
    assert torch.equal(tokens[0, 1], x[0, :, 0:2, 2:4].reshape(-1))


# --- ViT --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("in_channels", "size", "patch"), [(3, 32, 4), (1, 28, 4), (1, 8, 2), (3, 16, 2)])
def test_vit_tiny_default_patch_sizes(in_channels: int, size: int, patch: int) -> None:
    model = models.create("vit_tiny", num_classes=10, in_channels=in_channels, image_size=size)
    assert model.patch_embed.proj.kernel_size == (patch, patch) == model.patch_embed.proj.stride
    assert model.pos_embed.shape == (1, (size // patch) ** 2 + 1, 192)
    assert model(torch.randn(2, in_channels, size, size)).shape == (2, 10)


def test_vit_tiny_shape_and_size() -> None:
    model = models.create("vit_tiny", num_classes=10)
    assert len(model.blocks) == 6 and model.blocks[0].attn.heads == 3
    names = dict(model.named_modules())
    for layer in ("blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.5.mlp.fc1", "blocks.5.mlp.fc2", "head"):
        assert isinstance(names[layer], nn.Linear)
    # Per block: qkv 192*576 + 576, proj 192*192 + 192, fc1 192*768 + 768, fc2 768*192 + 192, 2 LayerNorms.
    block = 192 * 576 + 576 + 192 * 192 + 192 + 192 * 768 + 768 + 768 * 192 + 192 + 4 * 192
    embed = 3 * 16 * 192 + 192 + 192 + 65 * 192  # patch conv, class token, 65 positions
    assert n_params(model) == embed + 6 * block + 2 * 192 + 192 * 10 + 10
    assert models.create("vit_tiny", num_classes=10, width=0.5).head.in_features == 96


def test_attention_matches_the_textbook_formula() -> None:
    torch.manual_seed(0)
    attention = Attention(dim=12, heads=3)
    x = torch.randn(2, 5, 12)
    q, k, v = attention.qkv(x).reshape(2, 5, 3, 3, 4).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-2, -1) / 4**0.5, dim=-1)
    expected = attention.proj((weights @ v).transpose(1, 2).reshape(2, 5, 12))
    torch.testing.assert_close(attention(x), expected)
