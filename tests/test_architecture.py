"""The shape of the code, measured on the tree (issue: one method contract; docs/architecture.md).

* no import circle between bame's modules, counting imports deferred into functions;
* at most 6 loops over layers written in method files (the sparsifier owns the loop);
* no method name compared as a string outside ``bame/methods/`` (method facts are class data);
* no private name imported from another module;
* the simple methods are small: the plan and the scores, little else.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from bame import methods
from bame.nm import is_nm

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "bame"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: at module level or inside functions, not under TYPE_CHECKING."""
    found = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            visit(child)

    visit(tree)
    return found


def import_edges(name: str, path: Path) -> set[str]:
    """The bame modules ``name`` imports (``from bame.x import y`` -> bame.x, or bame.x.y if a module)."""
    edges = set()
    for node in runtime_imports(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            assert node.level == 0, f"{name}: relative import"
            base = node.module or ""
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        edges |= {t for t in targets if t in MODULES and t != name}
    return edges


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            strong(v)
    return out


def test_cycle_finder_finds_a_planted_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_counting_deferred_imports():
    graph = {name: import_edges(name, path) for name, path in MODULES.items()}
    assert any(graph.values())  # the edges are found at all
    assert "bame.sparsifier" in graph["bame.factory"] and "bame.native" in graph["bame.nm"]
    assert cycles(graph) == []


def test_the_sparsifier_imports_no_registry():
    edges = import_edges("bame.sparsifier", MODULES["bame.sparsifier"])
    assert not edges & {"bame.methods", "bame.models", "bame.data", "bame.registry", "bame.factory"}
    assert "bame.engine" not in import_edges("bame.flops", MODULES["bame.flops"])


def test_no_private_name_is_imported_from_another_module():
    offenders = []
    for name, path in MODULES.items():
        for node in runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bame"):
                offenders += [f"{name}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert offenders == []


def layer_loops(tree: ast.AST) -> int:
    """``for ... in X.layers`` statements and comprehensions."""
    count = 0
    for node in ast.walk(tree):
        iters = [node.iter] if isinstance(node, ast.For) else [g.iter for g in getattr(node, "generators", [])]
        count += sum(isinstance(it, ast.Attribute) and it.attr == "layers" for it in iters)
    return count


def test_at_most_six_loops_over_layers_in_method_files():
    assert layer_loops(ast.parse("for layer in ctx.layers:\n    pass\n[l for l in sp.layers]")) == 2
    total = sum(layer_loops(ast.parse(p.read_text())) for p in (PACKAGE / "methods").glob("*.py"))
    assert total <= 6


def method_name_comparisons(source: str, names: set[str]) -> list[str]:
    """Comparisons of something about a method (an operand that mentions ``method``) with a method name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            strings = {c.value for o in operands for c in ast.walk(o)
                       if isinstance(c, ast.Constant) and isinstance(c.value, str)}
            if any("method" in ast.unparse(o) for o in operands):
                found += [f"{node.lineno}: {s!r}" for s in sorted(strings & names)]
    return found


def test_no_method_name_is_compared_as_a_string_outside_the_methods():
    names = set(methods.available())
    planted = 'if cfg.method == "sr_ste":\n    pass\nif s.get("method") in ("dense", "x"):\n    pass\n'
    assert method_name_comparisons(planted, names) == ["1: 'sr_ste'", "3: 'dense'"]
    offenders = []
    for name, path in MODULES.items():
        if not name.startswith("bame.methods"):
            offenders += [f"{name}:{line}" for line in method_name_comparisons(path.read_text(), names)]
    assert offenders == []


def code_lines(cls: type) -> int:
    """Lines of a method class's own code: the class body less docstrings, comments and blank lines."""
    import inspect

    source = inspect.getsource(cls)
    tree = ast.parse(source)
    body = tree.body[0].body
    drop = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            drop |= set(range(node.lineno, node.end_lineno + 1))
    lines = source.splitlines()
    first = body[0].lineno
    return sum(1 for i, line in enumerate(lines[first - 1:], start=first)
               if line.strip() and not line.strip().startswith("#") and i not in drop)


@pytest.mark.parametrize("name", ["static", "asp", "sr_ste", "lma", "bame", "rigl_nm"])
def test_simple_methods_are_small(name):
    cls = methods.get(name)
    assert code_lines(cls) <= 24, f"{name}: {code_lines(cls)} lines"


# ------------------------------------------------------------------------------- docs/architecture.md
DOC = (ROOT / "docs" / "architecture.md").read_text()


def floors() -> dict[str, int]:
    """``{module prefix: floor}`` from the doc's table (``bame`` alone is the package's public API)."""
    table = {}
    for floor, cells in re.findall(r"^\| (\d+) \| (.+) \|$", DOC, re.M):
        for name in re.findall(r"`([\w.]+)`", cells):
            table["bame" if name == "bame" else f"bame.{name}"] = int(floor)
    return table


def floor_of(module: str, table: dict[str, int]) -> int:
    if module == "bame":
        return table["bame"]
    matches = [p for p in table if p != "bame" and (module == p or module.startswith(p + "."))]
    assert matches, f"{module} is on no floor of docs/architecture.md"
    return table[max(matches, key=len)]


def test_every_import_goes_down_the_floors_of_the_doc():
    table = floors()
    assert table["bame.errors"] == 0 and table["bame.cli"] == 8
    violations = []
    for name, path in MODULES.items():
        for target in import_edges(name, path):
            same_package = name.split(".")[:2] == target.split(".")[:2] and name != "bame"
            if not same_package and floor_of(target, table) >= floor_of(name, table):
                violations.append(f"{name} (floor {floor_of(name, table)}) imports {target} "
                                  f"(floor {floor_of(target, table)})")
    assert violations == []


def doc_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC, re.S)


def test_the_doc_examples_are_at_most_15_lines_and_run_as_written(monkeypatch, tmp_path):
    import bame
    from bame import data, models

    methods.available(), models.available(), data.available()  # discovered before the registries are copied
    for registry in (methods.REGISTRY, models.REGISTRY, data.REGISTRY):
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
    blocks = doc_blocks()
    assert len(blocks) == 3 and all(len(b.strip().splitlines()) <= 15 for b in blocks)
    for block in blocks:
        exec(compile(block, "docs/architecture.md", "exec"), {})
    assert "magnitude_once" in methods.available() and "tiny_mlp" in models.available()
    model = models.create("tiny_mlp", num_classes=2, in_channels=1, image_size=8, hidden=32)
    sp = bame.sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), "magnitude_once", "1:4", verbose=False)
    loader = data.build_loader("parity", "train", batch_size=64)
    loader.set_epoch(0)
    for x, y in loader:
        loss = torch.nn.functional.cross_entropy(model(x.float()), y)
        sp.optimizer.zero_grad()
        loss.backward()
        sp.optimizer.step()
    layer = sp.layers[0]
    assert sp.step_count == len(loader) == 8 and is_nm(layer.mask, 1, 4) and not layer.weight[~layer.mask].any()
    from bame import config
    from bame.engine import fit

    cfg = config.build({"dataset": "parity", "model": "tiny_mlp", "method": "magnitude_once", "nm": "1:4",
                        "epochs": 1, "batch_size": 64, "model_options": {"hidden": 16}})
    assert fit(cfg, tmp_path / "run")["steps"] == 8
