"""``cavmae classify`` in process: its option values and its SIGTERM handler (no model runs)."""

from __future__ import annotations

import os
import signal

import pytest
from click.testing import CliRunner

from cavmae.cli.classify_cmd import _sigterm_stops_the_run, _Terminated
from cavmae.cli.main import cli
from cavmae.errors import CavmaeError
from cavmae.runtime.classify_records import clip_starts, min_window


@pytest.mark.parametrize(("args", "says"), [
    (["--window", "nan"], "'--window': nan is not a finite number"),
    (["--window", "inf"], "'--window': inf is not a finite number"),
    (["--window", "4", "--hop", "nan"], "'--hop': nan is not a finite number"),
    (["--window", "4", "--hop", "inf"], "'--hop': inf is not a finite number"),
    (["--offset", "nan"], "'--offset': nan is not a finite number"),
    (["--window", "0.01"], "0.01 s is shorter than one audio frame (at least 0.025 s)"),
    (["--window", "11"], "'--window'"),
    (["--window", "4", "--hop", "0"], "'--hop'"),
    (["--window", "4", "--hop", "1e-300"], "shorter than the audio frame shift (at least 0.01 s)"),  # endless windows
])
def test_bad_seconds_are_one_usage_line(args, says, tmp_path):
    """Refused while parsing, before the model loads (a missing model file is never looked at)."""
    res = CliRunner().invoke(cli, ["classify", "x.mp4", "-m", str(tmp_path / "none.pth"), *args])
    assert res.exit_code == 2 and says in res.output, res.output
    assert res.output.startswith("Error: ") and res.output.count("\n") == 1


def test_the_shortest_window_is_one_audio_frame():
    assert min_window() == 0.025
    assert clip_starts(0.0, min_window(), None, 0.1)[:2] == [0.0, 0.0125]  # accepted
    for window, hop in ((0.01, None), (float("nan"), None), (4.0, float("inf")), (4.0, float("nan")), (4.0, -1.0),
                        (4.0, 1e-300)):
        with pytest.raises(CavmaeError):
            clip_starts(0.0, window, hop, 10.0)


def test_sigterm_stops_the_run_and_the_handler_is_restored():
    def before(signum, frame):
        raise AssertionError("the run's handler should be in place")

    previous = signal.signal(signal.SIGTERM, before)
    try:
        with pytest.raises(_Terminated), _sigterm_stops_the_run():
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the next statement
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_json_keeps_a_file_name_that_is_not_utf8(capsys):
    """Such a name reaches JSON output as escapes that read back to it, not as replacement marks."""
    import json

    from cavmae.cli.common import echo_json

    odd = os.fsdecode(b"caf\xe9.mp4")
    echo_json({"path": odd, "label": "café"})
    out = capsys.readouterr().out
    assert out.isascii() and json.loads(out) == {"path": odd, "label": "café"}
