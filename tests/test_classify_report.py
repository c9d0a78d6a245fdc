"""``classify --ray`` counts windows as windows in its progress, and the end-of-run report of
failed inputs says what became of the others (classified, or done by an earlier run). Ray
itself is not started: the Ray Data steps are replaced by a list of rows."""

from __future__ import annotations

from types import SimpleNamespace

import click
import numpy as np
import pytest

from cavmae.cli import ray_run
from cavmae.runtime import ray_data


class _Rows:
    def __init__(self, rows):
        self.rows = rows

    def iter_rows(self):
        return iter(self.rows)


@pytest.mark.parametrize(("window", "unit"), [(5.0, "windows"), (None, "clips")])
def test_ray_progress_counts_windows_as_windows(monkeypatch, capsys, window, unit):
    monkeypatch.delenv("CAVMAE_NO_PROGRESS", raising=False)
    monkeypatch.setenv("CAVMAE_PROGRESS_INTERVAL", "0")
    rows = [{"path": "a.mp4", "mode": "av", "offset": float(i), "end": float(i + 5), "error": "",
             "probs": np.zeros(3, dtype=np.float32)} for i in range(3)]
    monkeypatch.setattr(ray_data, "from_paths", lambda paths: None)
    monkeypatch.setattr(ray_data, "plan_clips", lambda ds, **kw: ds)
    monkeypatch.setattr(ray_data, "decode_clips", lambda ds, preprocess: ds)
    monkeypatch.setattr(ray_data, "classify_clips", lambda ds, spec, **kw: _Rows(rows))
    settings = SimpleNamespace(init=lambda: None, actors=None, gpus_per_actor=0.0)
    pipe = SimpleNamespace(classify_modes=("av",), manifest=SimpleNamespace(preprocess=None), labels=None)
    writer = SimpleNamespace(path=None, done=set(), close=lambda: None)
    emitted = []
    failed = ray_run.classify(settings, files=["a.mp4"], pipe=pipe, spec=None, mode="av", window=window,
                              hop=window, offset=0.0, writer=writer, emit=emitted.append)
    assert failed == [] and len(emitted) == 3
    assert f"classify: 3 {unit}" in capsys.readouterr().err


@pytest.mark.parametrize(("failed", "total", "already_done", "says"), [
    (1, 5, 4, "1 of 5 inputs failed; 4 done already (skipped)"),
    (1, 5, 2, "1 of 5 inputs failed; 2 classified, 2 done already (skipped)"),
    (1, 3, 0, "1 of 3 inputs failed; the others were classified"),
    (1, 3, None, "1 of 3 inputs failed; the others were classified or done already"),
    (2, 2, 0, "2 of 2 inputs failed"),
])
def test_the_report_says_what_became_of_the_others(capsys, failed, total, already_done, says):
    with click.Context(click.Command("classify")), pytest.raises(click.exceptions.Exit) as stop:
        ray_run.finish([(f"f{i}.mp4", "bad") for i in range(failed)], total, already_done)
    assert stop.value.exit_code == 2
    assert capsys.readouterr().err == says + "\n"
