"""``bame train``: train one run into a run directory (also under torchrun)."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from bame import config
from bame.cli.options import add_config_flags, add_method_flags, resolve
from bame.config import TrainConfig
from bame.errors import ConfigError


def default_out(cfg: TrainConfig) -> Path:
    from bame import data

    model = cfg.model or data.get_spec(cfg.dataset).default_model
    return Path("runs") / f"{cfg.dataset}-{model}-{cfg.method}-{cfg.nm.replace(':', '_')}-s{cfg.seed}"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an N:M sparse network",
                       description="Train an N:M sparse network; writes config.yaml, metrics.jsonl, "
                       "summary.json, checkpoint.pt and model.safetensors into --out.")
    p.add_argument("--config", metavar="RECIPE", help="a YAML recipe (see recipes/); flags given here override it")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="run directory (default: runs/DATASET-MODEL-METHOD-N_M-sSEED)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint, with the "
                   "options of its config.yaml; --epochs may lengthen it")
    p.add_argument("--force", action="store_true", help="overwrite a run already in --out")
    p.add_argument("--nproc", type=int, default=1, metavar="K", help="launch K local processes (DDP, torchrun's "
                   "environment: one OpenMP thread each unless OMP_NUM_THREADS is set)")
    add_config_flags(p)
    add_method_flags(p)
    p.set_defaults(run=run)


def _without_nproc(argv: list[str]) -> list[str]:
    rest, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        if token == "--nproc":
            skip = True
            continue
        if token.startswith("--nproc="):
            continue
        rest.append(token)
    return rest


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def worker_env(environ: dict[str, str], rank: int, nproc: int, port: int) -> dict[str, str]:
    """The environment of worker ``rank`` of ``nproc``: torchrun's variables, and as torchrun one OpenMP
    thread per worker unless the user set ``OMP_NUM_THREADS`` (K workers with every core each fight over
    the cores: 30x slower, and the thread count changes the last bits of the results)."""
    return {"OMP_NUM_THREADS": "1", **environ, "RANK": str(rank), "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}


def _launch(nproc: int, argv: list[str]) -> int:
    """``--nproc K``: run this command in K local processes with torchrun's environment (:func:`worker_env`).

    Not through torchrun itself: when a worker fails, torchrun's agent buries the worker's one-line
    message under its own traceback and always exits 1. SIGINT/SIGTERM are passed on to every worker
    (they stop after the same step and save the checkpoint); once one worker fails the others are stopped.
    """
    port = _free_port()
    procs: list[subprocess.Popen] = []
    for rank in range(nproc):
        env = worker_env(dict(os.environ), rank, nproc, port)
        procs.append(subprocess.Popen([sys.executable, "-m", "bame", *_without_nproc(argv)], env=env))

    def forward(sig: int, frame: object) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(sig)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _wait(procs)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _wait(procs: list[subprocess.Popen], grace_s: float = 30.0) -> int:
    """The first non-zero exit code of the workers (death by signal S as 128+S), 0 if all succeeded.

    Once one fails the others get SIGTERM, and SIGKILL after ``grace_s`` (a worker blocked in a collective
    with a dead peer may not get to its signal handler).
    """
    code, deadline = 0, None
    while any(proc.poll() is None for proc in procs):
        failed = [proc.returncode for proc in procs if proc.returncode not in (None, 0)]
        if failed and deadline is None:
            code, deadline = failed[0], time.monotonic() + grace_s
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()
        if deadline is not None and time.monotonic() > deadline:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
        time.sleep(0.05)
    code = code or next((proc.returncode for proc in procs if proc.returncode != 0), 0)
    return 128 - code if code < 0 else code


def resolve_run(args: argparse.Namespace) -> tuple[TrainConfig, Path]:
    """The config and run directory of ``bame train``; with --resume the run's own ``config.yaml`` is the
    base, so ``--out RUN --resume`` alone continues it (flags given on top must agree with it, but --epochs
    may lengthen it)."""
    out = args.out
    saved = config.load_run(out) if args.resume and out is not None else None
    if saved is None:
        cfg = resolve(args)
        out = out or default_out(cfg)
        saved = config.load_run(out) if args.resume else None
    if saved is not None:  # the flags alone may not even be valid: e.g. MaxQ's options with the default method
        cfg = resolve(args, saved)
    return cfg, out


def run(args: argparse.Namespace) -> int:
    if args.nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, not {args.nproc}")
    cfg, out = resolve_run(args)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        argv = list(getattr(args, "argv", sys.argv[1:]))
        if "--out" not in " ".join(argv):
            argv += ["--out", str(default_out(cfg))]
        return _launch(args.nproc, argv)
    from bame.engine import fit

    summary = fit(cfg, out, resume=args.resume, force=args.force)
    if summary.get("top1") is not None and int(os.environ.get("RANK", "0")) == 0:
        print(f"done: top-1 {summary['top1']:.2f}% (best {summary['best_top1']:.2f}%), "
              f"training FLOPs {summary['train_flops_ratio']:.3f}x dense, {summary['wall_time_s']:.1f}s -> {out}")
    return 0
