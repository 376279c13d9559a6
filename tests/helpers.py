"""Small utilities shared by the reliability tests: subprocess environments, free ports, run files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock  # a dependency of torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
#: torchrun's variables: a test process must not pass its own (if any) to the runs it starts.
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "TORCHELASTIC_RUN_ID", "GROUP_RANK", "ROLE_RANK")


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a child ``python``: one thread (two cores are shared), unbuffered output."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def once(tmp_path_factory: Any, name: str, make: Callable[[Path], Any]) -> Any:
    """``make(directory)`` once per session even under pytest-xdist; every worker gets its JSON result.

    xdist's default scheduling spreads a module's tests over the workers, and each worker would build an
    expensive module fixture again; this is the recipe of xdist's documentation: a lock file in the
    directory the workers share, and the result stored beside it.
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    result = root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not result.is_file():
            directory = root / name
            shutil.rmtree(directory, ignore_errors=True)  # left by a worker whose attempt failed
            directory.mkdir()
            result.write_text(json.dumps(make(directory)))
    return json.loads(result.read_text())


def free_port() -> int:
    """A TCP port nobody listens on right now (for a process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bame_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "bame", *args]


def run_bame(args: Sequence[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """``python -m bame ARGS`` to completion, output captured."""
    return subprocess.run(bame_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env(**env), cwd=ROOT)


def start_bame(args: Sequence[str], log: Path, **env: str) -> subprocess.Popen:
    """``python -m bame ARGS`` in the background, stdout and stderr into ``log``."""
    with open(log, "w") as f:
        return subprocess.Popen(bame_cmd(*args), stdout=f, stderr=subprocess.STDOUT, env=subprocess_env(**env),
                                cwd=ROOT)


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen | None = None, timeout: float = 300,
             what: str = "condition") -> None:
    """Poll ``condition`` every 20 ms; fail if ``proc`` exits first or the time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def stop(proc: subprocess.Popen, sig: int = signal.SIGKILL, timeout: float = 120) -> int:
    """Send ``sig`` and wait for the exit code (SIGKILL if it does not come in time)."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"process {proc.pid} did not exit within {timeout} s of signal {sig}") from None


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The tensors of a run's ``model.safetensors`` (weights and ``NAME.mask``)."""
    return load_file(run_dir / "model.safetensors")


def checkpoint_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)


def temp_files(run_dir: Path) -> list[str]:
    """Files an interrupted atomic write would leave behind."""
    return sorted(p.name for p in run_dir.iterdir() if p.name.endswith(".tmp") or p.name.startswith("."))


def assert_same(a: object, b: object, where: str = "", atol: float = 0.0) -> None:
    """Recursive equality of nested dicts/lists of tensors and plain values (bit-exact unless ``atol``)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}", atol)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]", atol)
    elif torch.is_tensor(a):
        assert torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype, f"{where}: shape/dtype differ"
        if atol == 0.0 or not a.is_floating_point():
            assert torch.equal(a, b), f"{where}: tensors differ"
        else:
            assert torch.allclose(a, b, atol=atol, rtol=0), f"{where}: max diff {(a - b).abs().max():.3g}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
