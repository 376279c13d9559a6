"""The training engine: fit / train one epoch / evaluate. No method names inside.

Data flows one way: config -> (data, model, optimizer, sparsifier, ledger) -> run directory.
A run directory holds ``config.yaml``, ``metrics.jsonl`` (one line per epoch), ``updates.jsonl``
(per-layer statistics of every mask update), ``summary.json``, ``checkpoint.pt`` (the latest, enough to
resume exactly) and ``model.safetensors`` (the final weights with their masks).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import tempfile
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from bame import checkpoint, config, data, distributed, flops, methods, models
from bame.errors import BameError, CheckpointError, ConfigError, TrainingError
from bame.factory import create_method, sparsify
from bame.schedules import cosine_lr, schedule_lengths
from bame.sparsifier import Sparsifier

log = logging.getLogger("bame")
FORMAT = "bame-checkpoint-1"
RUN_FILES = ("config.yaml", "metrics.jsonl", "updates.jsonl", "summary.json", checkpoint.CHECKPOINT,
             checkpoint.WEIGHTS)


class Interrupted(BameError):
    """SIGINT/SIGTERM arrived; the checkpoint was saved."""

    exit_code = 130


@dataclass
class Run:
    """Everything one training process holds."""

    cfg: config.TrainConfig
    out: Path
    info: distributed.DistInfo
    train_loader: Any
    test_loader: Any
    model: nn.Module
    net: nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    sparsifier: Sparsifier
    ledger: flops.Ledger
    total_steps: int
    segments: list[int]  # iterations where the LR schedule (re)starts, plus the end
    epoch: int = 0
    batch: int = 0  # next batch index within the epoch
    best_top1: float = 0.0
    wall_s: float = 0.0
    partial: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # loss sum, correct, count
    stop_signal: int | None = None


# -- building ------------------------------------------------------------------------------------------


def _make_optimizer(cfg: config.TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


def wrap(model: nn.Module, info: distributed.DistInfo) -> nn.Module:
    """The model as the training step calls it: itself, or wrapped in DistributedDataParallel."""
    if not info.enabled:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[info.device] if info.device.type == "cuda" else None)


def compiled(net: nn.Module, cfg: config.TrainConfig) -> nn.Module:
    """``net`` under ``torch.compile`` with ``cfg.compile``'s backend ("none": as it is). The model itself is
    not changed: its names, state dict and checkpoints are those of the plain model."""
    return net if cfg.compile == "none" else torch.compile(net, backend=cfg.compile)


def run_lengths(cfg: config.TrainConfig, steps_per_epoch: int) -> tuple[int, int]:
    """``(T, nominal)`` of a run of ``cfg``: :func:`bame.schedules.schedule_lengths` with its method's factor."""
    return schedule_lengths(cfg.epochs, steps_per_epoch, methods.get(cfg.method).schedule_factor, cfg.max_steps)


def create_model(cfg: config.TrainConfig) -> nn.Module:
    """A freshly initialised model of ``cfg`` (seeded: identical weights on every rank and in ``bame flops``)."""
    spec = data.get_spec(cfg.dataset)
    torch.manual_seed(cfg.seed)
    return models.create(cfg.model or spec.default_model, num_classes=spec.num_classes,
                         in_channels=spec.in_channels, image_size=spec.image_size, width=cfg.width,
                         **cfg.model_options)


def attach(cfg: config.TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer | None, total: int,
           steps_per_epoch: int, verbose: bool = True) -> Sparsifier:
    """``cfg``'s sparsifier on ``model`` for a run of ``total`` steps."""
    with warnings.catch_warnings():  # the command line's own lines instead
        warnings.simplefilter("ignore")
        sparsifier = sparsify(model, optimizer, cfg.method, cfg.nm, total_steps=total, group_axis=cfg.group_axis,
                              seed=cfg.seed, steps_per_epoch=steps_per_epoch, verbose=False, kernel=cfg.kernel,
                              storage=cfg.storage, **cfg.method_options)
    if verbose:
        problem = sparsifier.method.schedule_problem()
        if problem is not None:
            log.warning("warning: %s", problem)
        for name, reason in sparsifier.dense_layers.items():
            log.info("%s stays dense: %s", name, reason)
    return sparsifier


