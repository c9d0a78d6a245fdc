"""CI lints and type-checks: `.ci/run` runs ruff and mypy after the tests, and the type check sees
the installed layout (``export/`` as ``cavmae.export`` ...) through `.ci/typecheck.py`'s tree."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ci_typecheck", REPO / ".ci" / "typecheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ci_runs_ruff_and_mypy_after_the_tests() -> None:
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    tests = next(i for i, line in enumerate(lines) if line.endswith("python -m pytest"))
    assert "ruff check ." in lines[tests + 1 :]
    assert "python .ci/typecheck.py" in lines[tests + 1 :]


def test_mypy_config_names_its_untyped_libraries() -> None:
    """No global ignore_missing_imports: only named modules may lack types."""
    mypy = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"]
    assert "ignore_missing_imports" not in mypy
    assert mypy["check_untyped_defs"] is True
    for override in mypy.get("overrides", []):
        assert override["module"], override


def test_tree_lays_out_every_installed_package(tmp_path: Path) -> None:
    script = _script()
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    prefixes = script.build_tree(tmp_path, script.package_dirs())
    dirs = config["package-dir"]
    for pkg in config["packages"]:
        top = max((p for p in dirs if pkg == p or pkg.startswith(p + ".")), key=len)
        source = REPO / Path(dirs[top], *pkg[len(top) :].split(".")[1:]) / "__init__.py"
        laid = tmp_path.joinpath(*pkg.split("."), "__init__.py")
        assert laid.resolve() == source.resolve(), pkg
    assert prefixes["cavmae/export/"] == "export/"


def test_output_names_repository_paths() -> None:
    script = _script()
    prefixes = {"cavmae/": "cavmae/", "cavmae/runtime/": "runtime/", "cavmae/cli/": "cli/"}
    out = ("cavmae/runtime/index/embed.py:7: error: x  [misc]\n"
           "/tmp/t/cavmae/cli/main.py:1: note: y\ncavmae/model.py:2: error: z\nFound 3 errors\n")
    assert script.repo_paths(out, "/tmp/t", prefixes).splitlines() == [
        "runtime/index/embed.py:7: error: x  [misc]", "cli/main.py:1: note: y",
        "cavmae/model.py:2: error: z", "Found 3 errors",
    ]
