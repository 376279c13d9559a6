"""The README's integration snippet runs as printed, and its method table lists every method."""

import re
from pathlib import Path

import torch

from bame import methods
from bame.nm import is_nm

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_snippet_runs():
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    model = scope["model"]
    assert type(model[2]) is torch.nn.Conv2d  # squashed back to a plain module
    assert is_nm(model[2].weight != 0, 1, 16, exact=False)
    assert scope["state"]["step"] == scope["T"]


def test_readme_lists_every_method():
    listed = set(re.findall(r"^\| `(\w+)` \|", README, re.M))
    assert set(methods.available()) <= listed
