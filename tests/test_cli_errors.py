"""Bad input and unsafe files through the command line (issue: reliability, bad input, security ...).

Every case goes through ``bame.cli.main`` as a user would type it and must end in exactly one line
``bame: error: ...`` on stderr, a non-zero exit code and no traceback, and must leave every file that
existed before untouched - even with ``--force``, which may only clear a directory once every input has
been checked.
"""

from __future__ import annotations

import io
import pickle
import re
import shutil
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import once, run_bame

from bame import data, methods, models
from bame.cli import main
from bame.data import fashion_mnist

TRAIN = ["--dataset", "digits", "--width", "0.5", "--nm", "2:4", "--epochs", "1", "--max-steps", "3",
         "--batch-size", "64", "--device", "cpu"]


def _make_run(directory: Path) -> str:
    out = directory / "run"
    assert main(["train", *TRAIN, "--out", str(out)]) == 0
    return str(out)


@pytest.fixture(scope="module")
def good_run(tmp_path_factory) -> Path:
    """A finished three-step run (checkpoint, weights, logs) to copy and spoil."""
    return Path(once(tmp_path_factory, "cli-errors-run", _make_run))


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _error_line(argv: list[str], capsys, code: int = 2) -> str:
    """Run the CLI; assert one error line, no traceback, the exit code; return the message."""
    returned = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("bame: error: ")]
    assert returned == code, err
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0][len("bame: error: "):]


# -- spoiling files --------------------------------------------------------------------------------------


def _edit_checkpoint(run: Path, edit: Callable[[dict], object]) -> None:
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    edit(state)
    torch.save(state, run / "checkpoint.pt")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _idx(magic: int, dims: tuple[int, ...], payload: int) -> bytes:
    return struct.pack(f">I{len(dims)}I", magic, *dims) + bytes(payload)


def _fashion_dir(tmp: Path, images: bytes, labels: bytes) -> str:
    folder = tmp / "fmnist"
    folder.mkdir()
    for split in ("train", "t10k"):
        (folder / f"{split}-images-idx3-ubyte").write_bytes(images)
        (folder / f"{split}-labels-idx1-ubyte").write_bytes(labels)
    return str(folder)


def _cifar_dir(tmp: Path, content: bytes) -> str:
    folder = tmp / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / name).write_bytes(content)
    return str(folder.parent)


def _empty(tmp: Path) -> str:
    (tmp / "empty").mkdir()
    return str(tmp / "empty")


def _recipe(tmp: Path, text: str) -> str:
    (tmp / "recipe.yaml").write_text(text)
    return str(tmp / "recipe.yaml")


def _train(run: Path, *extra: str, force: bool = True) -> list[str]:
    """``bame train`` into the existing run (with --force unless resuming: bad input must not clear it)."""
    return ["train", *TRAIN, "--out", str(run), *(["--force"] if force and "--resume" not in extra else []), *extra]


_GOOD_CIFAR_BATCH = pickle.dumps({b"data": torch.zeros(4, 3072, dtype=torch.uint8).numpy(), b"labels": [0] * 4},
                                 protocol=2)

