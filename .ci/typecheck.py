#!/usr/bin/env python3
"""Type-check the installed package `cavmae` with mypy, the repository's config, from the source tree.

`export/`, `runtime/` and `cli/` install as `cavmae.export`, `cavmae.runtime` and `cavmae.cli`
through setuptools' package-dir mapping, and the editable install resolves that with an import
hook that mypy cannot follow. So this script lays the installed layout out as symlinks in a
temporary folder (read from `[tool.setuptools.package-dir]`, so it follows pyproject.toml), runs
`mypy -p cavmae` there and prints every path relative to the repository.

Usage: python .ci/typecheck.py [extra mypy arguments]; the exit status is mypy's.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: entries of a source folder that are not part of the package
SKIP = {"__pycache__"}


def package_dirs() -> dict[str, str]:
    """Installed package -> source folder, only the mappings not implied by a parent's."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    dirs: dict[str, str] = config["tool"]["setuptools"].get("package-dir", {})
    kept: dict[str, str] = {}
    for pkg in sorted(dirs, key=lambda p: p.count(".")):
        parent = max((p for p in kept if pkg.startswith(p + ".")), key=len, default=None)
        if parent is not None:
            implied = Path(kept[parent], *pkg[len(parent) + 1 :].split("."))
            if implied == Path(dirs[pkg]):
                continue
        kept[pkg] = dirs[pkg]
    return kept


def build_tree(root: Path, dirs: dict[str, str]) -> dict[str, str]:
    """Lay the installed packages out under `root`; return tree prefix -> repository prefix."""
    prefixes: dict[str, str] = {}
    for pkg, folder in dirs.items():
        target, source = root.joinpath(*pkg.split(".")), REPO / folder
        if "." not in pkg:
            # a top-level package gets a real folder with its entries linked one by one, so that
            # sub-packages from other source folders can be linked in beside them
            target.mkdir(parents=True)
            for entry in source.iterdir():
                if entry.name not in SKIP:
                    (target / entry.name).symlink_to(entry)
        elif target.parent.is_symlink() or not target.parent.is_dir() or target.exists():
            raise SystemExit(f"typecheck: cannot lay out {pkg} from {folder} (unusual mapping)")
        else:
            target.symlink_to(source, target_is_directory=True)
        prefixes[target.relative_to(root).as_posix() + "/"] = Path(folder).as_posix() + "/"
    return prefixes


def repo_paths(text: str, tmp: str, prefixes: dict[str, str]) -> str:
    """mypy's output with the tree's paths (absolute or relative to it) as repository paths."""
    text = text.replace(tmp.rstrip("/") + "/", "")
    # longest prefix first, so cavmae/export/ maps to export/ and not through cavmae/
    ordered = sorted(prefixes, key=len, reverse=True)
    pattern = re.compile(r"^(" + "|".join(re.escape(p) for p in ordered) + ")", re.M)
    return pattern.sub(lambda m: prefixes[m.group(1)], text)


def main(argv: list[str]) -> int:
    dirs = package_dirs()
    top = sorted({pkg.split(".")[0] for pkg in dirs})
    with tempfile.TemporaryDirectory(prefix="cavmae-typecheck-") as tmp:
        prefixes = build_tree(Path(tmp), dirs)
        command = [sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"),
                   "--cache-dir", str(REPO / ".mypy_cache")]
        command += [arg for name in top for arg in ("-p", name)] + argv
        env = dict(os.environ, MYPYPATH="")
        result = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True)
    sys.stdout.write(repo_paths(result.stdout, tmp, prefixes))
    sys.stderr.write(repo_paths(result.stderr, tmp, prefixes))
    return result.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
