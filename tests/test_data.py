"""Tests for bame.data: formats, determinism, sharding, augmentation and user errors.

Every dataset file is made here, small, in its real format (IDX plain and gzip, CIFAR pickled batches,
an ImageFolder of PNGs), and loaded through build_loader like the real ones.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import bame.data as data
from bame.data import cifar, digits, download, fashion_mnist, idx, imagenet
from bame.data.sharding import EpochPlan
from bame.data.transforms import CropFlip, Normalize, crop_padded
from bame.errors import BameError, DataError

# --------------------------------------------------------------------------------------------- helpers


def write_idx(path: Path, array: np.ndarray, type_code: int = 0x08, compress: bool = False) -> Path:
    """Write ``array`` in IDX format (big-endian), gzip-compressed if ``compress``."""
    magic = (type_code << 8) | array.ndim
    dtype = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[type_code]
    payload = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.astype(dtype).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def make_fashion(root: Path, n_train: int = 10, n_test: int = 7, compress: bool = True, seed: int = 1):
    """Fake Fashion-MNIST files; returns {split: (images [N,28,28] uint8, labels [N])}."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        stem_i, stem_l = fashion_mnist.FILES[split]
        suffix = ".gz" if compress else ""
        write_idx(root / (stem_i + suffix), images, compress=compress)
        write_idx(root / (stem_l + suffix), labels, compress=compress)
        out[split] = (images, labels)
    return out


def write_cifar_batch(path: Path, images: np.ndarray, labels: list[int], protocol: int = 2) -> None:
    """A batch pickled like the official ones: a dict of bytes keys."""
    batch = {
        b"batch_label": b"training batch 1 of 5",
        b"labels": labels,
        b"data": images.reshape(len(images), -1),
        b"filenames": [f"img_{i}.png".encode() for i in range(len(images))],
    }
    path.write_bytes(pickle.dumps(batch, protocol=protocol))


def py2_cifar_pickle(images: np.ndarray, labels: list[int]) -> bytes:
    """A batch as Python 2's cPickle wrote the official files: protocol 2, ``str`` (BINSTRING) bytes,
    ``numpy.core.multiarray._reconstruct`` and the array's raw bytes in its BUILD state."""

    def string(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b

    def integer(v: int) -> bytes:
        return b"J" + struct.pack("<i", v)

    flat = np.ascontiguousarray(images.reshape(len(images), -1), dtype=np.uint8)
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + integer(0) + b"\x85" + string(b"b")
        + b"\x87R(" + integer(1) + integer(flat.shape[0]) + integer(flat.shape[1]) + b"\x86"
        + b"cnumpy\ndtype\n" + string(b"u1") + integer(0) + integer(1) + b"\x87R("
        + integer(3) + string(b"|") + b"NNN" + integer(-1) + integer(-1) + integer(0) + b"tb"
        + b"\x89" + string(flat.tobytes()) + b"tb"
    )  # fmt: skip
    return (
        b"\x80\x02}(" + string(b"batch_label") + string(b"training batch 1 of 5")
        + string(b"labels") + b"](" + b"".join(integer(v) for v in labels) + b"e"
        + string(b"data") + array
        + string(b"filenames") + b"](" + b"".join(string(b"%d.png" % i) for i in range(len(labels))) + b"e"
        + b"u."
    )  # fmt: skip