# (id, argv from (tmp_path, run), message pattern). ``run`` is a copy of a finished run.
CASES: list[tuple[str, Callable[[Path, Path], list[str]], str]] = [
    ("nm-reversed", lambda t, r: _train(r, "--nm", "4:2"), r"invalid N:M pattern 4:2: need 0 < N < M$"),
    ("nm-one-number", lambda t, r: _train(r, "--nm", "2"), r"invalid N:M pattern '2': expected two integers"),
    ("nm-letters", lambda t, r: _train(r, "--nm", "a:b"), r"invalid N:M pattern 'a:b': expected two integers"),
    ("nm-zero", lambda t, r: _train(r, "--nm", "0:4"), r"invalid N:M pattern 0:4: need 0 < N < M$"),
    ("unknown-method", lambda t, r: _train(r, "--method", "nosuch"),
     r"unknown method 'nosuch'; available: " + re.escape(", ".join(methods.available())) + "$"),
    ("unknown-model", lambda t, r: _train(r, "--model", "nosuch"),
     r"unknown model 'nosuch'; available models: " + re.escape(", ".join(models.available())) + "$"),
    ("unknown-dataset", lambda t, r: _train(r, "--dataset", "nosuch"),
     r"unknown dataset 'nosuch'; choose one of: " + re.escape(", ".join(data.available())) + "$"),
    ("fashion-mnist-missing", lambda t, r: _train(r, "--dataset", "fashion-mnist", "--data-dir", _empty(t)),
     r"Fashion-MNIST train files .* not found in: .*empty"),
    ("cifar10-missing", lambda t, r: _train(r, "--dataset", "cifar10", "--data-dir", _empty(t)),
     r"CIFAR-10 train files .* not found in .*empty"),
    ("fashion-mnist-wrong-magic", lambda t, r: _train(r, "--dataset", "fashion-mnist", "--data-dir", _fashion_dir(
        t, _idx(2049, (10, 28, 28), 7840), _idx(2049, (10,), 10))), r"has magic number 2049, expected 2051"),
    ("fashion-mnist-wrong-size", lambda t, r: _train(r, "--dataset", "fashion-mnist", "--data-dir", _fashion_dir(
        t, _idx(2051, (10, 28, 28), 5000), _idx(2049, (10,), 10))), r"fmnist/train-images-idx3-ubyte"),
    ("cifar10-corrupt", lambda t, r: _train(r, "--dataset", "cifar10", "--data-dir", _cifar_dir(t, b"\x80\x02garbage")),
     r"data_batch_1 is not a valid CIFAR-10 batch"),
    ("cifar10-truncated", lambda t, r: _train(r, "--dataset", "cifar10", "--data-dir", _cifar_dir(
        t, _GOOD_CIFAR_BATCH[: len(_GOOD_CIFAR_BATCH) // 2])), r"data_batch_1 is not a valid CIFAR-10 batch"),
    ("eval-truncated-checkpoint", lambda t, r: (_truncate(r / "checkpoint.pt"), ["eval", str(r)])[1],
     r"checkpoint .*checkpoint.pt is corrupt or truncated"),
    ("resume-truncated-checkpoint", lambda t, r: (_truncate(r / "checkpoint.pt"), _train(r, "--resume"))[1],
     r"checkpoint .*checkpoint.pt is corrupt or truncated"),
    ("eval-garbage-checkpoint", lambda t, r: ((r / "checkpoint.pt").write_bytes(b"PK\x03\x04" + bytes(range(256)) * 9),
                                              ["eval", str(r)])[1], r"is corrupt or truncated"),
    ("eval-not-a-bame-checkpoint", lambda t, r: (torch.save([1, 2], r / "checkpoint.pt"), ["eval", str(r)])[1],
     r"is not a bame checkpoint$"),
    ("eval-incomplete-checkpoint", lambda t, r: (_edit_checkpoint(r, lambda s: s.pop("optimizer")),
                                                 ["eval", str(r)])[1], r"checkpoint is incomplete: no optimizer$"),
    ("eval-checkpoint-of-another-model", lambda t, r: (_edit_checkpoint(r, lambda s: s["config"].update(model="mlp")),
                                                       ["eval", str(r)])[1],
     r"checkpoint does not fit the model: Error\(s\) in loading state_dict for ImageMLP: Missing key"),
    ("eval-checkpoint-of-another-nm", lambda t, r: (_edit_checkpoint(r, lambda s: s["config"].update(nm="1:4")),
                                                    ["eval", str(r)])[1],
     r"sparsifier state is for nm='2:4', this run has '1:4'$"),
    ("resume-checkpoint-of-another-model", lambda t, r: (
        _edit_checkpoint(r, lambda s: s["config"].update(model="mlp")), _train(r, "--model", "mlp", "--resume"))[1],
     r"checkpoint does not fit the model: .*ImageMLP"),
    ("resume-checkpoint-of-another-nm", lambda t, r: (
        _edit_checkpoint(r, lambda s: s["config"].update(nm="1:4")), _train(r, "--nm", "1:4", "--resume"))[1],
     r"sparsifier state is for nm='2:4', this run has '1:4'$"),
    ("resume-other-model", lambda t, r: _train(r, "--model", "mlp", "--resume"),
     r"--resume with a different config: model: None -> 'mlp'$"),
    ("resume-other-nm", lambda t, r: _train(r, "--nm", "1:4", "--resume"),
     r"--resume with a different config: nm: '2:4' -> '1:4'$"),
    ("resume-other-config", lambda t, r: _train(r, "--lr", "0.05", "--seed", "7", "--resume"),
     r"--resume with a different config: lr: 0.1 -> 0.05; seed: 0 -> 7$"),
    ("resume-without-checkpoint", lambda t, r: ["train", *TRAIN, "--out", _empty(t), "--resume"],
     r"--resume: no checkpoint in .*empty$"),
    ("no-layer-can-be-sparse", lambda t, r: _train(r, "--nm", "1:7"),
     r"the model has no layer that can be made 1:7 sparse \(group_axis=cin\): conv1.weight: "),
    ("out-holds-another-run", lambda t, r: _train(r, force=False),
     r"already holds a run \(config.yaml, metrics.jsonl, updates.jsonl, summary.json, checkpoint.pt, "
     r"model.safetensors\): use --resume to continue it or --force to overwrite it$"),
    ("out-is-a-file", lambda t, r: ["train", *TRAIN, "--out", str(r / "config.yaml")], r"config.yaml is a file"),
    ("recipe-not-yaml", lambda t, r: _train(r, "--config", _recipe(t, "epochs: [1, 2\n")), r"is not valid YAML: "),
    ("recipe-unknown-keys", lambda t, r: _train(r, "--config", _recipe(t, "epochs: 2\nlearning_rate: 1\nfoo: 2\n")),
     r"recipe .*recipe.yaml: unknown option\(s\) foo, learning_rate$"),
    ("recipe-not-a-mapping", lambda t, r: _train(r, "--config", _recipe(t, "- epochs\n- 2\n")),
     r"must be a mapping of options$"),
    ("recipe-unquoted-nm", lambda t, r: _train(r, "--config", _recipe(t, "nm: 2:4\n")),
     r'quote the pattern, e.g. nm: "2:4"'),
    ("recipe-wrong-type", lambda t, r: _train(r, "--config", _recipe(t, "lr: fast\n")),
     r"lr must be float, not 'fast'$"),
    ("recipe-missing", lambda t, r: _train(r, "--config", str(t / "nope.yaml")), r"recipe .*nope.yaml not found$"),
    ("recipe-unknown-method-option", lambda t, r: _train(r, "--config", _recipe(t, "method_options: {bogus: 1}\n")),
     r"method 'bame' has no option bogus \(its options: "),
    ("method-option-of-another-method", lambda t, r: _train(r, "--method", "static", "--delta-t", "5"),
     r"method 'static' has no option delta_t \(its options: none\)$"),
    ("eval-missing-path", lambda t, r: ["eval", str(t / "nowhere")], r"nowhere: no run directory or checkpoint there$"),
    ("nproc-zero", lambda t, r: _train(r, "--nproc", "0"), r"--nproc must be at least 1, not 0$"),
    # issue 16: a mistyped --data-dir must not fall back to another copy of the data
    ("data-dir-missing", lambda t, r: _train(r, "--dataset", "fashion-mnist", "--data-dir", str(t / "typo")),
     r"^data directory .*typo does not exist \(--data-dir\)$"),
    # issue 16: an --out where nothing can be written fails first (the data directory is wrong too), in one line
    ("out-under-a-file", lambda t, r: ["train", *TRAIN, "--data-dir", str(t / "typo"), "--out",
                                       str(r / "config.yaml" / "run")],
     r"^--out .*config.yaml/run: .*config.yaml is not a directory$"),
    ("out-under-dev-null", lambda t, r: ["train", *TRAIN, "--data-dir", str(t / "typo"), "--out", "/dev/null/run"],
     r"^--out /dev/null/run: /dev/null is not a directory$"),
    ("out-in-proc", lambda t, r: ["train", *TRAIN, "--data-dir", str(t / "typo"), "--out", "/proc/bame-run"],
     r"^--out /proc/bame-run: cannot create files in /proc \(.+\)$"),
    ("out-in-sys", lambda t, r: ["train", *TRAIN, "--data-dir", str(t / "typo"), "--out", "/sys/bame-run"],
     r"^--out /sys/bame-run: cannot create files in /sys \(.+\)$"),
]


@pytest.mark.parametrize(("make", "pattern"), [pytest.param(m, p, id=i) for i, m, p in CASES])
def test_bad_input_is_one_line_and_changes_nothing(make, pattern, good_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "no-system-copy")  # Debian's copy, if installed
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    argv = make(tmp_path, run)
    before = _snapshot(tmp_path)
    message = _error_line(argv, capsys)
    assert re.search(pattern, message), message
    assert _snapshot(tmp_path) == before


def test_the_real_process_exits_with_one_line(good_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    _truncate(run / "checkpoint.pt")
    done = run_bame(["eval", str(run)])
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"bame: error: checkpoint {run / 'checkpoint.pt'} is corrupt or truncated: not "
                                        "a zip archive as torch.save writes"]


# -- security: nothing in a file runs code ------------------------------------------------------------------


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: the marker file appears if the load ran it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_that_would_run_code_is_refused(good_run, tmp_path, capsys):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    shutil.copytree(good_run, run)
    _edit_checkpoint(run, lambda s: s["ledger"].update(note=_Payload(marker)))  # deep inside a real checkpoint
    before = _snapshot(tmp_path)
    for argv in (["eval", str(run)], ["train", *TRAIN, "--out", str(run), "--resume"]):
        message = _error_line(argv, capsys)
        assert message == (f"checkpoint {run / 'checkpoint.pt'} refused: loading it would import and call code "
                           "(Unsupported global: GLOBAL io.open was not an allowed global by default); a bame "
                           "checkpoint holds only tensors and plain values")
        assert not marker.exists()
    assert _snapshot(tmp_path) == before
    with zipfile.ZipFile(run / "checkpoint.pt") as archive:  # the payload is there: a plain load would run it
        pickled = next(archive.read(n) for n in archive.namelist() if n.endswith("data.pkl"))
    assert b"io\nopen" in pickled and str(marker).encode() in pickled


def test_a_dataset_file_that_would_run_code_is_refused(good_run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    pickle.dump({b"data": _Payload(marker), b"labels": [0]}, buf, protocol=2)
    argv = ["train", *TRAIN, "--dataset", "cifar10", "--data-dir", _cifar_dir(tmp_path, buf.getvalue()),
            "--out", str(tmp_path / "out")]
    assert "global 'io.open' is not allowed" in _error_line(argv, capsys)
    assert not marker.exists() and not (tmp_path / "out").exists()
