"""docs/results.md cites the study's numbers: they must be what its committed summaries say, and those
summaries must be what the per-seed results give (mean, sample standard deviation, 95% Student-t interval)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bame import stats

DOCS = Path(__file__).resolve().parent.parent / "docs"
RESULTS = DOCS / "results.md"
SUMMARIES = sorted((DOCS / "results").glob("*.json"))

pytestmark = pytest.mark.skipif(not RESULTS.exists(), reason="docs/results.md not written")


def _cells(path: Path) -> list[dict]:
    return [c for c in json.loads(path.read_text())["cells"] if c["top1_interval"]["n"]]


@pytest.mark.parametrize("path", SUMMARIES, ids=[p.stem for p in SUMMARIES])
def test_the_summaries_are_the_per_seed_results(path):
    cells = _cells(path)
    assert cells
    for cell in cells:
        values = [cell["top1"][seed] for seed in sorted(cell["top1"])]
        iv = stats.interval(values)
        got = cell["top1_interval"]
        assert got["n"] == len(values)
        assert got["mean"] == pytest.approx(sum(values) / len(values), abs=1e-5)
        if len(values) > 1:
            assert got["std"] == pytest.approx(iv.std, abs=1e-5)
            assert (got["low"], got["high"]) == pytest.approx((iv.low, iv.high), abs=1e-5)


def test_every_cited_row_matches_the_summaries():
    """Each table row of results.md that names a configuration of a summary, under a heading naming its slice
    and the summary (``study``, ``before-tie-fix``), shows that cell's seeds, mean ± std and interval."""
    text = RESULTS.read_text()
    cited = 0
    for path in SUMMARIES:
        for cell in _cells(path):
            iv = cell["top1_interval"]
            nm = cell["nm"] or "-"
            row = re.escape(f"| {cell['config']} | {cell['method']} | {nm} | {iv['n']}")
            for match in re.finditer(row + r"[^|]*\| ([0-9.]+) ± ([0-9.]+) \| \[([0-9.-]+), ([0-9.-]+)\]", text):
                section = text[:match.start()].rsplit("\n#", 1)[-1].split("\n", 1)[0]  # the nearest heading
                if not all(str(v) in section for v in cell["axes"].values()) or path.stem not in section:
                    continue
                mean, std, low, high = map(float, match.groups())
                assert mean == pytest.approx(iv["mean"], abs=0.006), (path.stem, cell["config"], section)
                assert std == pytest.approx(iv["std"], abs=0.006)
                assert (low, high) == pytest.approx((iv["low"], iv["high"]), abs=0.006)
                cited += 1
    assert cited >= 8  # the document cites the study, not nothing
