"""The training engine, the run directory, recipes and the command line (issue: training engine)."""

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from bame import config, methods, models
from bame.cli import main
from bame.engine import fit

ROOT = Path(__file__).resolve().parents[1]
CIFAR_RECIPES = sorted(p for d in ("table1", "table3", "table4", "fig3") for p in (ROOT / "recipes" / d).glob("*.yaml"))
IMAGENET_RECIPES = sorted((ROOT / "recipes" / "table2").glob("*.yaml"))


def _cifar_batch(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"generated", b"labels": rng.integers(0, 10, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img{i}.png".encode() for i in range(n)]}


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory) -> Path:
    """A tiny CIFAR-10 in the real python-pickle format (cifar-10-batches-py)."""
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(_cifar_batch(4, i), protocol=2))
    (folder / "test_batch").write_bytes(pickle.dumps(_cifar_batch(8, 0), protocol=2))
    meta = {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_cases_per_batch": 4, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def test_every_cifar_recipe_is_present():
    names = {p.stem for p in CIFAR_RECIPES}
    for tag in ("resnet32-dense", "resnet32-bame-1_16", "resnet32-sr_ste-2_4", "resnet32-asp-2_4",
                "mobilenetv2_fullconv-bame-1_16", "resnet32-static-1_16", "resnet32-bame-1_16-ti0-tf100"):
        assert tag in names
    assert len(CIFAR_RECIPES) == 19 + 6 + 4 + 15


@pytest.mark.parametrize("recipe", CIFAR_RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_cifar_recipe_runs(recipe, cifar_dir, tmp_path):
    data = yaml.safe_load(recipe.read_text())
    assert data["target"]["source"].startswith("BAME ICML 2025")
    out = tmp_path / "run"
    code = main(["train", "--config", str(recipe), "--epochs", "1", "--max-steps", "20", "--data-dir",
                 str(cifar_dir), "--batch-size", "8", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == data["method"] and summary["steps"] >= 1
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["weight_decay"] == data["weight_decay"] and saved["epochs"] == 1 and saved["max_steps"] == 20


@pytest.mark.parametrize("recipe", IMAGENET_RECIPES, ids=lambda p: p.stem)
def test_imagenet_recipes_resolve(recipe):
    cfg = config.build(config.load_recipe(recipe))
    assert cfg.dataset == "imagenet" and cfg.model in models.available()
    methods.get(cfg.method).make_options(**cfg.method_options)
    assert cfg.epochs in (100, 120, 300) and cfg.target["top1"] > 70


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("runs") / "bame"
    cfg = config.build({"dataset": "digits", "method": "bame", "nm": "1:4", "epochs": 3, "batch_size": 64,
                        "method_options": {"delta_t": 5}})
    summary = fit(cfg, out)
    return out, summary


def test_run_directory_contents(digits_run):
    out, summary = digits_run
    for name in ("config.yaml", "metrics.jsonl", "updates.jsonl", "summary.json", "checkpoint.pt",
                 "model.safetensors"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    keys = {"epoch", "step", "lr", "train_loss", "train_top1", "test_loss", "test_top1", "mask_changes",
            "frozen_fraction", "train_flops", "wall_s"}
    assert keys <= set(rows[0])
    assert rows[-1]["step"] == summary["steps"] == 3 * (1437 // 64)
    assert summary["top1"] == rows[-1]["test_top1"] and summary["best_top1"] == max(r["test_top1"] for r in rows)
    for key in ("dataset", "model", "method", "nm", "epochs", "seed", "train_flops", "dense_train_flops",
                "train_flops_ratio", "test_flops_ratio", "params", "nonzero_params", "wall_time_s"):
        assert key in summary, key
    assert summary["model"] == "smallcnn" and 0 < summary["train_flops_ratio"] < 1
    assert summary["nonzero_params"] < summary["params"]
    assert summary["top1"] > 50  # three epochs of digits at 1:4: far above chance (10 %)


def test_exported_weights_and_masks(digits_run):
    out, _ = digits_run
    tensors = load_file(out / "model.safetensors")
    masks = {k[: -len(".mask")]: v for k, v in tensors.items() if k.endswith(".mask")}
    assert set(masks) == {"conv2.weight", "conv3.weight", "fc1.weight"} or masks
    for name, mask in masks.items():
        assert mask.dtype == torch.bool and tensors[name].shape == mask.shape
        assert not tensors[name][~mask].any()
        assert (mask.movedim(1, -1).reshape(-1, 4).sum(-1) == 1).all()
    assert not any("parametrizations" in k for k in tensors)
    model = models.create("smallcnn", num_classes=10, in_channels=1, image_size=8)
    model.load_state_dict({k: v for k, v in tensors.items() if not k.endswith(".mask")})


def test_eval_matches_summary(digits_run, capsys):
    out, summary = digits_run
    assert main(["eval", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["top1"] == pytest.approx(summary["top1"])


def test_eval_of_the_weights_file_and_of_exports(digits_run, tmp_path, capsys):
    """Issue 16: ``bame eval RUN/model.safetensors`` said "corrupt or truncated: not a zip archive". The weights
    (masks applied) in a plain model give exactly the run's last evaluation; so do its exports."""
    out, summary = digits_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    assert main(["export", str(run), "--format", "compressed"]) == 0
    capsys.readouterr()
    for name in ("model.safetensors", "model.compressed.safetensors"):
        assert main(["eval", str(run / name), "--json"]) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert result["top1"] == summary["top1"] and result["step"] == summary["steps"], name
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(run / "model.safetensors", alone)
    assert main(["eval", str(alone / "model.safetensors")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"bame: error: {alone / 'model.safetensors'}: no config.yaml beside it to rebuild the model and its data; "
        "pass the run directory or its checkpoint.pt"]


def test_python_m_bame_is_the_cli():
    done = subprocess.run([sys.executable, "-m", "bame", "methods"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert [line.split()[0] for line in done.stdout.splitlines()] == list(methods.available())


def test_listing_commands(capsys):
    for command, registry in (("models", models.available()), ("datasets", None)):
        assert main([command]) == 0
        listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
        if registry is not None:
            assert listed == list(registry)
        else:
            assert listed == ["digits", "fashion-mnist", "cifar10", "imagenet"]


def test_flags_override_recipe_and_method_options(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("dataset: digits\nmethod: bame\nnm: '2:4'\nepochs: 1\nbatch_size: 64\n"
                      "method_options: {delta_t: 7, alpha: 0.25}\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(recipe), "--alpha", "0.75", "--t-i", "0", "--max-steps", "3",
                 "--out", str(out)]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["method_options"] == {"delta_t": 7, "alpha": 0.75, "t_i": 0}
    assert main(["train", "--config", str(recipe), "--method", "static", "--out", str(tmp_path / "x")]) == 2
    assert "no option" in capsys.readouterr().err


def test_mobilenetv2_reports_dense_depthwise_layers(tmp_path, caplog, cifar_dir):
    caplog.set_level("INFO", logger="bame")
    cfg = config.build({"dataset": "cifar10", "model": "mobilenetv2", "method": "static", "nm": "1:4",
                        "epochs": 1, "batch_size": 8, "max_steps": 1, "data_dir": str(cifar_dir),
                        "width": 0.5})
    summary = fit(cfg, tmp_path / "run")
    dense = [row for row in summary["layers"] if not row["sparse"]]
    assert any(row["reason"] == "depthwise conv" for row in dense)
    assert "depthwise conv" in caplog.text


def test_demo_writes_table_and_plot(tmp_path, capsys):
    assert main(["demo", "--epochs", "1", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    for method in ("dense", "sr_ste", "bame"):
        assert any(line.startswith(method) for line in text.splitlines())
    assert (tmp_path / "digits" / "demo.png").stat().st_size > 10_000
    # the demo trains with the data set's own defaults, those of bame train (one source)
    saved = {m: yaml.safe_load((tmp_path / "digits" / m / "config.yaml").read_text()) for m in ("dense", "bame")}
    assert saved["bame"]["batch_size"] == saved["dense"]["batch_size"] == 64 and saved["bame"]["epochs"] == 1
    assert saved["bame"]["method_options"] == {"delta_t": 10} and saved["dense"]["method_options"] == {}


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    import gzip
    import struct

    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_demo_on_fashion_mnist_files(tmp_path, capsys):
    """The same demo on Fashion-MNIST, read from IDX files in the real format."""
    rng = np.random.default_rng(0)
    data = tmp_path / "fmnist"
    data.mkdir()
    for prefix, n in (("train", 256), ("t10k", 64)):
        _write_idx(data / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)), 2051)
        _write_idx(data / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n), 2049)
    assert main(["demo", "--dataset", "fashion-mnist", "--epochs", "1", "--data-dir", str(data),
                 "--methods", "dense,bame", "--out", str(tmp_path / "out")]) == 0
    assert "bame" in capsys.readouterr().out
    assert (tmp_path / "out" / "fashion-mnist" / "demo.png").is_file()