def check_schedule(cfg: config.TrainConfig) -> None:
    """Build the method for the run's length without data, where the data set's size is known, so that an
    option that does not fit the run (``t_f`` before ``t_i`` once resolved, ASP's prune after the end) fails
    before any data is read."""
    spec = data.get_spec(cfg.dataset)
    if spec.train_size is not None and spec.train_size >= cfg.batch_size:
        spe = spec.train_size // cfg.batch_size
        with warnings.catch_warnings():  # said once, by attach
            warnings.simplefilter("ignore")
            create_method(cfg.method, cfg.nm, run_lengths(cfg, spe)[0], seed=cfg.seed, steps_per_epoch=spe,
                          **cfg.method_options)


def build(cfg: config.TrainConfig, out: Path, info: distributed.DistInfo) -> Run:
    """Data, model, optimizer, sparsifier and ledger for a config (fresh state)."""
    spec = data.get_spec(cfg.dataset)
    check_schedule(cfg)
    loader_args = dict(batch_size=cfg.batch_size, data_dir=cfg.data_dir, download=cfg.download, seed=cfg.seed,
                       rank=info.rank, world_size=info.world_size, workers=cfg.workers, device=info.device)
    train_loader = data.build_loader(cfg.dataset, "train", **loader_args)
    test_loader = data.build_loader(cfg.dataset, "test", **loader_args)
    if len(train_loader) == 0:
        raise ConfigError(f"batch size {cfg.batch_size} is larger than the {cfg.dataset} training set")
    model = create_model(cfg)
    model.to(info.device)
    total, nominal = run_lengths(cfg, len(train_loader))
    optimizer = _make_optimizer(cfg, model)
    sparsifier = attach(cfg, model, optimizer, total, len(train_loader), verbose=info.is_main)
    cost = flops.measure(model, (spec.in_channels, spec.image_size, spec.image_size))
    ledger = flops.Ledger(cost, batch_size=cfg.batch_size, nominal_steps=nominal)
    net = compiled(wrap(model, info), cfg)
    segments = sorted({0, *sparsifier.method.restart_steps(), total})
    run = Run(cfg, out, info, train_loader, test_loader, model, net, optimizer, sparsifier, ledger, total, segments)
    if info.enabled:  # compressed storage replaces the sparse weights: DDP must hold the new parameters
        sparsifier.switch_callbacks.append(lambda: setattr(run, "net", compiled(wrap(run.model, run.info), run.cfg)))
    return run


# -- checkpoints -----------------------------------------------------------------------------------------


def _checkpoint_state(run: Run) -> dict[str, Any]:
    return {
        "format": FORMAT, "config": run.cfg.to_dict(), "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(), "sparsifier": run.sparsifier.state_dict(),
        "ledger": run.ledger.state_dict(), "epoch": run.epoch, "batch": run.batch,
        "best_top1": run.best_top1, "wall_s": run.wall_s, "partial": list(run.partial),
        "rng": torch.get_rng_state(),
    }


def save_checkpoint(run: Run) -> None:
    if run.info.is_main:
        checkpoint.save(_checkpoint_state(run), run.out / checkpoint.CHECKPOINT)


_STATE_KEYS = ("config", "model", "optimizer", "sparsifier", "ledger", "epoch", "batch", "best_top1", "wall_s",
               "partial", "rng")


def restore(run: Run, state: dict[str, Any]) -> None:
    """Load a checkpoint into a freshly built run; refuses another config or model."""
    missing = [key for key in _STATE_KEYS if key not in state]
    if missing or not isinstance(state["config"], dict):
        raise CheckpointError(f"checkpoint is incomplete: no {', '.join(missing) or 'config'}")
    diffs = config.differences(state["config"], run.cfg.to_dict())
    if diffs:
        raise CheckpointError("--resume with a different config: " + "; ".join(diffs))
    try:
        _load_states(run, state)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
        # The checkpoint's own structure is wrong (it loaded, so it is not truncated): say so in one line.
        raise CheckpointError(f"checkpoint is malformed: {type(err).__name__}: {err}") from None


