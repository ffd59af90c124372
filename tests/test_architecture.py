"""The architecture's rules (``docs/architecture.md``), checked on the source tree.

* every module imports in a fresh interpreter, whichever medmodal module is imported first;
* the package graph follows the layers; no generic package imports ``medmodal.methods`` (the plug-in registry in
  ``medmodal.engine.plugin`` discovers them); a method imports only another method's public modules and the
  method graph is acyclic;
* the generic packages never name a method.

Imports are read with :mod:`ast`, including those inside functions and ``TYPE_CHECKING`` blocks. Each test prints
every violation it finds.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "medmodal"

#: top-level part of medmodal (``medmodal.<part>``) → layer; a module may import its own layer and those below.
#: ``""`` is the root package ``medmodal`` itself. ``layers`` is reserved for dimension-agnostic building blocks.
LAYERS: dict[str, int] = {
    "": 0, "atomic": 0,
    "data": 1,
    "transforms": 2, "networks": 2, "losses": 2, "fusion": 2, "registration": 2, "evaluation": 2, "layers": 2,
    "engine": 3,
    "commands": 4,
    "methods": 5,
    "cli": 6,
}
LAYER_NAMES = {0: "base", 1: "data", 2: "components", 3: "engine", 4: "commands", 5: "methods", 6: "cli"}

#: explicit prohibitions (also implied by the layers; stated so that reordering the layers cannot lift them).
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "data": ("engine", "evaluation", "methods"),
    "evaluation": ("engine", "methods"),
}

#: the one generic module that may import ``medmodal.methods``, and only that bare package: the registry lists
#: it to discover the built-in plug-ins.
DISCOVERY = ("medmodal.engine.plugin", "medmodal.methods")

#: files of the generic packages that must not name a method (the issue's ``git grep`` check).
GENERIC_NAMED = ("engine", "data", "evaluation", "cli.py", "commands/common.py", "commands/pretrain.py", "atomic.py")
METHOD_WORDS = re.compile(r"shaspec|deepstaple|zero_fill|m2dn|multimix|pumit|medcoss")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@functools.cache
def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports_of(name: str, path: Path) -> Iterator[tuple[int, str]]:
    """``(line, imported module)`` of every medmodal import in ``path``, anywhere in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    known = all_modules()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # ``from pkg import mod`` imports the module pkg.mod
                sub = f"{target}.{alias.name}"
                yield node.lineno, sub if sub in known else target


def medmodal_edges() -> list[tuple[str, Path, int, str]]:
    """Every ``(importer, file, line, imported)`` between medmodal modules."""
    edges = []
    for name, path in all_modules().items():
        for line, target in imports_of(name, path):
            if target == "medmodal" or target.startswith("medmodal."):
                edges.append((name, path, line, target))
    return edges


def part(module: str) -> str:
    """``medmodal.engine.train`` → ``engine``; ``medmodal`` → ``""``."""
    return module.split(".")[1] if "." in module else ""


def method_of(module: str) -> str | None:
    """``medmodal.methods.shaspec.system`` → ``shaspec``; None outside a method package."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "methods" else None


def where(path: Path, line: int) -> str:
    return f"{path.relative_to(SRC.parent)}:{line}"


def test_every_module_imports_first() -> None:
    """Each module imports in a clean medmodal state: an import cycle that breaks only when a particular module is
    imported first fails here (third-party packages stay loaded, so this takes seconds)."""
    names = sorted(all_modules())
    script = (
        "import importlib, sys, traceback\n"
        "import torch, lightning, monai, typer  # noqa: F401  third-party stays loaded\n"
        "failed = []\n"
        "for name in sys.argv[1:]:\n"
        "    for m in [m for m in sys.modules if m.startswith('medmodal')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except BaseException:\n"
        "        failed.append(name + ':\\n' + traceback.format_exc())\n"
        "print('\\n'.join(failed) if failed else 'OK')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, *names], capture_output=True, text=True, timeout=600,
                          cwd=SRC.parent, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)})
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1:] == ["OK"], proc.stdout + proc.stderr


def test_every_part_has_a_layer() -> None:
    unplaced = sorted({part(m) for m in all_modules()} - set(LAYERS))
    print("\n".join(f"medmodal.{p}: not in a layer (add it to LAYERS and docs/architecture.md)" for p in unplaced))
    assert not unplaced


def layer_violations() -> list[str]:
    found = []
    for importer, path, line, target in medmodal_edges():
        src, dst = part(importer), part(target)
        at = f"{where(path, line)}: {importer} imports {target}"
        if (importer, target) == DISCOVERY:
            continue
        if dst == "methods" and src != "methods":
            found.append(f"{at}: a generic module imports medmodal.methods (plug-ins are found through "
                         "medmodal.engine.plugin)")
        elif src in LAYERS and dst in LAYERS and LAYERS[dst] > LAYERS[src]:
            found.append(f"{at}: layer {LAYER_NAMES[LAYERS[src]]} imports the higher layer "
                         f"{LAYER_NAMES[LAYERS[dst]]}")
        if dst in FORBIDDEN.get(src, ()):
            found.append(f"{at}: {src}/ must not import {dst}/")
    return found


def test_layers() -> None:
    found = layer_violations()
    print("\n".join(found))
    assert not found


def test_cli_finds_methods_through_the_registry() -> None:
    cli = PKG / "cli.py"
    direct = [f"{where(cli, line)}: imports {t}" for line, t in imports_of("medmodal.cli", cli)
              if t == "medmodal.methods" or t.startswith("medmodal.methods.")]
    print("\n".join(direct))
    assert not direct
    assert any(t == "medmodal.engine.plugin" for _, t in imports_of("medmodal.cli", cli))


def method_edges() -> tuple[list[str], dict[str, set[str]]]:
    """Violations of "only another method's public modules", and the method → method graph."""
    private, graph = [], {}
    for importer, path, line, target in medmodal_edges():
        a, b = method_of(importer), method_of(target)
        if a is None:
            continue
        graph.setdefault(a, set())
        if b is None or b == a:
            continue
        graph[a].add(b)
        print(f"cross-method import: {where(path, line)}: {importer} imports {target}")
        if any(p.startswith("_") for p in target.split(".")[3:]):
            private.append(f"{where(path, line)}: method {a} imports {target}, a private module of method {b}")
    return private, graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append([*stack[stack.index(nxt):], nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_methods_import_only_public_modules_of_other_methods_and_acyclically() -> None:
    private, graph = method_edges()
    loops = [" -> ".join(c) for c in cycles(graph)]
    print("\n".join(private + [f"method import cycle: {c}" for c in loops]))
    assert not private and not loops


def test_cycle_finder() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]


def test_generic_packages_name_no_method() -> None:
    hits = []
    for entry in GENERIC_NAMED:
        root = PKG / entry
        for path in sorted(root.rglob("*.py")) if root.is_dir() else [root]:
            for i, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if METHOD_WORDS.search(text):
                    hits.append(f"{where(path, i)}: {text.strip()}")
    print("\n".join(hits))
    assert not hits
