"""``bame report``: figures and tables from run directories.

Writes PNG figures and a ``report.md`` embedding them: test top-1 and loss per epoch, top-1 against the
training-FLOPs ratio (both rules), the per-block accumulated mask flips (the paper's Figure 2), and per
layer the density, OBF's frozen fraction and the mask flips per update; plus a table of the runs with
mean ± std over seeds of one configuration. The headline is the last-epoch top-1.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="figures and a markdown report from run directories",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories (bame train --out)")
    p.add_argument("--out", type=Path, default=Path("report"),
                   help="where report.md and the figures go (default: ./report)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from bame import report

    path = report.write_report(args.runs, args.out)
    print(f"report: {path}")
    return 0