def extend(run: Run, state: dict[str, Any]) -> tuple[Run, dict[str, Any], bool]:
    """Resuming with more ``epochs`` than the checkpoint's run: the run, rebuilt for the longer length T.

    The cosine LR and every schedule point given as a fraction of T are re-resolved for the new T, so the
    rest of the run follows the schedule of a run of the new length; points the run has already passed
    stay at the iteration where they happened (:func:`bame.config.pins`, written into ``config.yaml`` as
    iterations), so it never goes back to an earlier phase. A shorter run is refused; any other difference
    is left to :func:`restore`, which refuses it.

    Returns:
        ``(run, state, lengthened)``: the run to restore into (rebuilt when points were pinned), the state
        with the lengthened config, and whether the run was lengthened.
    """
    saved, cfg, sparsifier = state.get("config"), run.cfg, state.get("sparsifier")
    step = sparsifier.get("step") if isinstance(sparsifier, dict) else None
    if not isinstance(saved, dict) or not isinstance(step, int) or saved.get("epochs") in (None, cfg.epochs):
        return run, state, False
    old_cfg, spe = config.build(saved), len(run.train_loader)
    old_total = run_lengths(old_cfg, spe)[0]
    old = create_method(old_cfg.method, old_cfg.nm, old_total, seed=old_cfg.seed, steps_per_epoch=spe,
                        **old_cfg.method_options).resolved_options()
    # Points pinned by an earlier lengthening whose first checkpoint never came (config.yaml has them).
    pinned = {k: v for k, v in cfg.method_options.items() if old_cfg.method_options.get(k) != v and old.get(k) == v}
    expected = {**saved, "epochs": cfg.epochs, "method_options": {**old_cfg.method_options, **pinned}}
    if config.differences(expected, cfg.to_dict()):
        return run, state, False
    if cfg.epochs < old_cfg.epochs:
        raise CheckpointError(f"--epochs {cfg.epochs} is fewer than the run's {old_cfg.epochs}: a run can be "
                              "lengthened on --resume, not shortened")
    if run.total_steps <= old_total:
        raise CheckpointError(f"--epochs {cfg.epochs} does not lengthen the run: max_steps={cfg.max_steps} keeps "
                              f"it at {old_total} steps")
    pinning = config.pins(cfg.method, old, run.sparsifier.method.resolved_options(), step)
    if pinning:
        run = build(config.build(cfg.to_dict(), {"method_options": pinning}), run.out, run.info)
    if run.info.is_main:
        log.info("lengthening the run from %d to %d steps at step %d%s", old_total, run.total_steps, step,
                 f"; schedule points passed stay: {pinning}" if pinning else "")
    return run, {**state, "config": run.cfg.to_dict()}, True


def _load_states(run: Run, state: dict[str, Any]) -> None:
    try:
        run.model.load_state_dict(state["model"])
    except RuntimeError as err:
        details = " ".join(str(err).split())  # torch's first line only names the class; the keys follow
        raise CheckpointError(f"checkpoint does not fit the model: {details[:300]}"
                              f"{'...' if len(details) > 300 else ''}") from None
    run.sparsifier.load_state_dict(state["sparsifier"])
    t = run.sparsifier.step_count
    if t in run.segments[1:-1] or any(s < t for s in run.segments[1:-1]):
        _restart_optimizer(run)  # a restart happened before this checkpoint: the saved state is the new one's
    run.optimizer.load_state_dict(state["optimizer"])
    # load_state_dict replaced the param-group dicts: the sparsifier must read eta (Eq. 5) from the new ones
    run.sparsifier.bind(run.optimizer)
    run.ledger.load_state_dict(state["ledger"])
    run.epoch, run.batch = int(state["epoch"]), int(state["batch"])
    run.best_top1, run.wall_s = float(state["best_top1"]), float(state["wall_s"])
    run.partial = [float(v) for v in state["partial"]]
    torch.set_rng_state(state["rng"])


