"""``bame report``: figures and tables from run directories, or from a sweep directory.

Writes PNG figures and a ``report.md`` embedding them: test top-1 and loss per epoch, top-1 against the
training-FLOPs ratio (both rules), the per-block accumulated mask flips (the paper's Figure 2), and per
layer the density, OBF's frozen fraction and the mask flips per update; plus a table of the runs with
mean ± std over seeds of one configuration. The headline is the last-epoch top-1. Given a sweep directory
(``bame sweep --out``), it reports the sweep instead: per configuration the mean, spread and 95% interval
over seeds, the differences between configurations paired by seed, and top-1 against training FLOPs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bame.errors import ConfigError


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="figures and a markdown report from run directories or a sweep",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR",
                   help="run directories (bame train --out), or one sweep directory (bame sweep --out)")
    p.add_argument("--out", type=Path,
                   help="where report.md and the figures go (default: ./report; for a sweep, SWEEP_DIR/report)")
    p.add_argument("--against", type=_names, metavar="A,B",
                   help="sweep only: compare every configuration with these (default: every pair)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from bame import report, sweep_report

    sweeps = [path for path in args.runs if sweep_report.is_sweep_dir(path)]
    if sweeps and len(args.runs) > 1:
        raise ConfigError(f"{sweeps[0]} is a sweep directory: report it alone, not with other directories")
    if sweeps:
        path = sweep_report.write_sweep_report(sweeps[0], args.out or sweeps[0] / "report", args.against)
    elif args.against:
        raise ConfigError("--against compares the configurations of a sweep: give a sweep directory")
    else:
        path = report.write_report(args.runs, args.out or Path("report"))
    print(f"report: {path}")
    return 0
