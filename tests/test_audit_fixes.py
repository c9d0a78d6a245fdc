"""Defects an audit reproduced: a video given twice to ``cavmae prepare``, a stdout that cannot
be written, non-finite rows in an embedding index."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from cavmae import CAVMAEFT, TINY, save_checkpoint
from cavmae.errors import DatasetError
from cavmae.prepare import prepare_videos
from cavmae.runtime.index import EmbeddingIndex, EmbeddingIndexError, IndexWriter, path_key
from conftest import AUDIOSET_CLIP, REPO, VGGSOUND_CLIP
from media_factory import make_media

CAVMAE_EXE = shutil.which("cavmae") or str(Path(sys.executable).with_name("cavmae"))


def _as_users_run() -> dict[str, str]:
    """The environment without ``PYTHONUNBUFFERED`` (a CI setting): stdout buffered, as a user's
    is when redirected, so output errors surface where they do for users."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}


def run(*args: str, tmp: Path, **kw) -> subprocess.CompletedProcess:
    env = {**_as_users_run(), "CAVMAE_HOME": str(tmp / "home"), "CAVMAE_NO_PROGRESS": "1", "TMPDIR": str(tmp)}
    kw.setdefault("stdout", subprocess.PIPE)
    return subprocess.run([CAVMAE_EXE, *args], stderr=subprocess.PIPE, text=True, env=env, timeout=600,
                          cwd=tmp, **kw)


def stderr_lines(out: subprocess.CompletedProcess) -> list[str]:
    return [line for line in out.stderr.splitlines() if line.strip()]


# --- 1. prepare: one clip per video, also on the first run --------------------------------------


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return make_media(tmp_path_factory.mktemp("videos") / "a.mp4", duration=1.0, fps=8, size=(64, 48))


def test_prepare_drops_a_video_given_twice_in_one_run(video, tmp_path):
    link = tmp_path / "link.mp4"
    link.symlink_to(video)
    spelled = video.parent / "." / video.name  # another spelling of the same path
    out = tmp_path / "out"
    report = prepare_videos([video, video, spelled, link], out, progress=False)
    assert (report.duplicates, report.extracted, len(report.clips)) == (3, 1, 1)
    data = json.loads((out / "data.json").read_text())["data"]
    assert [d["video_id"] for d in data] == ["a"]
    # a re-run describes the folder as the first run did
    again = prepare_videos([video, spelled], out, progress=False)
    assert (again.duplicates, again.skipped, len(again.clips)) == (1, 1, 1)


def test_prepare_a_repeat_lends_labels_and_contradicting_labels_refuse(video, tmp_path):
    (tmp_path / "list.csv").write_text(f"video,labels\n{video},\n{video},/m/a\n")
    report = prepare_videos(list_file=tmp_path / "list.csv", output_dir=tmp_path / "o1", progress=False)
    assert [c.labels for c in report.clips] == [("/m/a",)] and report.duplicates == 1
    (tmp_path / "bad.csv").write_text(f"video,labels\n{video},/m/a\n{video},/m/b\n")
    with pytest.raises(DatasetError, match="one video with different labels"):
        prepare_videos(list_file=tmp_path / "bad.csv", output_dir=tmp_path / "o2", progress=False)
    assert not (tmp_path / "o2" / "audio").exists()  # refused before any extraction


