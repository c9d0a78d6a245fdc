"""Result files of ``-o`` (cavmae.cli.results): format by ending, refusals, resume keys, atomic .json."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from cavmae.cli.results import ResultWriter, result_format, result_key
from cavmae.errors import CavmaeError

COLUMNS = ["path", "mode", "start", "end", "label"]


def _rec(path: str, mode: str = "av", start: float = 0.0) -> tuple[dict, list[list]]:
    record = {"path": path, "mode": mode, "start": start, "end": start + 10, "label": "Speech"}
    return record, [[path, mode, start, start + 10, "Speech"]]


@pytest.mark.parametrize(("name", "flag", "fmt"), [
    ("r.csv", None, "csv"), ("r.CSV", "csv", "csv"), ("r.jsonl", None, "jsonl"), ("r.ndjson", "json", "jsonl"),
    ("r.json", None, "json"), ("r.json", "json", "json"),
])
def test_format_follows_the_ending(name, flag, fmt):
    assert result_format(Path(name), flag) == fmt


@pytest.mark.parametrize(("name", "flag", "says"), [
    ("r.jsonl", "csv", "--csv"), ("r.json", "csv", "--csv"), ("r.csv", "json", "--json"),
    ("r.txt", None, ".txt"), ("results", None, "without an ending"),
])
def test_mismatch_or_unknown_ending_is_refused_in_one_line(name, flag, says, tmp_path):
    with pytest.raises(CavmaeError) as e:
        ResultWriter(tmp_path / name, COLUMNS, requested=flag)
    assert says in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / name).exists()


def test_nothing_is_created_before_the_first_result(tmp_path):
    ResultWriter(tmp_path / "r.csv", COLUMNS).close()
    ResultWriter(tmp_path / "r.json", COLUMNS).close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["r.csv", "r.jsonl", "r.json"])
def test_resume_is_keyed_on_resolved_path_and_mode(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / name
    with ResultWriter(out, COLUMNS) as w:
        w.write(*_rec("a.mp4", "av", 0.0))
        w.write(*_rec("a.mp4", "av", 5.0))
    again = ResultWriter(out, COLUMNS)
    assert again.is_done({"path": str(tmp_path / "a.mp4"), "mode": "av", "start": 5})
    assert again.is_done({"path": Path("./a.mp4"), "mode": "av", "start": 0.0})
    assert not again.is_done({"path": "a.mp4", "mode": "audio", "start": 0.0})
    assert not again.is_done({"path": "b.mp4", "mode": "av", "start": 0.0})
    again.write(*_rec("a.mp4", "audio", 0.0))
    again.close()
    assert ResultWriter(out, COLUMNS).is_done({"path": "a.mp4", "mode": "audio", "start": 0.0})


def test_csv_rows_append_under_one_header(tmp_path):
    out = tmp_path / "r.csv"
    for path in ("a.mp4", "b.mp4"):
        with ResultWriter(out, COLUMNS) as w:
            w.write(*_rec(path))
    rows = list(csv.reader(out.open()))
    assert rows[0] == COLUMNS and [r[0] for r in rows[1:]] == ["a.mp4", "b.mp4"]


def test_a_foreign_file_is_refused_and_left_alone(tmp_path):
    other = tmp_path / "r.csv"
    other.write_text("name,score\nx,1\n")
    with pytest.raises(CavmaeError, match="columns name,score"):
        ResultWriter(other, COLUMNS)
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text("path,mode,start\na.mp4,av,0\n")  # CSV under a .jsonl name
    with pytest.raises(CavmaeError, match="not a JSON-lines file"):
        ResultWriter(jsonl, COLUMNS)
    old = tmp_path / "old.jsonl"
    old.write_text(json.dumps({"path": "a.mp4", "start": 0.0}) + "\n")  # no mode: an older cavmae
    with pytest.raises(CavmaeError, match="older"):
        ResultWriter(old, COLUMNS)
    broken = tmp_path / "r.json"
    broken.write_text('[{"path": "a.mp4"')
    with pytest.raises(CavmaeError, match="not a JSON file"):
        ResultWriter(broken, COLUMNS)
    assert other.read_text() == "name,score\nx,1\n" and broken.read_text() == '[{"path": "a.mp4"'


def test_a_line_cut_by_a_kill_is_dropped_and_redone(tmp_path):
    out = tmp_path / "r.jsonl"
    whole = json.dumps(_rec("a.mp4")[0])
    out.write_text(whole + "\n" + whole[:20])
    w = ResultWriter(out, COLUMNS)
    assert w.is_done(_rec("a.mp4")[0])
    w.write(*_rec("b.mp4"))
    w.close()
    lines = out.read_text().splitlines()
    assert [json.loads(line)["path"] for line in lines] == ["a.mp4", "b.mp4"]


def test_json_file_is_rewritten_whole_and_atomically(tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    monkeypatch.setattr("cavmae.cli.results.JSON_REWRITE_INTERVAL", 0.0)
    w = ResultWriter(out, COLUMNS)
    w.write(*_rec("a.mp4"))
    # mid-run the file on disk is already a complete JSON document
    assert [r["path"] for r in json.loads(out.read_text())] == ["a.mp4"]
    w.write(*_rec("b.mp4"))
    w.close()
    with ResultWriter(out, COLUMNS) as w2:
        w2.write(*_rec("c.mp4"))
    assert [r["path"] for r in json.loads(out.read_text())] == ["a.mp4", "b.mp4", "c.mp4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temporaries left


def test_result_key_reads_csv_text_and_numbers_alike():
    assert result_key({"path": "a.mp4", "mode": "av", "start": "5.0"}) == result_key(
        {"path": Path("a.mp4").resolve(), "mode": "av", "start": 5}
    )


def test_shards_cannot_share_a_json_file(tmp_path):
    with pytest.raises(CavmaeError, match="shards"):
        ResultWriter(tmp_path / "r.json", COLUMNS, shared=True)
    ResultWriter(tmp_path / "r.jsonl", COLUMNS, shared=True).close()  # appended: fine
