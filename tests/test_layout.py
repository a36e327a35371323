"""The package layout the project promises: the library never imports its applications, and the applications
install inside the sfcache namespace (no top-level `train` or `cli` on a user's path)."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
APPS = ("sfcache.train", "sfcache.cli")


def _imports(file: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(file.read_text(), filename=str(file))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_the_library_never_imports_the_applications():
    core = sorted((REPO / "sfcache").rglob("*.py"))
    assert len(core) > 20  # the walk found the library
    offending = {
        str(f.relative_to(REPO)): sorted(
            n for n in _imports(f) if n.startswith(APPS) or n.split(".")[0] in ("train", "cli")
        )
        for f in core
    }
    assert {f: names for f, names in offending.items() if names} == {}


def test_the_applications_install_as_sfcache_train_and_sfcache_cli(tmp_path):
    """Seen from outside the checkout (as a user's trainer sees the install), not from the repo root."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = (
        "import importlib.util as u; print(u.find_spec('sfcache.train.loop').origin); "
        "print(u.find_spec('sfcache.cli.main').origin); print(u.find_spec('train'), u.find_spec('cli'))"
    )
    found = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert found == [str(REPO / "train" / "loop.py"), str(REPO / "cli" / "main.py"), "None None"]
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts["sf"] == "sfcache.cli.main:main"


def test_every_library_package_is_listed_for_non_editable_installs():
    """A package folder missing from pyproject's `packages` would be left out of a wheel (sfcache.extract, ...)."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, folders = set(config["packages"]), config.get("package-dir", {})
    found = {
        ".".join(init.parent.relative_to(REPO).parts)
        for init in (REPO / "sfcache").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert found <= listed, sorted(found - listed)
    assert {name for name in listed if name not in folders} <= found  # nothing listed that is not there


def test_each_module_of_the_split_packages_says_its_one_job_in_one_line():
    """The house rule for a package's modules: the opening line states one job (no "and")."""
    packages = ("store", "extract", "inspection")
    for module in sorted(m for p in packages for m in (REPO / "sfcache" / p).glob("*.py")):
        doc = ast.get_docstring(ast.parse(module.read_text())) or ""
        first = doc.splitlines()[0] if doc else ""
        assert first.endswith(".") and " and " not in first, f"{module.name}: {first!r}"


def test_the_store_sits_below_what_reads_and_writes_through_it():
    """Data flows one way: the store package never imports the extractor, the inspector or the loaders above it,
    and no library module takes a name from the package root (`sfcache/__init__` is the users' door)."""
    above = ("sfcache.extract", "sfcache.inspection", "sfcache.torch", "sfcache.stored", "sfcache.integrations")
    for module in sorted((REPO / "sfcache" / "store").rglob("*.py")):
        assert not [n for n in _imports(module) if n.startswith(above)], module.name
    for module in sorted((REPO / "sfcache").rglob("*.py")):
        tree = ast.parse(module.read_text())
        rooted = [
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module == "sfcache" and node.level == 0
            for alias in node.names
            if not (REPO / "sfcache" / alias.name).with_suffix(".py").exists()
            and not (REPO / "sfcache" / alias.name).is_dir()
        ]
        assert not rooted, f"{module.relative_to(REPO)} imports {rooted} from the package root"