def resolved_config(run: Run) -> dict[str, Any]:
    """What the run resolved its options to: T, the epoch length, the model and the method's options in
    iterations (e.g. ``t_i: 19533`` for ``t_i = 1/3``), written into ``config.yaml``."""
    spec = data.get_spec(run.cfg.dataset)
    return {"total_steps": run.total_steps, "steps_per_epoch": len(run.train_loader),
            "model": run.cfg.model or spec.default_model,
            "method_options": run.sparsifier.method.resolved_options()}


def _restart_optimizer(run: Run) -> None:
    """A method's restart point (ASP's fine-tuning): a fresh optimizer; the LR schedule restarts too."""
    run.optimizer = _make_optimizer(run.cfg, run.model)
    run.sparsifier.bind(run.optimizer)


# -- the loop --------------------------------------------------------------------------------------------


def lr_at(run: Run, t: int) -> float:
    """Cosine annealing per step within the current schedule segment (with optional warm-up)."""
    start = max(s for s in run.segments if s <= t) if t < run.total_steps else run.segments[-2]
    end = min(s for s in run.segments if s > start)
    warmup = int(round(run.cfg.warmup_epochs * len(run.train_loader)))
    return cosine_lr(t - start, end - start, run.cfg.lr, warmup)


def _autocast(run: Run):
    if not run.cfg.amp:
        return nullcontext()
    dtype = torch.float16 if run.info.device.type == "cuda" else torch.bfloat16
    return torch.autocast(run.info.device.type, dtype=dtype)


def train_step(run: Run, x: torch.Tensor, y: torch.Tensor, scaler: Any) -> tuple[float, int]:
    """One iteration; returns (summed loss, correct) over the local batch."""
    t = run.sparsifier.step_count
    if t in run.segments[1:-1]:
        _restart_optimizer(run)
    lr = lr_at(run, t)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.net.train()
    with _autocast(run):
        logits = run.net(x)
        loss = F.cross_entropy(logits, y, label_smoothing=run.cfg.label_smoothing)
    if not distributed.all_agree(bool(torch.isfinite(loss)), run.info):
        raise TrainingError(f"loss is not finite at step {t} (epoch {run.epoch + 1}): stopping; "
                            f"the last good checkpoint in {run.out} is kept")
    run.optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(run.optimizer)
        scaler.update()
    else:
        loss.backward()
        run.optimizer.step()
    correct = int((logits.argmax(-1) == y).sum())
    return float(loss.detach()) * len(y), correct


def _on_step(run: Run) -> None:
    def count(t: int) -> None:
        run.ledger.add(run.sparsifier.charges(t), run.sparsifier.method.phase_of(t))
    run.sparsifier.step_callbacks.append(count)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, info: distributed.DistInfo, amp: bool = False) -> tuple[float, float]:
    """(mean loss, top-1 %) over a whole split, summed over all ranks."""
    model.eval()
    loss_sum = correct = count = 0.0
    loader.set_epoch(0)
    for x, y in loader:
        with torch.autocast(info.device.type, enabled=amp,
                            dtype=torch.float16 if info.device.type == "cuda" else torch.bfloat16):
            logits = model(x)
        loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        correct += float((logits.argmax(-1) == y).sum())
        count += len(y)
    loss_sum, correct, count = distributed.all_reduce_sum([loss_sum, correct, count], info)
    return loss_sum / max(count, 1), 100.0 * correct / max(count, 1)


def _write_lines(path: Path, rows: list[dict[str, Any]], mode: str = "a") -> None:
    with open(path, mode) as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _truncate_log(path: Path, key: str, limit: int) -> None:
    """Drop lines written after the checkpoint being resumed (their ``key`` >= limit)."""
    if not path.exists():
        return
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash; it is after the checkpoint anyway
            continue
    _write_lines(path, [r for r in rows if r[key] < limit], mode="w")


