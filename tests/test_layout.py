"""The package layout (DESIGN.md §1): imports point downwards, no function shadows a module."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import cfjax

ROOT = Path(cfjax.__file__).resolve().parent
# Each layer may import those before it in this list, never one after it (gguf_header is the
# GGUF container reader that the tokenizer and the weights both read).
LAYERS = [
    "core",
    "runtime",
    "sharding",
    "atomic",
    "arguments",
    "gguf_header",
    "tokenizer",
    "weights",
    "causal",
    "models",
    "present",
    "demo",
    "experiments",
    "serve",
    "cli_parser",
    "cli",
]


def _cfjax_imports(file: Path) -> set[str]:
    """The `cfjax.X` (first component X) that a module imports, at any depth."""
    out = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "cfjax" and len(parts) > 1:
                out.add(parts[1])
    return out


def _layer(file: Path) -> str:
    rel = file.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def test_imports_point_downwards():
    bad = []
    for file in ROOT.rglob("*.py"):
        layer = _layer(file)
        if layer == "__init__":
            continue
        for target in _cfjax_imports(file):
            if target in LAYERS and LAYERS.index(target) > LAYERS.index(layer):
                bad.append(f"{file.relative_to(ROOT)} imports cfjax.{target}")
    assert not bad, bad


def test_scm_and_model_do_not_import_each_other():
    core = ROOT / "core"
    for a, b in (("scm", "model"), ("model", "scm")):
        tree = ast.parse((core / f"{a}.py").read_text(encoding="utf-8"))
        modules = {
            n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
        } | {f"{n.module}.{x.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module for x in n.names}  # fmt: skip
        assert not any(m.endswith(f"core.{b}") or m == f"cfjax.core.{b}" for m in modules), a


def test_no_public_name_shadows_a_module():
    packages = [cfjax] + [
        importlib.import_module(m.name)
        for m in pkgutil.walk_packages(cfjax.__path__, "cfjax.")
        if m.ispkg
    ]
    for package in packages:
        for sub in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"{package.__name__}.{sub.name}")
            assert getattr(package, sub.name) is module, f"{package.__name__}.{sub.name}"


def test_one_as_key():
    defs = [
        f"{file.relative_to(ROOT)}"
        for file in ROOT.rglob("*.py")
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8")))
        if isinstance(node, ast.FunctionDef) and node.name.lstrip("_") == "as_key"
    ]
    assert defs == ["core/checks.py"]


def test_exports():
    for name in ("convert", "list_models", "load", "generate", "counterfactual", "core"):
        assert name in cfjax.__all__ and hasattr(cfjax, name)
    assert cfjax.core.sample.__module__ == "cfjax.core.decode"
