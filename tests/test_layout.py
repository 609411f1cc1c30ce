"""The package layout (docs/architecture.md): every import points down the layers, no module-level import cycles,
and every module imports in dependency order. Fails when a module imports a package above its own or beside it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STUDIO = ROOT / "studio"

# bottom to top; a package may import packages of lower layers only (and itself)
LAYERS = (
    ("studio", "config"),  # the package root (__version__) and the settings
    ("files",),
    ("models",),
    ("control", "micro", "upscale"),
    ("generation",),
    ("dataset", "explorer"),
    ("storyboard", "train"),
    ("evaluate",),
    ("ui", "cli"),  # the two faces of the engine: Gradio tabs and commands
    ("__main__",),  # python -m studio
)
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}
ENGINE = set(RANK) - {"ui", "cli", "__main__"}


def modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the studio package."""
    out = {}
    for path in sorted(STUDIO.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def unit(module: str) -> str:
    """The layer unit of a dotted module name: its package under studio/, or the top-level module."""
    parts = module.split(".")
    return "studio" if len(parts) == 1 else parts[1]


def imports(path: Path, top_level_only: bool = False) -> list[tuple[str, int]]:
    """(imported studio module, line) for every import in `path`; with top_level_only, only those that run when
    the module is imported (not inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # imports under `if`/`try` at module level run at import too
        nodes = [n for top in tree.body if not isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                 for n in ast.walk(top)]
    known = modules()
    out = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "studio":
            for alias in node.names:  # `from studio.x import y`: y may itself be a module
                sub = f"{node.module}.{alias.name}"
                out.append((sub if sub in known else node.module, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "studio"]
    return out


def test_every_package_has_a_layer_and_a_docstring():
    units = {unit(name) for name in modules()}
    assert units == set(RANK), f"packages without a layer (add them to LAYERS and docs/architecture.md): " \
                               f"{sorted(units - set(RANK))}; layers naming nothing: {sorted(set(RANK) - units)}"
    for pkg in (p for p in STUDIO.iterdir() if p.is_dir() and (p / "__init__.py").is_file()):
        doc = ast.get_docstring(ast.parse((pkg / "__init__.py").read_text(encoding="utf-8")))
        assert doc and "import" in doc, f"studio/{pkg.name}/__init__.py must say what it is and what it may import"


def test_only_the_allowed_modules_sit_directly_in_studio():
    loose = sorted(p.name for p in STUDIO.glob("*.py"))
    assert loose == ["__init__.py", "__main__.py", "config.py"], loose


def test_imports_point_down_the_layers():
    bad = []
    for name, path in modules().items():
        here = unit(name)
        for target, line in imports(path):
            there = unit(target)
            if there == here or there not in RANK:
                continue
            if RANK[there] >= RANK[here]:
                bad.append(f"{path.relative_to(ROOT)}:{line} ({here}, layer {RANK[here]}) imports {target} "
                           f"({there}, layer {RANK[there]})")
    assert not bad, "imports that point up or sideways:\n" + "\n".join(bad)


def test_the_engine_never_imports_gradio():
    for name, path in modules().items():
        if unit(name) in ENGINE:
            text = path.read_text(encoding="utf-8")
            assert "import gradio" not in text and "from gradio" not in text, path


def test_no_module_level_import_cycles():
    graph = {name: {t for t, _ in imports(path, top_level_only=True) if t != name}
             for name, path in modules().items()}
    # a package's __init__ runs before its modules: importing studio.a.b imports studio.a too
    for name in list(graph):
        for target in list(graph[name]):
            parts = target.split(".")
            parents = {".".join(parts[:i]) for i in range(2, len(parts))}
            graph[name] |= {p for p in parents if not (name == p or name.startswith(p + "."))}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt in graph and nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_every_module_imports_in_layer_order():
    """A fresh interpreter imports each layer's modules after the layers below it: a module that needs a higher
    layer at import time, or is broken, fails here."""
    order = sorted((m for m in modules() if not m.endswith("__main__")), key=lambda m: (RANK[unit(m)], m))
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\nprint('ok')"
    done = subprocess.run([sys.executable, "-c", code, *order], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