def train_epoch(run: Run, scaler: Any) -> None:
    """Train until the end of the current epoch (or the end of the run, or a stop signal)."""
    loader = run.train_loader
    loader.set_epoch(run.epoch, run.batch)
    bar = tqdm(total=len(loader), initial=run.batch, desc=f"epoch {run.epoch + 1}", unit="batch",
               disable=not run.info.is_main or None, leave=False, dynamic_ncols=True)
    started, seen = time.perf_counter(), 0
    for x, y in loader:
        loss_sum, correct = train_step(run, x, y, scaler)
        run.partial = [run.partial[0] + loss_sum, run.partial[1] + correct, run.partial[2] + len(y)]
        run.batch += 1
        seen += len(y) * run.info.world_size
        if run.info.is_main:
            _write_lines(run.out / "updates.jsonl", run.sparsifier.pop_events())
        if run.cfg.check_masks and run.sparsifier.method.mask_may_change(run.sparsifier.step_count - 1):
            check_masks_agree(run)
        elapsed = time.perf_counter() - started
        bar.update(1)
        epoch_loss, epoch_correct, epoch_seen = run.partial
        bar.set_postfix(loss=f"{epoch_loss / epoch_seen:.3f}", top1=f"{100 * epoch_correct / epoch_seen:.1f}",
                        img_s=f"{seen / max(elapsed, 1e-9):.0f}", refresh=False)
        if run.sparsifier.step_count >= run.total_steps or _stop_requested(run):
            break
    bar.close()


def _stop_requested(run: Run) -> bool:
    """Whether a rank got SIGINT/SIGTERM; all ranks call this at the same points and agree, so that
    none of them goes on to a collective the others have left."""
    if run.info.enabled:
        agreed = int(distributed.all_reduce_max(float(run.stop_signal or 0), run.info))
        run.stop_signal = agreed or None
    return run.stop_signal is not None


def _check_weights_finite(run: Run) -> None:
    """Refuse to checkpoint NaN/inf weights: a bad last step of an epoch is otherwise only seen by the
    next step's loss check, after it has replaced the last good checkpoint."""
    for name, param in run.model.named_parameters():
        if not bool(torch.isfinite(param).all()):
            raise TrainingError(f"weights are not finite after step {run.sparsifier.step_count - 1} ({name}): "
                                f"stopping; the last good checkpoint in {run.out} is kept")


def check_masks_agree(run: Run) -> None:
    """All-gather a checksum of every mask and OBF state; fail loudly if the ranks disagree."""
    sums = []
    for layer in run.sparsifier.layers:
        weights = torch.arange(1, layer.mask.numel() + 1, device=layer.mask.device, dtype=torch.float64)
        sums.append(float((layer.mask.flatten().double() * weights).sum()))
        for name in layer.state_names:
            sums.append(float(layer.state(name).double().sum()))
    gathered = distributed.gather_checksums(sums, run.info)
    if any(g != gathered[0] for g in gathered[1:]):
        raise TrainingError(f"masks differ between ranks after step {run.sparsifier.step_count - 1}")


def _epoch_end(run: Run, epoch_start: float) -> dict[str, Any]:
    loss_sum, correct, count = distributed.all_reduce_sum(run.partial, run.info)
    test_loss, test_top1 = evaluate(run.net, run.test_loader, run.info, run.cfg.amp)
    run.best_top1 = max(run.best_top1, test_top1)
    run.wall_s += time.perf_counter() - epoch_start
    stats = run.sparsifier.layer_report()
    sparse = [s for s in stats if s["sparse"]]
    row = {
        "epoch": run.epoch + 1, "step": run.sparsifier.step_count,
        "lr": lr_at(run, max(run.sparsifier.step_count - 1, 0)),
        "train_loss": loss_sum / max(count, 1), "train_top1": 100.0 * correct / max(count, 1),
        "test_loss": test_loss, "test_top1": test_top1,
        "mask_changes": sum(s["total_flips"] for s in sparse),
        "frozen_fraction": sum(s["frozen_fraction"] for s in sparse) / max(len(sparse), 1),
        "density": sum(s["density"] for s in sparse) / max(len(sparse), 1),
        "train_flops": run.ledger.train_flops, "wall_s": round(run.wall_s, 3),
    }
    run.epoch += 1
    run.batch = 0
    run.partial = [0.0, 0.0, 0.0]
    return row