def make_cifar(root: Path, per_batch: int = 4, n_test: int = 6, seed: int = 2):
    """A fake ``cifar-10-batches-py`` under ``root``; returns {split: (images [N,3,32,32], labels)}."""
    rng = np.random.default_rng(seed)
    d = root / cifar.DIRNAME
    d.mkdir(parents=True)
    train_images, train_labels = [], []
    for i, name in enumerate(cifar.TRAIN_FILES):
        images = rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        if i == 0:  # the official files' Python 2 pickle
            (d / name).write_bytes(py2_cifar_pickle(images, labels))
        else:  # re-pickled copies: protocol 2 (_codecs.encode) to 5 (_frombuffer) occur in the wild
            write_cifar_batch(d / name, images, labels, protocol=i + 1)
        train_images.append(images)
        train_labels += labels
    test_images = rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8)
    test_labels = rng.integers(0, 10, n_test).tolist()
    write_cifar_batch(d / "test_batch", test_images, test_labels)
    meta = {b"label_names": [b"airplane"] * 10, b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    (d / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return {
        "train": (np.concatenate(train_images), np.array(train_labels)),
        "test": (test_images, np.array(test_labels)),
    }


def make_imagefolder(root: Path, classes=("cat", "dog"), per_class: int = 3) -> None:
    """A tiny ImageFolder tree of PNGs of assorted sizes in train/ and val/."""
    from PIL import Image

    rng = np.random.default_rng(3)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for k in range(per_class):
                h, w = 20 + 7 * k, 30 + 5 * k
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{k}.png")


def epoch(loader, e: int = 0, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(e, start)
    return list(loader)


def cat(batches) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def assert_same(a, b) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.fixture
def no_system_fashion(monkeypatch, tmp_path):
    """Hide a system-wide Fashion-MNIST install so only the test's files are found."""
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "no-system-dir")


# ------------------------------------------------------------------------------------------- registry


def test_registry_order_and_specs():
    specs = data.available()
    assert list(specs) == ["digits", "fashion-mnist", "cifar10", "imagenet"]
    assert specs["digits"].image_size == 8 and specs["digits"].default_model == "smallcnn"
    assert specs["fashion-mnist"].in_channels == 1 and specs["fashion-mnist"].train_size == 60000
    assert specs["cifar10"].default_model == "resnet32" and specs["cifar10"].in_channels == 3
    assert specs["imagenet"].num_classes == 1000 and specs["imagenet"].image_size == 224
    specs.clear()  # a copy: the registry is untouched
    assert len(data.available()) == 4
    assert data.get_spec("Fashion_MNIST").name == "fashion-mnist"


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(DataError, match="digits, fashion-mnist, cifar10, imagenet") as info:
        data.get_spec("mnist")
    assert isinstance(info.value, BameError) and "\n" not in str(info.value)
    with pytest.raises(DataError, match="unknown dataset"):
        data.build_loader("svhn", "train", batch_size=8)


def test_import_loads_nothing():
    code = (
        "import sys, bame.data\n"
        "heavy = [m for m in ('torchvision', 'sklearn', 'PIL') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 33, "world_size": 2}, "not divisible"),
        ({"batch_size": 32, "rank": 2, "world_size": 2}, "rank 2"),
        ({"batch_size": 0}, "positive"),
        ({"batch_size": 5000}, "larger than"),
        ({"batch_size": 8, "workers": -1}, "workers"),
        ({"batch_size": 8, "device": "nonsense"}, "invalid device"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(DataError, match=message):
        data.build_loader("digits", "train", **kwargs)


def test_bad_split_and_start_batch():
    with pytest.raises(DataError, match="unknown split"):
        data.build_loader("digits", "valid", batch_size=8)
    loader = data.build_loader("digits", "train", batch_size=100)
    with pytest.raises(DataError, match="start batch 15"):
        loader.set_epoch(0, 15)
    loader.set_epoch(0, 14)  # resuming after the last batch: an empty epoch
    assert list(loader) == []


# --------------------------------------------------------------------------------------------- digits


def test_digits_split():
    train_x, train_y = digits.load("train")
    test_x, test_y = digits.load("test")
    assert train_x.shape == (1437, 1, 8, 8) and test_x.shape == (360, 1, 8, 8)
    assert train_x.dtype == torch.uint8 and int(train_x.max()) == 16
    assert set(train_y.tolist()) == set(range(10)) == set(test_y.tolist())
    tr, te = digits.stratified_split(digits._load_all()[1], 360, 0)
    assert len(set(tr) | set(te)) == 1797 and not set(tr) & set(te)
    # Stratified: each class's test share is its proportional quota, within one.
    all_y = digits._load_all()[1]
    for c in range(10):
        assert abs((test_y == c).sum().item() - 360 * (all_y == c).sum() / 1797) < 1


def test_digits_loader_normalization_and_independent_split():
    spec = data.get_spec("digits")
    assert (spec.train_size, spec.test_size, spec.num_classes) == (1437, 360, 10)
    train = data.build_loader("digits", "train", batch_size=479, augment=False, seed=5)
    x, y = cat(epoch(train))
    assert x.shape == (1437, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(x.mean().item()) < 1e-4 and abs(x.std(unbiased=False).item() - 1) < 1e-4
    # The split does not depend on the run seed: the same samples, only in another order.
    other = data.build_loader("digits", "train", batch_size=479, augment=False, seed=6)
    x2, _ = cat(epoch(other))
    assert not torch.equal(x, x2)
    # Same images as a set: sort the rows and compare.
    rows, rows2 = (torch.unique(t.flatten(1), dim=0) for t in (x, x2))
    assert torch.equal(rows, rows2)
    test = data.build_loader("digits", "test", batch_size=64)
    assert len(test) == 6 and test.num_samples == 360
    xt, yt = cat(epoch(test))
    assert torch.equal(yt, digits.load("test")[1])  # test split: file order, no augmentation
    restored = test.normalize.inverse(xt).round()
    assert torch.equal(restored.to(torch.uint8), digits.load("test")[0])


# --------------------------------------------------------------------------------------- IDX / fashion


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_roundtrip(tmp_path, compress, no_system_fashion):
    files = make_fashion(tmp_path, compress=compress)
    train = data.build_loader("fashion-mnist", "train", batch_size=5, data_dir=tmp_path, augment=False)
    assert torch.equal(train.images[:, 0], torch.from_numpy(files["train"][0]))
    assert train.labels.tolist() == files["train"][1].tolist()
    test = data.build_loader("fashion-mnist", "test", batch_size=4, data_dir=tmp_path)
    batches = epoch(test)
    assert [len(b[1]) for b in batches] == [4, 3]  # test keeps the short last batch
    x, y = cat(batches)
    assert x.shape == (7, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == files["test"][1].tolist()
    pixels = test.normalize.inverse(x).round().to(torch.uint8)[:, 0]
    assert torch.equal(pixels, torch.from_numpy(files["test"][0]))  # exact round trip
    assert abs(x[0, 0, 0, 0].item() - (files["test"][0][0, 0, 0] / 255 - 0.2860) / 0.3530) < 1e-5


def test_fashion_subdir_and_missing(tmp_path, monkeypatch):
    make_fashion(tmp_path / "fashion-mnist")
    loader = data.build_loader("fashion-mnist", "test", batch_size=7, data_dir=tmp_path)
    assert loader.num_samples == 7 and isinstance(loader, data.Loader)
    # The system-wide location (Debian's dataset-fashion-mnist) is the fallback when no directory is given
    # (./data is tried first: here there is none) ...
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "fashion-mnist")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    assert data.build_loader("fashion-mnist", "train", batch_size=2).num_samples == 10
    # ... and only then: a directory the user names is the only place looked in.
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not found in") as info:
        data.build_loader("fashion-mnist", "train", batch_size=2, data_dir=tmp_path / "empty")
    message = str(info.value)
    assert str(fashion_mnist.SYSTEM_DIR) not in message and "leave out --data-dir" in message
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "no-system-dir")
    with pytest.raises(DataError, match="not found in") as info:
        data.build_loader("fashion-mnist", "train", batch_size=2)
    message = str(info.value)
    assert "dataset-fashion-mnist" in message and "train-images-idx3-ubyte.gz" in message
    assert "\n" not in message


def test_a_data_dir_that_does_not_exist_is_an_error_naming_it(tmp_path, monkeypatch):
    """Issue 16: a mistyped --data-dir fell back silently to the system's copy of Fashion-MNIST."""
    make_fashion(tmp_path / "system")
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "system")
    for name in ("fashion-mnist", "digits"):  # digits reads no files, but a wrong directory is still wrong
        with pytest.raises(DataError) as info:
            data.build_loader(name, "train", batch_size=2, data_dir=tmp_path / "typo")
        assert str(info.value) == f"data directory {tmp_path / 'typo'} does not exist (--data-dir)"
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match=r"file is not a directory \(--data-dir\)$"):
        data.build_loader("fashion-mnist", "train", batch_size=2, data_dir=tmp_path / "file")


def test_idx_parser_types_and_errors(tmp_path):
    ints = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5
    assert np.array_equal(idx.read_idx(write_idx(tmp_path / "i.idx", ints, 0x0C)), ints)
    floats = np.linspace(0, 1, 6, dtype=np.float32)
    assert np.array_equal(idx.read_idx(write_idx(tmp_path / "f.idx", floats, 0x0D, compress=True)), floats)
    images = write_idx(tmp_path / "img", np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(DataError, match=r"img has magic number 2051, expected 2049"):
        idx.read_idx(images, idx.LABELS_MAGIC)
    with pytest.raises(DataError, match="not an IDX file"):
        idx.parse_idx(b"\x01\x02\x08\x01\x00\x00\x00\x00", "junk")
    raw = images.read_bytes()
    (tmp_path / "short").write_bytes(raw[:-1])
    with pytest.raises(DataError, match="short is truncated: 2351 data bytes"):
        idx.read_idx(tmp_path / "short", idx.IMAGES_MAGIC)
    (tmp_path / "long").write_bytes(raw + b"\x00")
    with pytest.raises(DataError, match="longer than its header says"):
        idx.read_idx(tmp_path / "long")
    (tmp_path / "cut.gz").write_bytes(gzip.compress(raw)[:-20])
    with pytest.raises(DataError, match=r"cut.gz is a damaged gzip file"):
        idx.read_idx(tmp_path / "cut.gz")


def test_fashion_wrong_files(tmp_path, no_system_fashion):
    make_fashion(tmp_path, compress=False)
    # Labels where the images should be: the wrong magic names the file.
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(labels.read_bytes())
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte has magic number 2049, expected 2051"):
        data.build_loader("fashion-mnist", "test", batch_size=2, data_dir=tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(9, np.uint8))
    with pytest.raises(DataError, match="9 labels for the 10 images"):
        data.build_loader("fashion-mnist", "train", batch_size=2, data_dir=tmp_path)


# --------------------------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("sub", [True, False])
def test_cifar_roundtrip(tmp_path, sub):
    files = make_cifar(tmp_path)
    root = tmp_path if sub else tmp_path / cifar.DIRNAME
    train = data.build_loader("cifar10", "train", batch_size=4, data_dir=root)
    assert train.images.shape == (20, 3, 32, 32) and train.images.dtype == torch.uint8
    assert torch.equal(train.images, torch.from_numpy(files["train"][0]))
    assert train.labels.tolist() == files["train"][1].tolist()
    assert len(train) == 5 and train.num_samples == 20
    test = data.build_loader("cifar10", "test", batch_size=4, data_dir=root)
    x, y = cat(epoch(test))
    assert x.shape == (6, 3, 32, 32) and y.tolist() == files["test"][1].tolist()
    # Channel planes are row-major: pixel (c, i, j) of image k is data[k, c*1024 + i*32 + j].
    k, c, i, j = 5, 2, 7, 30
    flat = files["test"][0].reshape(6, -1)
    expected = (flat[k, c * 1024 + i * 32 + j] / 255 - cifar.MEAN[c]) / cifar.STD[c]
    assert abs(x[k, c, i, j].item() - expected) < 1e-5
    assert torch.equal(test.normalize.inverse(x).round().to(torch.uint8), test.images)


def test_cifar_refuses_malicious_pickle(tmp_path):
    make_cifar(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = {b"data": Evil(), b"labels": [0], b"batch_label": b"x", b"filenames": [b"x"]}
    (tmp_path / cifar.DIRNAME / "test_batch").write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(
        DataError, match=r"refusing .*test_batch: global '(posix|os|nt)\.system' is not allowed"
    ):
        data.build_loader("cifar10", "test", batch_size=2, data_dir=tmp_path)
    assert not marker.exists()


def test_cifar_corrupt_and_missing(tmp_path):
    make_cifar(tmp_path)
    batch = tmp_path / cifar.DIRNAME / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(DataError, match="data_batch_3 is not a valid CIFAR-10 batch"):
        data.build_loader("cifar10", "train", batch_size=2, data_dir=tmp_path)
    write_cifar_batch(batch, np.zeros((2, 3, 16, 16), np.uint8), [0, 1])
    with pytest.raises(DataError, match=r"b'data' is \[2, 768\]"):
        data.build_loader("cifar10", "train", batch_size=2, data_dir=tmp_path)
    write_cifar_batch(batch, np.zeros((2, 3, 32, 32), np.uint8), [0, 10])
    with pytest.raises(DataError, match="labels outside 0..9"):
        data.build_loader("cifar10", "train", batch_size=2, data_dir=tmp_path)
    batch.unlink()
    with pytest.raises(DataError, match="lacks CIFAR-10 files data_batch_3"):
        data.build_loader("cifar10", "train", batch_size=2, data_dir=tmp_path)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="--download"):
        data.build_loader("cifar10", "test", batch_size=2, data_dir=tmp_path / "nothing")


class FakeResponse(io.BytesIO):
    headers = {"Content-Length": None}


def serve(monkeypatch, payload: bytes | dict[str, bytes]) -> list[str]:
    """Make urllib serve ``payload`` (for any URL, or by URL); returns the list of requested URLs."""
    requested = []

    def urlopen(url, timeout=None):
        requested.append(url)
        return FakeResponse(payload[url] if isinstance(payload, dict) else payload)

    monkeypatch.setattr(download.urllib.request, "urlopen", urlopen)
    return requested


def test_cifar_download_checksum_mismatch(tmp_path, monkeypatch):
    requested = serve(monkeypatch, b"not the archive")
    with pytest.raises(DataError, match="checksum mismatch"):
        data.build_loader("cifar10", "train", batch_size=2, data_dir=tmp_path, download=True)
    assert requested == [cifar.URL]
    assert list(tmp_path.iterdir()) == []  # the bad download is not left behind


def test_cifar_download_and_extract(tmp_path, monkeypatch):
    files = make_cifar(tmp_path / "src")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(tmp_path / "src" / cifar.DIRNAME, arcname=cifar.DIRNAME)
    archive = buffer.getvalue()
    serve(monkeypatch, archive)
    monkeypatch.setattr(cifar, "MD5", hashlib.md5(archive).hexdigest())
    loader = data.build_loader("cifar10", "test", batch_size=3, data_dir=tmp_path / "dl", download=True)
    assert torch.equal(loader.images, torch.from_numpy(files["test"][0]))
    assert (tmp_path / "dl" / cifar.ARCHIVE).is_file()


def test_fashion_download(tmp_path, monkeypatch, no_system_fashion):
    files = make_fashion(tmp_path / "src", compress=True)
    served = {fashion_mnist.BASE_URL + p.name: p.read_bytes() for p in (tmp_path / "src").iterdir()}
    serve(monkeypatch, served)
    monkeypatch.setattr(
        fashion_mnist, "MD5", {u.rsplit("/", 1)[1]: hashlib.md5(b).hexdigest() for u, b in served.items()}
    )
    with pytest.raises(DataError, match="dl does not exist"):  # no download unless asked
        data.build_loader("fashion-mnist", "test", batch_size=7, data_dir=tmp_path / "dl")
    loader = data.build_loader("fashion-mnist", "test", batch_size=7, data_dir=tmp_path / "dl", download=True)
    assert torch.equal(loader.images[:, 0], torch.from_numpy(files["test"][0]))
    assert sorted(p.name for p in (tmp_path / "dl" / "fashion-mnist").iterdir()) == [
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]


def test_safe_extract_refuses_escaping_members(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    (tmp_path / "evil.tar").write_bytes(buffer.getvalue())
    (tmp_path / "out").mkdir()
    with pytest.raises(DataError, match="points outside"):
        download.safe_extract(tmp_path / "evil.tar", tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()


# ------------------------------------------------------------------- determinism, resume, sharding


def test_determinism_and_global_rng():
    loader = data.build_loader("digits", "train", batch_size=64, seed=3)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = epoch(loader, 2)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is never used
    assert_same(first, epoch(loader, 2))
    same = data.build_loader("digits", "train", batch_size=64, seed=3)
    assert_same(first, epoch(same, 2))
    other = epoch(loader, 3)
    assert not torch.equal(first[0][1], other[0][1])
    reseeded = epoch(data.build_loader("digits", "train", batch_size=64, seed=4), 2)
    assert not torch.equal(first[0][1], reseeded[0][1])


def test_start_batch_resume_is_tail_of_epoch():
    loader = data.build_loader("digits", "train", batch_size=100, seed=1)
    full = epoch(loader, 4)
    assert_same(full[9:], epoch(loader, 4, start=9))
    assert len(loader) == 14  # counts the whole epoch, whatever the start


def test_drop_last_and_len():
    train = data.build_loader("digits", "train", batch_size=100)
    batches = epoch(train)
    assert len(train) == len(batches) == 14 and train.num_samples == 1400
    assert {len(y) for _, y in batches} == {100}
    assert train.batch_size == 100
    test = data.build_loader("digits", "test", batch_size=100)
    assert [len(y) for _, y in epoch(test)] == [100, 100, 100, 60] and len(test) == 4


@pytest.mark.parametrize("split", ["train", "test"])
def test_two_ranks_equal_one_process(split):
    one = data.build_loader("digits", split, batch_size=64, seed=7, augment=True)
    ranks = [
        data.build_loader("digits", split, batch_size=64, seed=7, augment=True, rank=r, world_size=2)
        for r in range(2)
    ]
    single = epoch(one, 1)
    per_rank = [epoch(loader, 1) for loader in ranks]
    assert len(ranks[0]) == len(ranks[1]) == len(one)
    for i, (x, y) in enumerate(single):
        # Same samples and even the same augmentation: rank r holds the r-th half of the global batch.
        assert torch.equal(torch.cat([per_rank[0][i][0], per_rank[1][i][0]]), x)
        assert torch.equal(torch.cat([per_rank[0][i][1], per_rank[1][i][1]]), y)


def test_test_split_sharding_covers_each_sample_once():
    plan_args = dict(num_items=13, batch_size=4, shuffle=False, drop_last=False)
    seen = []
    lengths = []
    for r in range(4):
        plan = EpochPlan(**plan_args, rank=r, world_size=4)
        batches = plan.batches(0)
        lengths.append(len(plan))
        assert len(batches) == len(plan)
        seen += [int(k) for _, indices, lo, hi in batches for k in indices[lo:hi]]
    assert sorted(seen) == list(range(13))
    assert lengths == [3, 3, 3, 4]  # the single sample of the last batch goes to one rank only


# ---------------------------------------------------------------------------------------- augmentation


def test_crop_flip_windows():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 6, 6), dtype=torch.uint8, generator=gen) + 1  # no zeros
    aug = CropFlip(padding=2, flip=True)
    params = aug.sample(64, gen)
    out = aug.apply(images, params)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for k in range(64):
        top, left = params.offsets[k].tolist()
        window = padded[k, :, top : top + 6, left : left + 6]
        if params.flips[k]:
            window = window.flip(-1)
        assert torch.equal(out[k], window)
        # The window is somewhere inside the padded image: every out pixel is a real pixel or padding zero.
        assert ((out[k] == 0) | (out[k] >= 1)).all()
    assert 0 < params.flips.sum() < 64 and len({tuple(o) for o in params.offsets.tolist()}) > 10
    assert params.offsets.min() >= 0 and params.offsets.max() <= 4
    assert torch.equal(crop_padded(images, torch.full((64, 2), 2), 2), images)  # centre = identity
    assert torch.equal(CropFlip(0, flip=False).apply(images, params), images)


def test_cifar_train_augmentation_is_crop_and_flip(tmp_path):
    make_cifar(tmp_path, per_batch=8)
    plain = data.build_loader("cifar10", "train", batch_size=8, data_dir=tmp_path, augment=False)
    augmented = data.build_loader("cifar10", "train", batch_size=8, data_dir=tmp_path)  # train: on
    norm = Normalize(255.0, cifar.MEAN, cifar.STD)
    shifted = flipped = 0
    for (xa, ya), (xp, yp) in zip(epoch(augmented, 2), epoch(plain, 2), strict=True):
        assert torch.equal(ya, yp)  # augmentation does not change the order
        raw_a = norm.inverse(xa).round().to(torch.uint8)
        padded = torch.nn.functional.pad(norm.inverse(xp).round().to(torch.uint8), (4, 4, 4, 4))
        for k in range(len(ya)):
            matches = [
                (dy, dx, flip)
                for dy in range(9)
                for dx in range(9)
                for flip in (False, True)
                if torch.equal(
                    raw_a[k],
                    padded[k, :, dy : dy + 32, dx : dx + 32].flip(-1)
                    if flip
                    else padded[k, :, dy : dy + 32, dx : dx + 32],
                )
            ]
            assert matches, "an augmented image is not a (flipped) window of the padded image"
            shifted += matches[0][:2] != (4, 4)
            flipped += matches[0][2]
    assert shifted > 10 and 5 < flipped < 35


def test_fashion_augmentation_is_flip_only(tmp_path, no_system_fashion):
    make_fashion(tmp_path, n_train=32)
    plain = epoch(
        data.build_loader("fashion-mnist", "train", batch_size=32, data_dir=tmp_path, augment=False)
    )
    aug = epoch(data.build_loader("fashion-mnist", "train", batch_size=32, data_dir=tmp_path))
    x, xa = plain[0][0], aug[0][0]
    same = [torch.equal(x[k], xa[k]) for k in range(32)]
    mirrored = [torch.equal(x[k].flip(-1), xa[k]) for k in range(32)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True)) and 0 < sum(mirrored) < 32


# -------------------------------------------------------------------------------------------- ImageNet


def test_imagenet_loader(tmp_path):
    make_imagefolder(tmp_path)
    train = data.build_loader("imagenet", "train", batch_size=4, data_dir=tmp_path, seed=1)
    assert len(train) == 1 and train.num_samples == 4 and train.classes == ["cat", "dog"]
    first = epoch(train, 0)
    x, y = first[0]
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(y.tolist()) <= {0, 1}
    assert_same(first, epoch(train, 0))
    assert not torch.equal(x, epoch(train, 1)[0][0])
    val = data.build_loader("imagenet", "test", batch_size=4, data_dir=tmp_path)
    xv, yv = cat(epoch(val))
    assert xv.shape == (6, 3, 224, 224) and yv.tolist() == [0, 0, 0, 1, 1, 1]
    assert xv.min() >= (0 - max(imagenet.MEAN)) / min(imagenet.STD) - 1e-4


def test_imagenet_workers_and_ranks_match(tmp_path):
    make_imagefolder(tmp_path, per_class=4)
    kwargs = dict(batch_size=4, data_dir=tmp_path, seed=2)
    single = epoch(data.build_loader("imagenet", "train", **kwargs), 3)
    workers = epoch(data.build_loader("imagenet", "train", workers=2, **kwargs), 3)
    assert_same(single, workers)  # augmentation does not depend on which worker decoded what
    halves = [
        epoch(data.build_loader("imagenet", "train", rank=r, world_size=2, **kwargs), 3) for r in range(2)
    ]
    for i, (x, _) in enumerate(single):
        assert torch.equal(torch.cat([halves[0][i][0], halves[1][i][0]]), x)
    assert_same(single[1:], epoch(data.build_loader("imagenet", "train", **kwargs), 3, start=1))


def test_imagenet_errors(tmp_path, monkeypatch):
    make_imagefolder(tmp_path)
    (tmp_path / "val" / "dog").rename(tmp_path / "val" / "bird")
    with pytest.raises(DataError, match="not the same ones"):
        data.build_loader("imagenet", "train", batch_size=2, data_dir=tmp_path)
    shutil.rmtree(tmp_path / "val")
    with pytest.raises(DataError, match="val/ directory not found"):
        data.build_loader("imagenet", "train", batch_size=2, data_dir=tmp_path)
    with pytest.raises(DataError, match="cannot be downloaded"):
        data.build_loader("imagenet", "train", batch_size=2, data_dir=tmp_path, download=True)
    make_imagefolder(tmp_path / "bad")
    (tmp_path / "bad" / "train" / "dog" / "1.png").write_bytes(b"not a png")
    for workers in (0, 1):
        loader = data.build_loader(
            "imagenet", "train", batch_size=6, data_dir=tmp_path / "bad", workers=workers
        )
        with pytest.raises(DataError, match=r"^cannot decode image .*1\.png") as info:
            epoch(loader)
        assert "\n" not in str(info.value)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as if it were not installed
    with pytest.raises(DataError, match=r"pip install 'bame\[vision\]'"):
        imagenet._torchvision()


def test_random_resized_crop_box_bounds():
    gen = torch.Generator().manual_seed(0)
    for width, height in [(500, 375), (64, 64), (300, 20), (20, 300)]:
        for _ in range(50):
            top, left, h, w = imagenet.random_resized_crop_box(width, height, gen)
            assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0
