"""The real console script: -o result files, progress in logs and terminals, prepare's exit code and --json."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import pty
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import torch

from cavmae import CAVMAEFT, TINY, save_checkpoint
from conftest import AUDIOSET_CLIP, VGGSOUND_CLIP
from media_factory import make_media, make_text_file

CAVMAE_EXE = shutil.which("cavmae") or str(Path(sys.executable).with_name("cavmae"))


def _env(home: Path, progress: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAVMAE_")}
    env["CAVMAE_HOME"] = str(home)
    if progress:
        env["CAVMAE_PROGRESS_INTERVAL"] = "0"  # a line per step, so two clips give two lines
    else:
        env["CAVMAE_NO_PROGRESS"] = "1"
    return env


def run(*args: str, home: Path, cwd: Path, progress: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([CAVMAE_EXE, *args], capture_output=True, text=True, env=_env(home, progress),
                          cwd=cwd, timeout=600)


def run_in_terminal(*args: str, home: Path, cwd: Path) -> tuple[int, str]:
    """Run with stdout and stderr on one pseudo-terminal, as a user at a shell sees it."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([CAVMAE_EXE, *args], stdin=slave, stdout=slave, stderr=slave,
                            env={**_env(home, progress=True), "TERM": "xterm"}, cwd=cwd, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + 600
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if not ready:
            if proc.poll() is not None:
                break
            continue
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=60), b"".join(chunks).decode("utf-8", "replace")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder with two clips, a tiny AudioSet classifier and a cache already holding its export."""
    tmp = tmp_path_factory.mktemp("out")
    torch.manual_seed(0)
    save_checkpoint(CAVMAEFT(TINY.replace(num_classes=527)), tmp / "model.pth")
    shutil.copy(AUDIOSET_CLIP, tmp / "a.mp4")
    shutil.copy(VGGSOUND_CLIP, tmp / "b.mp4")
    home = tmp / "home"
    first = run("classify", "a.mp4", "-m", "model.pth", home=home, cwd=tmp)
    assert first.returncode == 0, first.stderr
    return tmp, home


def _classify(work, *args: str) -> subprocess.CompletedProcess:
    tmp, home = work
    return run("classify", *args, "-m", "model.pth", home=home, cwd=tmp)


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_output_format_follows_the_ending_and_never_mixes(work):
    tmp, _ = work
    out = _classify(work, "a.mp4", "-o", "r.csv")  # no --csv: the ending decides
    assert out.returncode == 0, out.stderr
    assert [r["path"] for r in _csv_rows(tmp / "r.csv")] == [str(tmp / "a.mp4")] * 5  # absolute: see below
    out = _classify(work, "a.mp4", "b.mp4", "-o", "r.csv", "--csv")
    assert out.returncode == 0, out.stderr
    rows = _csv_rows(tmp / "r.csv")  # still one valid CSV under one header
    assert [r["path"] for r in rows] == [str(tmp / "a.mp4")] * 5 + [str(tmp / "b.mp4")] * 5
    assert {r["mode"] for r in rows} == {"av"}
    before = (tmp / "r.csv").read_bytes()
    for args in (["--json", "-o", "r.csv"], ["--csv", "-o", "r.jsonl"], ["-o", "r.txt"]):
        out = _classify(work, "a.mp4", *args)
        assert out.returncode == 2 and out.stderr.startswith("Error: "), out.stderr
        assert out.stderr.count("\n") == 1 and out.stdout == ""
    assert (tmp / "r.csv").read_bytes() == before
    assert not (tmp / "r.jsonl").exists() and not (tmp / "r.txt").exists()


def test_resume_is_keyed_on_resolved_path_and_mode(work):
    tmp, _ = work
    out = _classify(work, "a.mp4", "-o", "k.jsonl")
    assert out.returncode == 0, out.stderr
    out = _classify(work, str(tmp / "a.mp4"), "./b.mp4", "-o", "k.jsonl")
    assert out.returncode == 0, out.stderr
    assert "1 of 2 inputs already in k.jsonl" in out.stderr
    assert str(tmp / "a.mp4") not in out.stdout and "b.mp4" in out.stdout
    out = _classify(work, "a.mp4", "--mode", "audio", "-o", "k.jsonl")  # another mode: not done yet
    assert out.returncode == 0 and "already" not in out.stderr and "a.mp4" in out.stdout
    recs = [json.loads(line) for line in (tmp / "k.jsonl").read_text().splitlines()]
    assert [(Path(r["path"]).name, r["mode"]) for r in recs] == [("a.mp4", "av"), ("b.mp4", "av"),
                                                                 ("a.mp4", "audio")]


def test_resume_does_not_depend_on_the_folder_it_runs_in(work):
    """``clip.mp4`` in A and another ``clip.mp4`` in B, each classified from its folder into
    one file: B's is not taken for A's, and A's named from elsewhere is done (not duplicated).
    The file records absolute paths; stdout shows the path as typed."""
    tmp, home = work
    for folder, clip in (("A", "a.mp4"), ("B", "b.mp4")):
        (tmp / folder).mkdir(exist_ok=True)
        shutil.copy(tmp / clip, tmp / folder / "clip.mp4")
    for folder in ("A", "B"):
        out = run("classify", "clip.mp4", "-m", "../model.pth", "-o", "../cwd.jsonl", home=home, cwd=tmp / folder)
        assert out.returncode == 0 and "already" not in out.stderr, out.stderr
        assert out.stdout.startswith("clip.mp4\n")
    out = _classify(work, "A/clip.mp4", "-o", "cwd.jsonl")
    assert out.returncode == 0 and "1 of 1 inputs already in cwd.jsonl" in out.stderr
    recs = [json.loads(line) for line in (tmp / "cwd.jsonl").read_text().splitlines()]
    assert [r["path"] for r in recs] == [str(tmp / "A" / "clip.mp4"), str(tmp / "B" / "clip.mp4")]
    assert recs[0]["top"] != recs[1]["top"]  # two files, two results


def test_resume_refuses_other_settings(work):
    """A window, frame count, top-k or model other than the run that started the file would
    make results of other settings count as done (the 0-5 s window of a 5 s run is not the
    0-10 s clip of a plain one): refused, the file untouched."""
    tmp, _ = work
    out = _classify(work, "a.mp4", "-o", "s.jsonl")
    assert out.returncode == 0, out.stderr
    before = (tmp / "s.jsonl").read_bytes()
    for args, what in ((["--window", "5"], "window"), (["-k", "3"], "top_k"), (["--frames", "4"], "frames")):
        out = _classify(work, "a.mp4", *args, "-o", "s.jsonl")
        assert out.returncode == 2 and out.stderr.startswith("Error: ") and what in out.stderr, out.stderr
        assert out.stderr.count("\n") == 1
    assert (tmp / "s.jsonl").read_bytes() == before
    out = _classify(work, "a.mp4", "b.mp4", "-o", "s.jsonl")  # the same settings resume
    assert out.returncode == 0 and "1 of 2 inputs already in s.jsonl" in out.stderr


def test_labels_are_one_setting_however_named_and_an_edit_is_another(work):
    tmp, _ = work
    labels = tmp / "l4.csv"
    labels.write_text("index,mid,display_name\n" + "".join(f"{i},/m/{i},name {i}\n" for i in range(527)))
    out = _classify(work, "a.mp4", "--labels", "l4.csv", "-o", "l.jsonl")
    assert out.returncode == 0, out.stderr
    out = _classify(work, "a.mp4", "b.mp4", "--labels", str(labels), "-o", "l.jsonl")
    assert out.returncode == 0 and "1 of 2 inputs already in l.jsonl" in out.stderr, out.stderr
    labels.write_text(labels.read_text().replace("name 3\n", "name three\n"))
    out = _classify(work, "a.mp4", "--labels", "l4.csv", "-o", "l.jsonl")
    assert out.returncode == 2 and "labels" in out.stderr and out.stderr.count("\n") == 1, out.stderr


def test_a_csv_result_cut_mid_way_is_redone_whole(work):
    """-k 2 writes two rows a clip: a file cut inside the last clip's rows gets that clip redone."""
    tmp, _ = work
    out = _classify(work, "a.mp4", "b.mp4", "-k", "2", "-o", "cut.csv")
    assert out.returncode == 0, out.stderr
    whole = (tmp / "cut.csv").read_bytes()
    (tmp / "cut.csv").write_bytes(whole[:-30])  # inside b.mp4's rank-2 row
    out = _classify(work, "a.mp4", "b.mp4", "-k", "2", "-o", "cut.csv")
    assert out.returncode == 0 and "1 of 2 inputs already in cut.csv" in out.stderr, out.stderr
    assert (tmp / "cut.csv").read_bytes() == whole