def _tensorboard(run: Run) -> Any:
    """A SummaryWriter into ``DIR/tb`` on rank 0 when tensorboard is installed, else None."""
    if not run.info.is_main:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: pip install 'bame[tensorboard]'
        return None
    return SummaryWriter(log_dir=str(run.out / "tb"))


def _log_tensorboard(writer: Any, row: dict[str, Any]) -> None:
    if writer is None:
        return
    for key, value in row.items():
        if key not in ("epoch", "step") and isinstance(value, (int, float)):
            writer.add_scalar(key, value, row["step"])
    writer.flush()


def _print_epoch(run: Run, row: dict[str, Any], epochs: int) -> None:
    dense = run.ledger.cost.dense_train() * run.ledger.batch_size * max(run.ledger.steps, 1)
    print(f"epoch {row['epoch']:>3}/{epochs}  step {row['step']:>6}  lr {row['lr']:.4f}  "
          f"train {row['train_loss']:.3f}/{row['train_top1']:5.1f}%  test {row['test_loss']:.3f}/"
          f"{row['test_top1']:5.1f}%  flips {row['mask_changes']}  frozen {row['frozen_fraction']:.2f}  "
          f"flops {run.ledger.train_flops / dense:.2f}x  {row['wall_s']:.1f}s", flush=True)


def check_out(out: Path, resume: bool, force: bool) -> None:
    """Refuse an output directory that holds another run, unless resuming or forced, or where no run can be
    written (changes nothing)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory")
    _check_writable(out)
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not resume and not force:
        raise ConfigError(f"{out} already holds a run ({', '.join(existing)}): use --resume to continue it "
                          "or --force to overwrite it")
    if resume and not (out / checkpoint.CHECKPOINT).exists():
        raise CheckpointError(f"--resume: no checkpoint in {out}")


def _check_writable(out: Path) -> None:
    """Refuse, before any data is read, an ``out`` where no file can be created: the nearest existing
    directory on its path must take a file (a probe created and removed at once; a permission check alone
    would pass for root in ``/proc`` and ``/sys``)."""
    probe = out
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"--out {out}: {probe} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        raise ConfigError(f"--out {out}: cannot create files in {probe} ({err.strerror or err})") from None


def prepare_out(out: Path, resume: bool, force: bool) -> None:
    """:func:`check_out`, then clear a forced directory and drop temp files a killed run left behind."""
    check_out(out, resume, force)
    existing = [name for name in RUN_FILES if (out / name).exists()]
    for name in RUN_FILES:  # atomic_write's temp files; a SIGKILL skips their cleanup
        for stale in out.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)
    if force and not resume:
        for name in existing:
            (out / name).unlink()
        if (out / "tb").is_dir():
            shutil.rmtree(out / "tb")
    out.mkdir(parents=True, exist_ok=True)


def fit(cfg: config.TrainConfig, out: str | Path, resume: bool = False, force: bool = False) -> dict[str, Any]:
    """Train (or resume) a run into ``out``; returns the summary."""
    out = Path(out)
    info = distributed.init(cfg.device)
    try:
        refusal = None
        if info.is_main:
            try:
                check_out(out, resume, force)
            except BameError as err:
                refusal = err
        distributed.raise_together(refusal, info)
        state = checkpoint.load(out / checkpoint.CHECKPOINT, map_location=info.device) if resume else None
        run = build(cfg, out, info)
        lengthened = False
        if state is not None:
            run, state, lengthened = extend(run, state)
            restore(run, state)
        if info.is_main:  # only now, with every input checked, is anything in ``out`` changed
            prepare_out(out, resume, force)
            if resume:
                _truncate_log(out / "metrics.jsonl", "epoch", run.epoch + 1)
                _truncate_log(out / "updates.jsonl", "step", run.sparsifier.step_count)
            if not resume or lengthened:
                text = config.dump(run.cfg, resolved_config(run)).encode()
                checkpoint.atomic_write(out / "config.yaml", lambda f: f.write(text))
        return _loop(run)
    finally:
        distributed.shutdown(info)


def _loop(run: Run) -> dict[str, Any]:
    _on_step(run)
    scaler = torch.amp.GradScaler("cuda") if run.cfg.amp and run.info.device.type == "cuda" else None
    epochs = math.ceil(run.total_steps / len(run.train_loader))
    previous = {sig: signal.signal(sig, lambda s, f: setattr(run, "stop_signal", s))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    writer = _tensorboard(run)
    row: dict[str, Any] = {}
    try:
        while run.sparsifier.step_count < run.total_steps:
            started = time.perf_counter()
            train_epoch(run, scaler)
            _check_weights_finite(run)
            if _stop_requested(run):
                run.wall_s += time.perf_counter() - started
                save_checkpoint(run)
                raise Interrupted(f"stopped by signal {run.stop_signal} at step {run.sparsifier.step_count}; "
                                  f"checkpoint saved: continue with --resume")
            row = _epoch_end(run, started)
            if run.info.is_main:
                _write_lines(run.out / "metrics.jsonl", [row])
                _log_tensorboard(writer, row)
                _print_epoch(run, row, epochs)
            save_checkpoint(run)
        return finish(run, row or _last_row(run.out / "metrics.jsonl"))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if writer is not None:
            writer.close()


def _last_row(path: Path) -> dict[str, Any]:
    """The last epoch's metrics (resuming a run that had already finished trains no epoch)."""
    lines = path.read_text().splitlines() if path.is_file() else []
    return json.loads(lines[-1]) if lines else {}


