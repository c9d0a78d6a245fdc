"""``cavmae cache``: listing with sizes and last use, prune by age, clear; confirmation rules."""

from __future__ import annotations

import json
import os
import pty
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cavmae import CAVMAEFT, TINY, save_checkpoint
from cavmae.errors import CavmaeError
from cavmae.hub.inventory import format_age, parse_age
from conftest import AUDIOSET_CLIP

CAVMAE_EXE = shutil.which("cavmae") or str(Path(sys.executable).with_name("cavmae"))
DAY = 86400


def env_for(home: Path) -> dict[str, str]:
    return {**os.environ, "CAVMAE_HOME": str(home), "CAVMAE_NO_PROGRESS": "1"}


def run(*args: str, home: Path, stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
    return subprocess.run([CAVMAE_EXE, *args], capture_output=True, text=True, env=env_for(home),
                          stdin=stdin, timeout=600)


def listing(home: Path) -> dict:
    out = run("cache", "--json", home=home)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def age_back(path: Path, days: float) -> None:
    """Make ``path`` look last used ``days`` ago."""
    t = time.time() - days * DAY
    os.utime(path, (t, t))


@pytest.fixture(scope="module")
def filled_home(tmp_path_factory) -> Path:
    """A cache with a checkpoint in it and the export classify made from it on first use."""
    home = tmp_path_factory.mktemp("template") / "home"
    torch.manual_seed(0)
    ckpt = save_checkpoint(CAVMAEFT(TINY.replace(num_classes=527)), home / "checkpoints" / "as-full-51.2.pth")
    out = run("classify", str(AUDIOSET_CLIP), "-m", str(ckpt), "--engine", "ort", "--json", home=home)
    assert out.returncode == 0, out.stderr
    (home / "notes.txt").write_text("not cavmae's")
    return home


@pytest.fixture()
def home(filled_home, tmp_path) -> Path:
    """A private copy of the filled cache (the export is found again under the same key)."""
    return Path(shutil.copytree(filled_home, tmp_path / "home"))


def entries(data: dict, kind: str) -> list[dict]:
    return [e for e in data["entries"] if e["kind"] == kind]


def test_list_shows_sizes_and_last_use_and_loading_refreshes_it(home):
    data = listing(home)
    assert data["home"] == str(home)
    (ck,) = entries(data, "checkpoint")
    (ex,) = entries(data, "export")
    assert ck["name"] == "as-full-51.2" and ck["size_bytes"] == (home / "checkpoints" / "as-full-51.2.pth").stat().st_size
    export_dir = Path(ex["path"])
    assert export_dir.parent == home / "exports"
    on_disk = sum(p.stat().st_size for p in export_dir.rglob("*") if p.is_file())
    assert ex["size_bytes"] == on_disk > 0 and "classifier, fp32" in ex["detail"]
    assert data["total_bytes"] == sum(e["size_bytes"] for e in data["entries"])
    # table form
    out = run("cache", home=home)
    assert out.returncode == 0 and "as-full-51.2" in out.stdout and "total: 2 items" in out.stdout
    # using the model again marks both as used now; the checkpoint's mtime (hash memo key) stays
    ckpt = home / "checkpoints" / "as-full-51.2.pth"
    age_back(export_dir, 40)
    age_back(ckpt, 40)
    mtime_ns = ckpt.stat().st_mtime_ns
    assert "40 days" in run("cache", home=home).stdout
    out = run("classify", str(AUDIOSET_CLIP), "-m", str(ckpt), "--engine", "ort", "--json", home=home)
    assert out.returncode == 0, out.stderr
    assert "40 days" not in run("cache", home=home).stdout
    assert ckpt.stat().st_mtime_ns == mtime_ns


def test_prune_by_age_asks_first_and_refuses_without_a_terminal(home):
    (ex,) = entries(listing(home), "export")
    export_dir = Path(ex["path"])
    age_back(export_dir, 40)
    # no terminal, no --yes: one line, nothing removed
    out = run("cache", "prune", "--older-than", "30d", home=home)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "stdin is not a terminal; pass --yes" in out.stderr and export_dir.exists()
    # a terminal: asked, "n" keeps it
    assert _with_terminal(["cache", "prune", "--older-than", "30d"], b"n\n", home) == 0
    assert export_dir.exists()
    out = run("cache", "prune", "--older-than", "30d", "--dry-run", home=home)
    assert out.returncode == 0 and str(export_dir) in out.stdout and export_dir.exists()
    out = run("cache", "prune", "--older-than", "30d", "--yes", "--json", home=home)
    assert out.returncode == 0, out.stderr
    assert [e["path"] for e in json.loads(out.stdout)["removed"]] == [str(export_dir)]
    assert not export_dir.exists()
    assert entries(listing(home), "checkpoint")  # recently used: kept
    out = run("cache", "prune", "--older-than", "soon", "--yes", home=home)
    assert out.returncode == 2 and "cannot read the age 'soon'" in out.stderr


def test_clear_with_confirmation_keeps_foreign_files(home):
    foreign = [home / "checkpoints" / "my-own.pth", home / "checkpoints" / "README",
               home / "exports" / "mything" / "model.onnx", home / "trt" / "notes.txt"]
    for path in foreign:  # the user's files inside cavmae's folders are not cache items
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("mine")
    names = {e["path"] for e in listing(home)["entries"]}
    assert not names & {str(p) for p in foreign} and str(home / "exports" / "mything") not in names
    assert _with_terminal(["cache", "clear"], b"y\n", home) == 0
    assert listing(home)["entries"] == []
    assert (home / "notes.txt").read_text() == "not cavmae's"
    assert all(path.read_text() == "mine" for path in foreign)
    assert not (home / "hashes.json").exists()
    out = run("cache", "clear", home=home)  # nothing left: no question, no error
    assert out.returncode == 0 and "nothing to remove" in out.stderr


def _with_terminal(args: list[str], answer: bytes, home: Path) -> int:
    """Run the console script with a pseudo-terminal as stdin, typing ``answer``."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([CAVMAE_EXE, *args], stdin=slave, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env_for(home))
        os.close(slave)
        os.write(master, answer)
        _, err = proc.communicate(timeout=600)
    finally:
        os.close(master)
    assert b"Delete " in err, err
    return proc.returncode


def test_age_parsing():
    assert parse_age("30d") == 30 * DAY and parse_age("12h") == 12 * 3600 and parse_age("2w") == 14 * DAY
    assert parse_age("90m") == 5400
    with pytest.raises(CavmaeError, match="unit"):
        parse_age("30")
    assert format_age(3 * DAY) == "3 days" and format_age(120) == "2 min"


def test_removal_skips_an_export_its_writer_is_still_staging(home):
    """An export in progress sits under a temporary name (cavmae.fsio.make_temp_dir, as
    export_model stages it); removal finds its writer's lock from that name and skips it."""
    from cavmae import fsio
    from cavmae.hub.inventory import list_cache, remove_entries

    key = "0123456789abcdef-0123456789ab"
    staging = fsio.make_temp_dir(home / "exports" / key)
    (staging / "audio_encoder.onnx").write_bytes(b"half")
    with fsio.exclusive_lock(home / "exports" / f"{key}.lock"):  # the exporting process
        removed, busy = remove_entries([e for e in list_cache(home) if e.path == staging])
    assert [e.path for e in busy] == [staging] and removed == [] and staging.is_dir()
    removed, busy = remove_entries([e for e in list_cache(home) if e.path == staging])
    assert [e.path for e in removed] == [staging] and not staging.exists()


def test_a_cache_that_is_a_file_is_named_not_called_empty(tmp_path):
    (tmp_path / "home").write_text("not a folder")
    for args in (["cache"], ["cache", "--json"], ["classify", str(tmp_path / "home")]):
        out = run(*args, home=tmp_path / "home")
        assert out.returncode == 2 and "is a file, not a folder; set CAVMAE_HOME" in out.stderr, (args, out.stderr)