def test_sigterm_saves_a_json_file_like_ctrl_c(work):
    """A .json file is rewritten every few seconds; stopped by SIGTERM the run still writes out
    every result it printed, then exits 143 with one line."""
    tmp, home = work
    proc = subprocess.Popen([CAVMAE_EXE, "classify", "a.mp4", "b.mp4", "-m", "model.pth", "-k", "1", "--window",
                             "0.5", "--json", "-o", "term.json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(home), cwd=tmp)
    assert proc.stdout is not None
    printed = [proc.stdout.readline(), proc.stdout.readline()]  # two results are done: stop it now
    proc.send_signal(signal.SIGTERM)
    rest, err = proc.communicate(timeout=120)
    printed += rest.splitlines()
    assert proc.returncode == 143, err
    assert err == "Terminated; the results so far are in term.json.\n"
    saved = json.loads((tmp / "term.json").read_text())
    assert len(printed) < 2 * 39  # it was stopped before the end ...
    assert len(saved) >= len([line for line in printed if line.strip()]) >= 2  # ... and lost nothing


def test_json_output_is_one_valid_document(work):
    tmp, _ = work
    out = _classify(work, "a.mp4", "-o", "r.json")
    assert out.returncode == 0, out.stderr
    assert [r["path"] for r in json.loads((tmp / "r.json").read_text())] == [str(tmp / "a.mp4")]
    out = _classify(work, "a.mp4", "b.mp4", "-o", "r.json", "--json")
    assert out.returncode == 0 and "1 of 2 inputs already in r.json" in out.stderr
    assert [Path(r["path"]).name for r in json.loads((tmp / "r.json").read_text())] == ["a.mp4", "b.mp4"]


def test_a_log_gets_a_line_per_step_not_a_bar(work, tmp_path):
    tmp, _ = work
    fresh_home = tmp_path / "home"  # first use: the export runs, and says so step by step
    out = run("classify", "a.mp4", "b.mp4", "-m", "model.pth", home=fresh_home, cwd=tmp, progress=True)
    assert out.returncode == 0, out.stderr
    err = out.stderr
    assert "\r" not in err and "%|" not in err
    assert "export: first use of model.pth" in err
    # graphs are exported when first run: one line per graph the command needs
    assert "export: audio_encoder: traced and validated in" in err
    assert "export: joint_classifier: traced and validated in" in err
    assert "classify: 1/2 clips" in err and "classify: 2/2 clips" in err


def test_bar_and_results_do_not_share_a_line_in_a_terminal(work):
    tmp, home = work
    rc, screen = run_in_terminal("classify", "a.mp4", "b.mp4", "-m", "model.pth", home=home, cwd=tmp)
    assert rc == 0, screen
    assert "classify:" in screen and "%|" in screen  # a bar was drawn
    for name in ("a.mp4", "b.mp4"):
        at = screen.index(name)
        assert screen[at - 1] in "\r\n", repr(screen[max(0, at - 80):at + 20])


def test_prepare_exits_2_on_a_failed_input_and_has_json(tmp_path):
    good = make_media(tmp_path / "good.mp4", duration=1.5, fps=8, size=(64, 48))
    silent = make_media(tmp_path / "silent.mp4", duration=1.0, fps=8, size=(64, 48), with_audio=False)
    out = run("prepare", str(good), str(silent), "-o", "prepared", "--json", home=tmp_path / "home",
              cwd=tmp_path, progress=True)
    assert out.returncode == 2, out.stderr
    summary = json.loads(out.stdout)
    assert (summary["clips"], summary["extracted"], len(summary["failed"])) == (1, 1, 1)
    assert summary["failed"][0]["video"] == str(silent)
    assert "1 of 2 inputs failed" in out.stderr
    assert "prepare: 2/2 clips" in out.stderr and "\r" not in out.stderr  # a log line, not a bar
    again = run("prepare", str(good), "-o", "prepared", home=tmp_path / "home", cwd=tmp_path)
    assert again.returncode == 0 and "1 already done" in again.stdout


def _exports(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "exports").iterdir()) if (home / "exports").is_dir() else []


def test_other_flag_settings_are_refused_before_the_model_loads(work):
    """--frames 4 on a file of 10 frames: refused before load, so no export entry is made for
    4 frames (the export for 10 is the one the file was written with)."""
    tmp, home = work
    out = _classify(work, "a.mp4", "-o", "early.csv")
    assert out.returncode == 0, out.stderr
    before = _exports(home)
    for args, what in ((["--frames", "4"], "frames 10 -> 4"), (["-k", "3"], "top_k 5 -> 3"),
                       (["--precision", "int8"], "precision 'fp32' -> 'int8'")):
        out = _classify(work, "a.mp4", *args, "-o", "early.csv")
        assert out.returncode == 2 and what in out.stderr and out.stderr.count("\n") == 1, out.stderr
        assert _exports(home) == before, args


def test_a_file_without_its_settings_record_is_checked_by_its_results(work):
    """The hidden settings record lost (a file copied or moved): what its results show (how
    many top classes, every score or not) must match the re-run; the rest cannot be checked,
    which the warning says."""
    tmp, _ = work
    for name, first, other, what in (("lost.jsonl", ["-k", "3"], ["-k", "2"], "top_k 3 -> 2"),
                                     ("lost.csv", ["-k", "3"], ["-k", "4"], "top_k 3 -> 4"),
                                     ("lost-all.csv", ["--all-scores"], [], "all_scores True -> False"),
                                     ("lost-all.jsonl", [], ["--all-scores"], "all_scores False -> True")):
        out = _classify(work, "a.mp4", *first, "-o", name)
        assert out.returncode == 0, out.stderr
        (tmp / f".{name}.settings.json").unlink()
        before = (tmp / name).read_bytes()
        out = _classify(work, "a.mp4", "b.mp4", *other, "-o", name)
        assert out.returncode == 2 and what in out.stderr and "is missing" in out.stderr, (name, out.stderr)
        assert out.stderr.count("\n") == 1 and (tmp / name).read_bytes() == before
        out = _classify(work, "a.mp4", "b.mp4", *first, "-o", name)  # the same flags: resumed, with a warning
        assert out.returncode == 0 and "1 of 2 inputs already in" in out.stderr, out.stderr
        assert "no record of the settings" in out.stderr and "cannot be checked" in out.stderr


def test_a_failure_among_inputs_done_already_says_so(work):
    tmp, _ = work
    make_text_file(tmp / "broken.mp4")
    out = _classify(work, "a.mp4", "-o", "mixed.jsonl")
    assert out.returncode == 0, out.stderr
    out = _classify(work, "a.mp4", "broken.mp4", "-o", "mixed.jsonl")
    assert out.returncode == 2
    assert out.stderr.splitlines()[-1] == "1 of 2 inputs failed; 1 done already (skipped)", out.stderr
    out = _classify(work, "a.mp4", "b.mp4", "broken.mp4", "-o", "mixed.jsonl")
    assert out.stderr.splitlines()[-1] == "1 of 3 inputs failed; 1 classified, 1 done already (skipped)"
