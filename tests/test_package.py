"""Packaging: the subpackages install under cavmae.*, the console script runs, imports stay light."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")


@pytest.mark.parametrize("name", ["export", "runtime", "cli"])
def test_no_bare_top_level_packages(name):
    """Run from / so the repository folder is not on sys.path: only the installed layout counts."""
    result = _run(f"import {name}")
    assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr


def test_subpackages_import():
    result = _run("import cavmae.export, cavmae.runtime, cavmae.cli; print('ok')")
    assert result.returncode == 0, result.stderr


def test_import_cavmae_does_not_import_torch():
    result = _run("import sys, cavmae; print('torch' in sys.modules)")
    assert result.stdout.strip() == "False", result.stderr


def test_console_script_version_and_help():
    import shutil

    exe = shutil.which("cavmae") or str(__import__("pathlib").Path(sys.executable).with_name("cavmae"))
    out = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "0.1.0" in out.stdout
    out = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "Usage: cavmae" in out.stdout


def test_sample_clips_and_graph_templates_ship_in_the_wheel(tmp_path):
    """The int8 gate's default clips and the graph templates are package data, so an installed
    cavmae has them."""
    import zipfile

    from cavmae.samples import SAMPLE_CLIP_NAMES, sample_clips

    assert [p.name for p in sample_clips()] == list(SAMPLE_CLIP_NAMES)
    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(repo)],
        capture_output=True, text=True,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("cavmae-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for clip in SAMPLE_CLIP_NAMES:
        assert f"cavmae/assets/media/{clip}" in names
    templates = {n for n in names if n.startswith("cavmae/export/templates/")}
    assert "cavmae/export/templates/index.json" in templates and len(templates) > 10
