"""cavmae.progress: a bar only on a terminal, a line per step in logs, nothing when asked."""

from __future__ import annotations

import io
import sys

import pytest

from cavmae import progress as pg


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Log:
    """stderr as a log file sees it (pytest's capture is not a terminal)."""

    def __init__(self, capsys) -> None:
        self.capsys, self.text = capsys, ""

    def getvalue(self) -> str:
        self.text += self.capsys.readouterr().err
        return self.text


@pytest.fixture
def log_stderr(monkeypatch, capsys):
    monkeypatch.delenv("CAVMAE_NO_PROGRESS", raising=False)
    monkeypatch.setenv("CAVMAE_PROGRESS_INTERVAL", "0")
    return _Log(capsys)


def test_style_follows_stderr_and_the_environment(monkeypatch):
    monkeypatch.delenv("CAVMAE_NO_PROGRESS", raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert pg.progress_style() == "lines" and not pg.progress_enabled()
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert pg.progress_style() == "bar" and pg.progress_enabled()
    assert pg.progress_style(False) is None
    monkeypatch.setenv("CAVMAE_NO_PROGRESS", "1")
    assert pg.progress_style() is None


def test_a_log_gets_lines_not_a_bar(log_stderr):
    items = list(pg.progress_bar(range(3), desc="classify", unit="clip"))
    assert items == [0, 1, 2]
    lines = log_stderr.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == ["classify: 1/3 clips", "classify: 2/3 clips",
                                                      "classify: 3/3 clips"]
    assert "left" in lines[0] and "left" not in lines[-1]
    assert "\r" not in log_stderr.getvalue()


def test_lines_are_rate_limited_but_first_and_last_always_show(log_stderr, monkeypatch):
    monkeypatch.setenv("CAVMAE_PROGRESS_INTERVAL", "3600")
    with pg.progress_bar(total=100, desc="prepare", unit="clip") as bar:
        for _ in range(100):
            bar.update(1)
    assert [line.split(",")[0] for line in log_stderr.getvalue().splitlines()] == [
        "prepare: 1/100 clips", "prepare: 100/100 clips"]


def test_a_stop_before_the_end_logs_where_it_stopped(log_stderr, monkeypatch):
    monkeypatch.setenv("CAVMAE_PROGRESS_INTERVAL", "3600")
    with pg.progress_bar(total=10, initial=2, desc="pretrain epoch 1/3", unit="step") as bar:
        for _ in range(4):
            bar.update(1)
            bar.set_postfix(loss="0.5000")
    lines = log_stderr.getvalue().splitlines()
    assert lines[0].startswith("pretrain epoch 1/3: 3/10 steps")
    assert lines[-1].startswith("pretrain epoch 1/3: 6/10 steps, loss=0.5000")


def test_bytes_and_postfix_strings(log_stderr):
    with pg.progress_bar(total=3 << 20, unit="B", unit_scale=True, unit_divisor=1024, desc="download") as bar:
        bar.update(3 << 20)
    assert log_stderr.getvalue().startswith("download: 3.0 MB of 3.0 MB")
    bar = pg.progress_bar(["audio_encoder"], desc="export", unit="graph", log_interval=0)
    for name in bar:
        bar.set_postfix_str(f"{name} validated")
    assert "export: 1/1 graphs, audio_encoder validated, " in log_stderr.getvalue()


def test_nothing_when_not_requested(log_stderr, monkeypatch):
    list(pg.progress_bar(range(3), enabled=False, desc="x"))
    pg.progress_note("export: first use", enabled=False)
    monkeypatch.setenv("CAVMAE_NO_PROGRESS", "1")
    list(pg.progress_bar(range(3), desc="x"))
    pg.progress_note("export: first use")
    assert log_stderr.getvalue() == ""


def test_bar_paused_clears_the_bar_before_printing(monkeypatch):
    monkeypatch.delenv("CAVMAE_NO_PROGRESS", raising=False)
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.setattr(sys, "stdout", term)  # one screen, as in a terminal
    bar = pg.progress_bar(total=2, desc="classify", unit="clip", mininterval=0)
    bar.update(1)
    with pg.bar_paused():
        print("clips/a.mp4")
    bar.close()
    out = term.getvalue()
    at = out.index("clips/a.mp4")
    assert "classify" in out[:at] and out[at - 1] in "\r\n"


def test_training_epochs_log_lines(log_stderr, tmp_path):
    from cavmae.train import PretrainConfig, pretrain
    from synthetic_av import make_synthetic_dataset

    ds = make_synthetic_dataset(tmp_path / "data", num_classes=2, splits={"train": 4}, seconds=1.0)
    cfg = PretrainConfig(train_data=str(ds.splits["train"]), output_dir=str(tmp_path / "run"), model="tiny",
                         epochs=1, batch_size=2, num_workers=0, progress=True, seed=1)
    pretrain(cfg)
    lines = [x for x in log_stderr.getvalue().splitlines() if x.startswith("pretrain epoch 1/1:")]
    done, total = lines[-1].split(": ")[1].split(" steps")[0].split("/")
    assert done == total and ", loss=" in lines[-1] and "\r" not in log_stderr.getvalue()
