"""``bame sweep``: a grid of training runs (configurations x option values x seeds), resumable, in parallel.

Every run is an ordinary ``bame train`` run directory under DIR/runs/; DIR/sweep.yaml records the
expanded grid, and ``bame report DIR`` gives per configuration the mean and 95% interval over seeds and
the paired differences between configurations. Invoked again, the sweep skips finished runs and resumes
interrupted ones. Training and method flags given here override every run of the sweep file. The sweep
file's format is in the docstring of bame/sweep.py and in recipes/study/.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bame import sweep, sweep_runner
from bame.cli.options import add_config_flags, add_method_flags, overrides
from bame.errors import ConfigError, TrainingError


def _names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _seeds(text: str) -> list[int]:
    """``0,1,2`` or ``0-4`` (inclusive), or a mix: ``0-2,7``."""
    seeds: list[int] = []
    try:
        for part in _names(text):
            first, _, last = part.partition("-")
            seeds += list(range(int(first), int(last) + 1)) if last else [int(first)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds like 0,1,2 or 0-4, got {text!r}") from None
    return seeds


def _value(text: str) -> Any:
    """A grid value: an int, a float, true/false, or the text itself (``1:16``, ``kflat``)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _axis(text: str) -> tuple[str, list[Any]]:
    key, sep, values = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE[,VALUE...], got {text!r}")
    return key.strip().replace("-", "_"), [_value(v) for v in _names(values)]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="a grid of runs (methods x seeds x options), resumable, in parallel",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("sweep_file", nargs="?", type=Path, metavar="SWEEP.yaml",
                   help="the sweep: base, seeds, grid, configs (see recipes/study/)")
    p.add_argument("--out", type=Path, help="the sweep directory (default: runs/sweep-NAME of the sweep file)")
    p.add_argument("--methods", type=_names, metavar="A,B",
                   help="configurations to run: names from the sweep file, or methods (each its own configuration)")
    p.add_argument("--seeds", type=_seeds, metavar="0,1,2", help="the seeds (replace the file's), e.g. 0-2")
    p.add_argument("--grid", type=_axis, action="append", default=[], metavar="KEY=V1,V2",
                   help="an axis: values of an option (replace the file's), or which named levels to keep "
                   "(e.g. budget=short); repeatable")
    p.add_argument("-j", "--jobs", type=int, metavar="K",
                   help="runs trained at once (default: one per core); each gets cores // K threads")
    p.add_argument("--config", help="a bame train recipe that the sweep file's base builds on")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state; start nothing")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_config_flags(p)
    add_method_flags(p)
    for action in p._actions:  # configurations name the methods and --seeds the seeds: not for a sweep
        if action.dest in ("method", "seed"):
            action.help = argparse.SUPPRESS
    p.set_defaults(run=run)


def _spec(args: argparse.Namespace) -> sweep.Spec:
    from bame import config

    given = overrides(args)
    for key, flag in (("method", "--methods"), ("seed", "--seeds")):
        if key in given:
            raise ConfigError(f"bame sweep takes {flag}, not --{key}")
    raw = sweep.load_file(args.sweep_file) if args.sweep_file else {}
    recipe = config.load_recipe(args.config) if args.config else {}
    return sweep.build_spec(raw, recipe=recipe, overrides=given, configs=args.methods, seeds=args.seeds,
                            grid=dict(args.grid))


def default_out(sweep_file: Path | None) -> Path:
    return Path("runs") / (f"sweep-{sweep_file.stem}" if sweep_file else "sweep")


def _print_plan(root: Path, plan: sweep.Plan) -> None:
    states = {run.name: sweep_runner.run_state(root / sweep.RUNS / run.name) for run in plan.runs}
    counts = {state: list(states.values()).count(state) for state in (sweep.DONE, sweep.RESUME, sweep.FRESH)}
    configs = sorted({cell.config for cell in plan.cells})
    print(f"{len(plan.runs)} runs for {len(plan.cells)} configuration cells ({len(configs)} configurations x "
          f"axes {', '.join(plan.axes) or 'none'}) in {root}: {counts[sweep.DONE]} done, "
          f"{counts[sweep.RESUME]} to resume, {counts[sweep.FRESH]} to start")
    for run in plan.runs:
        print(f"  {states[run.name]:6s} {run.name}")


def run(args: argparse.Namespace) -> int:
    spec = _spec(args)
    plan = sweep.expand(spec)
    sweep.validate(plan)
    root = args.out or default_out(args.sweep_file)
    if args.dry_run:
        _print_plan(root, plan)
        return 0
    if args.jobs is not None and args.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, not {args.jobs}")
    sweep_runner.check_existing(root, plan.runs)
    sweep.write_plan(root, plan, spec)
    jobs = args.jobs or sweep_runner.cores()
    threads = sweep_runner.threads_per_run(jobs)
    print(f"sweep: {len(plan.runs)} runs into {root}, {jobs} at a time with {threads} thread(s) each", flush=True)
    failures = sweep_runner.Runner(root, plan.runs, jobs, threads, args.progress).run()
    if failures:
        raise TrainingError(sweep_runner.failure_message(failures, len(plan.runs)))
    print(f"sweep: all {len(plan.runs)} runs finished in {root}; report: bame report {root}")
    return 0