def finish(run: Run, last: dict[str, Any]) -> dict[str, Any]:
    """Write ``summary.json`` and ``model.safetensors``."""
    from bame import nm as nm_lib

    masks = run.sparsifier.masks()
    densities = {layer.name: layer.density() for layer in run.sparsifier.layers}
    param_names = {n for n, _ in run.model.named_parameters()}
    # the state dict holds dense weights under either storage (compressed values are a fraction of them)
    params = sum(v.numel() for k, v in run.model.state_dict().items() if k in param_names)
    effective = checkpoint.plain_state_dict(run.model, {})
    nonzero = sum(int((v != 0).sum()) for k, v in effective.items()
                  if k in param_names or k.replace(".weight", ".parametrizations.weight.original") in param_names)
    spec = data.get_spec(run.cfg.dataset)
    summary = {
        "dataset": run.cfg.dataset, "model": run.cfg.model or spec.default_model, "method": run.cfg.method,
        "nm": nm_lib.format_nm(run.sparsifier.n, run.sparsifier.m), "epochs": run.cfg.epochs,
        "steps": run.sparsifier.step_count, "seed": run.cfg.seed,
        "top1": last.get("test_top1"), "best_top1": run.best_top1, "test_loss": last.get("test_loss"),
        **run.ledger.summary(),
        "test_flops_ratio": flops.inference_flops_ratio(run.ledger.cost, densities),
        "params": params, "nonzero_params": nonzero, "wall_time_s": round(run.wall_s, 3),
        "world_size": run.info.world_size, "target": run.cfg.target,
        "layers": run.sparsifier.layer_report(),
    }
    if run.info.is_main:
        checkpoint.atomic_write(run.out / "summary.json", lambda f: f.write(json.dumps(summary, indent=2).encode()))
        checkpoint.save_weights(run.model, masks, run.out / checkpoint.WEIGHTS,
                                {"method": run.cfg.method, "nm": summary["nm"], "model": summary["model"]})
    return summary
