"""Run a sweep's trainings: K ``bame train`` processes at a time, a progress bar over the grid.

Each run is a child ``python -m bame train --config recipes/NAME.yaml --out runs/NAME`` (with ``--resume``
when it has a checkpoint, ``--force`` when a killed start left files but no checkpoint), its output in
``logs/NAME.log``. The cores are split between the K children: each gets ``OMP_NUM_THREADS`` =
``MKL_NUM_THREADS`` = cores // K, because small models train fastest on one thread and K processes that
each spin one OpenMP thread per core fight over the cores.

A child holds its run's lock for as long as it lives and, on Linux, gets SIGTERM when the sweep dies
(``PR_SET_PDEATHSIG``): it then saves its checkpoint and stops, and the next invocation of the sweep
resumes it. A sweep that gets SIGINT/SIGTERM passes SIGTERM on, waits for the children's checkpoints and
exits 130.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from bame import config, sweep
from bame.errors import BameError, ConfigError

POLL_S = 0.1  # how often finished children are looked for; a run lasts seconds at the least
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class SweepInterrupted(BameError):
    """SIGINT/SIGTERM arrived; the running children saved their checkpoints."""

    exit_code = 130


@dataclass
class Failure:
    """A run whose process exited non-zero."""

    name: str
    code: int
    message: str  # the run's own last word (bame prints one line: "bame: error: ...")
    log: Path


@dataclass
class _Child:
    run: sweep.PlannedRun
    proc: subprocess.Popen


def run_state(run_dir: Path) -> str:
    """``done`` (summary.json), ``resume`` (a checkpoint, no summary) or ``start``."""
    if (run_dir / sweep.SUMMARY).is_file():
        return sweep.DONE
    return sweep.RESUME if (run_dir / sweep.CHECKPOINT).is_file() else sweep.FRESH


def option_differences(saved: dict[str, Any], options: dict[str, Any]) -> list[str]:
    """Where a run's saved ``config.yaml`` disagrees with the options the sweep gives it.

    Only the options the sweep sets are compared (``bame train`` fills in the rest, from its defaults),
    and not those that may change on ``--resume`` (device, data directory, ...).
    """
    pairs = [(k, saved.get(k), v) for k, v in options.items() if k not in config.RESUMABLE and not isinstance(v, dict)]
    for key, value in options.items():
        if isinstance(value, dict) and key not in config.RESUMABLE:
            nested = saved.get(key) or {}
            pairs += [(f"{key}.{k}", nested.get(k), v) for k, v in value.items()]
    return [f"{key}: {old!r} -> {new!r}" for key, old, new in pairs if old != new]


def check_existing(root: Path, runs: list[sweep.PlannedRun]) -> None:
    """Refuse to go on where a run directory holds a run of other options (the grid changed under it)."""
    for run in runs:
        path = root / sweep.RUNS / run.name / "config.yaml"
        if not path.is_file():
            continue
        diffs = option_differences(yaml.safe_load(path.read_text()) or {}, run.options)
        if diffs:
            raise ConfigError(f"{path.parent} holds a run with other options ({diffs[0]}): the sweep changed; "
                              "give another --out or remove that run")


def cores() -> int:
    """CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def threads_per_run(jobs: int, available: int | None = None) -> int:
    """Intra-op threads of each of ``jobs`` parallel runs: the cores split evenly, at least one."""
    return max(1, (available or cores()) // jobs)


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that asks Linux to SIGTERM the child when the sweep dies (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork: only the call runs in the child
    parent = os.getpid()

    def arm() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the sweep died between fork and prctl
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def try_lock(path: Path) -> int | None:
    """An open file descriptor holding an exclusive lock on ``path``, or None if another process holds it.

    The lock belongs to the open file, so a child given the descriptor keeps it until it exits, even
    when the sweep that started it was killed.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def train_command(root: Path, run: sweep.PlannedRun, state: str) -> list[str]:
    """The ``bame train`` command line of a run in a given state."""
    cmd = [sys.executable, "-m", "bame", "train", "--config", str(root / sweep.RECIPES / f"{run.name}.yaml"),
           "--out", str(root / sweep.RUNS / run.name)]
    if state == sweep.RESUME:
        return [*cmd, "--resume"]
    # no checkpoint: whatever a killed start left (config.yaml, a first metrics line) has nothing to resume
    return [*cmd, "--force"]


def launch(root: Path, run: sweep.PlannedRun, state: str, threads: int, lock_fd: int) -> subprocess.Popen:
    """Start one run; its output is appended to its log, and it inherits (and so holds) its lock."""
    cmd = train_command(root, run, state)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    with open(root / sweep.LOGS / f"{run.name}.log", "a") as log:
        log.write(f"== bame sweep, {time.strftime('%Y-%m-%d %H:%M:%S')}, {state}: {' '.join(cmd)}\n")
        log.flush()
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                pass_fds=(lock_fd,), preexec_fn=_die_with_parent())


def last_word(log: Path) -> str:
    """The run's error line from its log (``bame: error: ...``), else its last line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()] \
        if log.is_file() else []
    errors = [line for line in lines if line.startswith("bame: error:")]
    text = (errors or lines or ["(no output)"])[-1]
    return text if len(text) <= 300 else text[:297] + "..."


class Runner:
    """Keeps up to ``jobs`` runs going until every run is done, failed, or the sweep is stopped."""

    def __init__(self, root: Path, runs: list[sweep.PlannedRun], jobs: int, threads: int,
                 progress: bool = True) -> None:
        self.root, self.jobs, self.threads = root, jobs, threads
        self.pending = [r for r in runs if run_state(root / sweep.RUNS / r.name) != sweep.DONE]
        self.active: list[_Child] = []
        self.failures: list[Failure] = []
        self.stop_signal: int | None = None
        self.bar = tqdm(total=len(runs), initial=len(runs) - len(self.pending), unit="run", desc="sweep",
                        disable=not progress, dynamic_ncols=True)

    def run(self) -> list[Failure]:
        """Train every pending run; returns the failures. Raises SweepInterrupted on SIGINT/SIGTERM."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            stopping = False
            while (self.pending and self.stop_signal is None) or self.active:
                if self.stop_signal is None:
                    self._start_some()
                elif not stopping:  # here, not in the handler: a child started just now is stopped too
                    self._stop_children(signal.SIGTERM)  # bame train saves its checkpoint, then exits 130
                    stopping = True
                self._reap()
                time.sleep(POLL_S)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._stop_children(signal.SIGKILL)  # only left on an unexpected error
            self.bar.close()
        if self.stop_signal is not None:
            raise SweepInterrupted(f"stopped by signal {self.stop_signal}; the runs under way were asked to save a "
                                   "checkpoint: run the same command again to continue")
        return self.failures

    def _on_signal(self, sig: int, frame: object) -> None:
        self.stop_signal = self.stop_signal or sig

    def _stop_children(self, sig: int) -> None:
        for child in self.active:
            if child.proc.poll() is None:
                child.proc.send_signal(sig)
        if sig == signal.SIGKILL:
            for child in self.active:
                child.proc.wait()

    def _start_some(self) -> None:
        """Start pending runs up to ``jobs``; a run another process holds stays pending."""
        waiting = []
        for run in self.pending:
            if len(self.active) >= self.jobs:
                waiting.append(run)
                continue
            fd = try_lock(self.root / sweep.LOCKS / f"{run.name}.lock")
            if fd is None:  # a child of an earlier, killed sweep is still saving its checkpoint
                waiting.append(run)
                continue
            try:
                state = run_state(self.root / sweep.RUNS / run.name)  # again, now that we hold it
                if state == sweep.DONE:
                    self.bar.update(1)
                else:
                    self.active.append(_Child(run, launch(self.root, run, state, self.threads, fd)))
            finally:
                os.close(fd)  # the child has its own copy of the descriptor, and so the lock
        self.pending = waiting
        self._show()

    def _show(self) -> None:
        self.bar.set_postfix(running=len(self.active), failed=len(self.failures), refresh=False)

    def _reap(self) -> None:
        for child in [c for c in self.active if c.proc.poll() is not None]:
            self.active.remove(child)
            code = child.proc.returncode
            if code != 0 and self.stop_signal is None:
                log = self.root / sweep.LOGS / f"{child.run.name}.log"
                self.failures.append(Failure(child.run.name, 128 - code if code < 0 else code, last_word(log), log))
            self._show()
            if code == 0:
                self.bar.update(1)
            else:
                self.bar.refresh()


def failure_message(failures: list[Failure], total: int) -> str:
    """One line: how many runs failed and the first one's own error."""
    first = failures[0]
    return (f"{len(failures)} of {total} sweep runs failed; {first.name} exited {first.code}: "
            f"{first.message} (log: {first.log})")
