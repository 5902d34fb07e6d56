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
    "cli_chat",
    "cli_attribute",
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


def _py(*folders: str) -> list[Path]:
    return sorted(f for d in folders for f in (ROOT / d).glob("*.py"))


def test_the_core_holds_no_host_state():
    """`core/` is pure (DESIGN.md §1): no stores, locks, chat templates or model handles; those
    live in the runtime layer above it."""
    for file in _py("core"):
        tree = ast.parse(file.read_text(encoding="utf-8"))
        modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}  # fmt: skip
        # (collections.abc is types; `collections` holds the containers of a cache store)
        assert not modules & {"threading", "jinja2", "collections", "weakref"}, file.name
        classes = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
        assert not classes & {"LM", "CacheStore", "ArrayStore"}, file.name


def test_engine_files_and_functions_stay_small():
    """Files of the core and the runtime layer <= 400 lines; functions of the engine, the
    runtime and `causal/` <= 60 lines (issue 29)."""
    for file in _py("core", "runtime"):
        assert len(file.read_text(encoding="utf-8").splitlines()) <= 400, file.name
    for file in _py("core", "runtime", "causal"):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef):
                lines = node.end_lineno - node.lineno + 1
                assert lines <= 60, f"{file.relative_to(ROOT)}: {node.name} has {lines} lines"


def _calls(name: str) -> list[str]:
    """The modules (relative paths) that call `name(...)` (as a bare or attribute name)."""
    found = []
    for file in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                f = node.func
                if (isinstance(f, ast.Name) and f.id == name) or (isinstance(f, ast.Attribute) and f.attr == name):  # fmt: skip
                    found.append(str(file.relative_to(ROOT)))
    return found


def test_one_decode_loop_and_one_trace_builder():
    """Every route decodes through `core.decode.decode` (the one loop), and every trace a run
    makes comes from `causal.trace.new_trace`."""
    assert _calls("while_loop") == ["core/decode.py"]
    assert set(_calls("Trace")) == {"causal/trace.py"}
