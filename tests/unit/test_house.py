"""The house rules of ffa_jax's import graph (/work/shared/DESIGN.md "The house"), checked on the
source with ``ast`` (no import is executed):

(a) no import cycle between modules (function-level imports count: a lazy import is still a
    dependency);
(b) no private name (``_x``, dunders excepted) imported from another module;
(c) every module belongs to a layer of :data:`LAYERS` and imports only its own layer or those
    below it.
"""

from __future__ import annotations

import ast
import collections
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "ffa_jax"

# Bottom to top. A module's layer is that of the longest prefix listed (``ffa_jax.run.loop`` ->
# ``ffa_jax.run``); ``ffa_jax`` itself (the package __init__) matches only itself, so that a new
# top-level module must be placed here. Modules of one layer may import each other (cycles are
# checked apart).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "ground",
        (
            "ffa_jax.errors",
            "ffa_jax.types",
            "ffa_jax.version",
            "ffa_jax.fileio",
            "ffa_jax.config",
            "ffa_jax.config_doc",
            "ffa_jax.xla_options",
            "ffa_jax.allocator",
        ),
    ),
    ("lora", ("ffa_jax.lora",)),
    ("privacy", ("ffa_jax.privacy",)),
    ("data", ("ffa_jax.data",)),
    ("models", ("ffa_jax.models",)),
    # distributed: mesh helpers over the round (DESIGN: federated/ holds the mesh helpers).
    ("federated", ("ffa_jax.federated", "ffa_jax.distributed")),
    # perf resolves batch sizes for a workload; checkpoint persists a run's state (lora +
    # privacy ledger): both sit just below the run layer that uses them.
    ("workloads", ("ffa_jax.workloads", "ffa_jax.perf", "ffa_jax.checkpoint")),
    ("run", ("ffa_jax.run",)),
    ("apps", ("ffa_jax.flower", "ffa_jax.experiments", "ffa_jax.bench")),
    ("top", ("ffa_jax.cli", "ffa_jax.api", "ffa_jax")),
)

# Upward imports that still exist, each with its reason. Empty: keep it so.
KNOWN_UPWARD: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PKG.rglob("*.py"):
        name = ".".join(p.relative_to(PKG.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    return mods


def _imports(mods: dict[str, Path]):
    """``(edges, private)``: edges ``(importer, imported module)`` and private-name imports
    ``(importer, module, name)`` over every import statement, at any depth."""
    edges: set[tuple[str, str]] = set()
    private: list[tuple[str, str, str]] = []
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if not node.module.startswith("ffa_jax"):
                    continue
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    target = full if full in mods else node.module
                    if target != name:
                        edges.add((name, target))
                    dunder = alias.name.startswith("__") and alias.name.endswith("__")
                    if alias.name.startswith("_") and not dunder and full not in mods:
                        private.append((name, node.module, alias.name))
            elif isinstance(node, ast.ImportFrom):
                raise AssertionError(f"{name}: relative import; ffa_jax uses absolute imports")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("ffa_jax") and alias.name != name:
                        edges.add((name, alias.name))
    return edges, private


def _cycles(mods, edges) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    graph = collections.defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(mods):
        if v not in index:
            visit(v)
    return out


def layer_of(module: str) -> int:
    best, level = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            inside = module.startswith(p + ".") and p != "ffa_jax"
            if (module == p or inside) and len(p) > best:
                best, level = len(p), i
    assert level is not None, f"{module} is in no layer of LAYERS; add it"
    return level


def test_no_import_cycle():
    mods = _modules()
    edges, _ = _imports(mods)
    assert _cycles(mods, edges) == []


def test_no_private_name_crosses_modules():
    _, private = _imports(_modules())
    assert private == []


def _private_attributes(mods: dict[str, Path]) -> list[tuple[str, str, str]]:
    """``(module, imported module, name)`` for every ``alias._name`` where ``alias`` is an
    ffa_jax module imported by that module (``from ffa_jax.privacy import accounting``, then
    ``accounting._x``): a private name crossing modules by attribute, not by import."""
    found = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    if full in mods and full != name:
                        aliases[alias.asname or alias.name] = full
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in mods and alias.asname and alias.name != name:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                found.append((name, aliases[node.value.id], node.attr))
    return found


def test_no_private_name_crosses_modules_by_attribute():
    assert _private_attributes(_modules()) == []


def test_every_module_has_a_layer():
    mods = _modules()
    assert len(mods) > 50  # the walk found the package
    for m in mods:
        layer_of(m)


def test_no_module_imports_a_higher_layer():
    mods = _modules()
    edges, _ = _imports(mods)
    upward = sorted(
        (a, b) for a, b in edges if layer_of(b) > layer_of(a) and (a, b) not in KNOWN_UPWARD
    )
    named = [f"{a} ({LAYERS[layer_of(a)][0]}) -> {b} ({LAYERS[layer_of(b)][0]})" for a, b in upward]
    assert named == []


def test_the_checks_see_a_violation(tmp_path):
    # The walkers are not vacuous: a planted cycle, private import and upward import are found.
    fake = {"ffa_jax.lora": tmp_path / "lora.py", "ffa_jax.run.x": tmp_path / "x.py"}
    fake["ffa_jax.lora"].write_text("def f():\n    from ffa_jax.run.x import _g\n")
    fake["ffa_jax.run.x"].write_text("from ffa_jax import lora\n")
    edges, private = _imports(fake)
    assert ("ffa_jax.lora", "ffa_jax.run.x") in edges
    assert private == [("ffa_jax.lora", "ffa_jax.run.x", "_g")]
    assert _cycles(fake, edges) == [["ffa_jax.lora", "ffa_jax.run.x"]]
    assert layer_of("ffa_jax.run.x") > layer_of("ffa_jax.lora")
