"""The package's shape: every public name imports, ``import instaprune`` stays light, and the layers import
downward only (core < models < data < method < baselines < training < evaluation < engine < pipeline < demo < cli),
checked on the source with ``ast`` (imports inside functions included)."""
from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import instaprune

LAYERS = ("core", "models", "data", "method", "baselines", "training", "evaluation", "engine", "pipeline", "demo",
          "cli")
SRC = Path(instaprune.__file__).parent


def _packages() -> list[str]:
    return ["instaprune"] + [f"instaprune.{m.name}" for m in pkgutil.iter_modules([str(SRC)]) if m.ispkg]


def _modules() -> list[str]:
    return [m.name for m in pkgutil.walk_packages([str(SRC)], "instaprune.") if not m.name.endswith("__main__")]


@pytest.mark.parametrize("package", _packages())
def test_every_name_in_every_all_imports(package):
    mod = importlib.import_module(package)
    assert mod.__all__, package
    for name in mod.__all__:
        assert getattr(mod, name) is not None, f"{package}.{name}"


def test_every_module_all_names_exist():
    for name in _modules():
        mod = importlib.import_module(name)
        for n in getattr(mod, "__all__", ()):
            assert hasattr(mod, n), f"{name}.__all__ names {n!r}, which it does not define"


def test_star_import_works():
    ns: dict = {}
    exec("from instaprune import *", ns)
    assert "calibrate" in ns and "Plan" in ns


def test_import_instaprune_is_light():
    code = ("import sys, instaprune, instaprune.core, instaprune.method, instaprune.pipeline\n"
            "heavy = [m for m in ('matplotlib', 'onnx', 'tqdm') if m in sys.modules]\n"
            "print(','.join(heavy))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"import instaprune pulled in {r.stdout.strip()}"


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every instaprune module ``path`` imports (absolute or relative, at any depth), with its line."""
    tree = ast.parse(path.read_text())
    rel = path.relative_to(SRC.parent).with_suffix("")
    pkg = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("instaprune")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("instaprune"):
                found.append((node.lineno, target))
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_layers_import_downward_only():
    rank = {name: i for i, name in enumerate(LAYERS)}
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        mine = _layer(".".join(path.relative_to(SRC.parent).with_suffix("").parts))
        if mine is None:
            continue
        for line, target in _imports(path):
            theirs = _layer(target)
            if target == "instaprune":
                theirs = None  # the top level only re-exports (``__version__``)
            if theirs is not None and rank[theirs] > rank[mine]:
                bad.append(f"{path.relative_to(SRC)}:{line} ({mine}) imports {target} ({theirs})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_cli_and_commands_do_not_import_each_other():
    cmds = [t for _, t in _imports(SRC / "cli" / "commands.py")]
    assert not any(t in ("instaprune.cli.main", "instaprune.cli") for t in cmds), cmds


def test_import_parser_sees_function_level_and_relative_imports():
    found = {t for _, t in _imports(SRC / "pipeline" / "stages.py")}
    assert "instaprune.training.checkpoint" in found and "instaprune.baselines.static" in found
