"""The layout's rules, read from the imports of every module of the package (DESIGN.md, "Layout").

Every `import` counts wherever it stands: at the top, inside a function, or under `TYPE_CHECKING`. Registries that
name modules as "module:object" strings (`rlfree.family`, `rlfree.samplers`, `rlfree.commands`, `rlfree.demos`)
import them on use, which is how they stay below what they register.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rlfree"
FAMILIES = ("rlfree.lm", "rlfree.diffusion")
NEUTRAL = ("weights", "seeds", "errors", "data", "options", "sources", "training", "device", "adapters", "family")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports (a `from package import submodule` names the submodule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {module for module in found if module in known and module != name}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_families_import_neither_each_other_nor_the_stages():
    for module, imported in graph().items():
        for family in FAMILIES:
            if inside(module, family):
                others = [m for m in imported if inside(m, "rlfree.stages")]
                others += [m for f in FAMILIES if f != family for m in imported if inside(m, f)]
                assert not others, f"{module} imports {others}"


@pytest.mark.parametrize("neutral", NEUTRAL)
def test_the_neutral_modules_import_no_family(neutral):
    imported = graph()[f"rlfree.{neutral}"]
    assert not [m for m in imported for f in FAMILIES if inside(m, f)], imported


@pytest.mark.parametrize("layer", ["rlfree.stages", "rlfree.rewards", "rlfree.evaluation"])
def test_stages_rewards_and_evaluation_reach_a_family_only_through_the_registry(layer):
    for module, imported in graph().items():
        if inside(module, layer):
            reached = [m for m in imported for f in FAMILIES if inside(m, f)]
            assert not reached, f"{module} imports {reached}"


def test_no_import_circle():
    edges = graph()
    cycles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for imported in sorted(edges[module]):
            if state.get(imported) == "open":
                cycles.append(path[path.index(imported) :] + [imported])
            elif imported not in state:
                visit(imported, [*path, imported])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """The rules above would fail: a family module importing a stage, and a circle, are found."""
    package = tmp_path / "rlfree"
    for folder in ("lm", "stages"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "lm" / "bad.py").write_text("from ..stages import run\n")
    (package / "stages" / "run.py").write_text("def f():\n    from ..lm import bad\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", package)
    assert graph()["rlfree.lm.bad"] == {"rlfree.stages.run"}
    with pytest.raises(AssertionError, match="rlfree.lm.bad imports"):
        test_the_families_import_neither_each_other_nor_the_stages()
    with pytest.raises(AssertionError, match="rlfree.lm.bad -> rlfree.stages.run -> rlfree.lm.bad"):
        test_no_import_circle()