def test_prepare_cli_says_what_it_dropped(video, tmp_path):
    shutil.copy(video, tmp_path / "a.mp4")
    out = run("prepare", "a.mp4", "a.mp4", "./a.mp4", "-o", "p/b", tmp=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "1 clips in" in out.stdout and "(1 extracted" in out.stdout
    assert "warning: 2 input(s) dropped as repeats" in out.stderr
    assert len(json.loads((tmp_path / "p" / "b" / "data.json").read_text())["data"]) == 1
    again = run("prepare", "a.mp4", "a.mp4", "-o", "p/c", "--json", tmp=tmp_path)
    assert again.returncode == 0 and json.loads(again.stdout)["duplicates"] == 1


# --- 2. a stdout that cannot be written ---------------------------------------------------------


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("args", [["models", "--json"], ["models"]])
def test_a_full_stdout_is_one_line_and_exit_2(tmp_path, args):
    with open("/dev/full", "w") as full:
        out = run(*args, tmp=tmp_path, stdout=full)
    assert out.returncode == 2 and stderr_lines(out) == ["Error: cannot write output: No space left on device"]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_output_buffered_until_the_end_fails_in_one_line_too(tmp_path):
    """A command that leaves its output buffered (no flush) fails with the same line, not with
    an error at exit that loses it."""
    script = textwrap.dedent("""
        import sys
        from cavmae.cli.main import cli

        @cli.command("write")
        def write() -> None:
            sys.stdout.write("x" * 100)

        cli(["write"], prog_name="cavmae")
    """)
    with open("/dev/full", "w") as full:
        out = subprocess.run([sys.executable, "-c", script], stdout=full, stderr=subprocess.PIPE, text=True,
                             cwd=REPO, env=_as_users_run(), timeout=120)
    assert out.returncode == 2 and stderr_lines(out) == ["Error: cannot write output: No space left on device"]


def test_a_closed_pipe_stays_quiet(tmp_path):
    """``cavmae models | head -1``: the reader stopped early, which is no error to report."""
    read, write = os.pipe()
    os.close(read)  # every write gets EPIPE, deterministically
    try:
        for args in (["models"], ["models", "--json"]):
            out = run(*args, tmp=tmp_path, stdout=write)
            assert out.returncode in (0, 1) and out.stderr == "", out.stderr
    finally:
        os.close(write)


# --- 3. non-finite rows in an embedding index ---------------------------------------------------

D = 8
MODEL = {"sha256": "a" * 64, "name": "tiny", "checkpoint": "/x/tiny.pth", "ref": "/x/tiny.pth",
         "model_kind": "classifier", "model_config": {"embed_dim": D}, "precision": "fp32"}


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _index(root: Path, files: list[Path], commit_every: int = 3) -> None:
    """An index of ``files`` (which exist, so a prune keeps them), random unit rows; the last
    file has no audio."""
    rng = np.random.default_rng(0)
    audio, visual = _unit(rng, len(files)), _unit(rng, len(files))
    with IndexWriter(root, model=MODEL, dim=D, commit_every=commit_every) as w:
        for k, f in enumerate(files):
            w.add(f, audio[k] if k < len(files) - 1 else None, visual[k], duration=1.0)


def _damage(root: Path, chunk: int, modality: str, row: int | slice, value: float) -> Path:
    part = sorted(root.glob(f"chunk-*-{modality}.npy"))[chunk]
    arr = np.load(part)
    arr[row] = value
    np.save(part, arr)
    return part


@pytest.fixture
def files(tmp_path) -> list[Path]:
    out = [tmp_path / "media" / f"c{k}.mp4" for k in range(7)]
    out[0].parent.mkdir()
    for f in out:
        f.write_bytes(b"clip")
    return out


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_search_refuses_a_non_finite_row_naming_its_file(tmp_path, files, value):
    root = tmp_path / "idx"
    _index(root, files)
    part = _damage(root, 1, "audio", 0, value)  # one value of row 3
    index = EmbeddingIndex.open(root)
    q = np.ones(D, dtype=np.float32)
    with pytest.raises(EmbeddingIndexError) as err:
        index.search(q, "audio")
    message = str(err.value)
    assert f"{part} is damaged" in message and "row 3" in message and "\n" not in message
    assert f"cavmae index prune {root}" in message
    assert len(index.search(q, "visual", k=10)) == len(files)  # that file holds no visual rows


def test_a_non_finite_row_without_that_stream_is_not_scored(tmp_path, files):
    root = tmp_path / "idx"
    _index(root, files)
    _damage(root, 2, "audio", 0, np.nan)  # row 6 has no audio: never read as one
    assert len(EmbeddingIndex.open(root).search(np.ones(D), "audio", k=10)) == len(files) - 1


def test_the_approximate_index_refuses_non_finite_rows_too(tmp_path, files):
    pytest.importorskip("faiss")
    from cavmae.runtime.index.ann import ApproximateIndex, build_ann

    root = tmp_path / "idx"
    _index(root, files)
    build_ann(root)
    _damage(root, 0, "visual", slice(None), np.nan)
    with pytest.raises(EmbeddingIndexError, match="chunk-.*-visual.npy is damaged"):
        ApproximateIndex.open(EmbeddingIndex.open(root)).search(np.ones(D), "visual", k=10)
    with pytest.raises(EmbeddingIndexError, match="chunk-.*-visual.npy is damaged"):
        build_ann(root)


def test_prune_drops_damaged_rows_so_they_can_be_embedded_again(tmp_path, files):
    from cavmae.runtime.index.prune import prune_index

    root = tmp_path / "idx"
    _index(root, files)
    _damage(root, 0, "visual", 1, np.nan)
    _damage(root, 1, "audio", slice(None), np.nan)  # rows 3, 4, 5
    dry = prune_index(root, dry_run=True)
    assert (dry.kept, dry.dropped["damaged"], dry.to_dict()["damaged"]) == (3, 4, 4)
    result = prune_index(root, changed=False)
    assert result.rewritten and {p for p, r in result.examples if r == "damaged"} == {
        path_key(files[k]) for k in (1, 3, 4, 5)}
    index = EmbeddingIndex.open(root)
    assert len(index.search(np.ones(D), "audio", k=10)) == 2  # rows 0, 2 (6 has no audio)
    with IndexWriter(root, model=MODEL, dim=D) as w:  # the dropped files can be added again
        w.add(files[1], _unit(np.random.default_rng(1), 1)[0], None)
    assert files[1] in EmbeddingIndex.open(root)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> tuple[Path, Path]:
    """``(work dir, checkpoint)`` with ``work/idx`` embedded by ``cavmae embed`` (torch engine)."""
    tmp = tmp_path_factory.mktemp("embedded")
    torch.manual_seed(0)
    ckpt = save_checkpoint(CAVMAEFT(TINY).eval(), tmp / "ft.pth")
    out = run("embed", str(AUDIOSET_CLIP), str(VGGSOUND_CLIP), "-m", str(ckpt), "--engine", "torch",
              "--device", "cpu", "-o", str(tmp / "idx"), tmp=tmp)
    assert out.returncode == 0, out.stderr
    return tmp, ckpt


def test_search_cli_refuses_a_damaged_index_in_one_line(embedded, tmp_path):
    work, ckpt = embedded
    shutil.copytree(work / "idx", tmp_path / "idx")
    part = _damage(tmp_path / "idx", 0, "audio", slice(None), np.nan)
    out = run("search", str(tmp_path / "idx"), "--audio", str(AUDIOSET_CLIP), "--target", "audio", "--json",
              "-m", str(ckpt), "--engine", "torch", "--device", "cpu", tmp=work)
    assert out.returncode == 2 and out.stdout == ""
    (line,) = stderr_lines(out)
    assert line.startswith(f"Error: {part} is damaged") and "cavmae index prune" in line, line


def test_prune_cli_counts_damaged_rows(embedded, tmp_path):
    work, _ = embedded
    shutil.copytree(work / "idx", tmp_path / "idx")
    _damage(tmp_path / "idx", 0, "audio", slice(None), np.nan)
    out = run("index", "prune", str(tmp_path / "idx"), "--dry-run", tmp=work)
    assert out.returncode == 0, out.stderr
    assert "0 deleted, 0 changed, 2 damaged" in out.stdout, out.stdout
