"""Result files of ``-o`` (cavmae.cli.results): format by ending, refusals, resume keys, atomic .json."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from cavmae.cli.results import ResultWriter, result_format, result_key, stored_path
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


def test_csv_rows_append_under_one_header(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "r.csv"
    for path in ("a.mp4", "b.mp4"):
        with ResultWriter(out, COLUMNS) as w:
            w.write(*_rec(path))
    rows = list(csv.reader(out.open()))
    assert rows[0] == COLUMNS and [r[0] for r in rows[1:]] == [str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4")]


@pytest.mark.parametrize("name", ["r.csv", "r.jsonl", "r.json"])
def test_resume_does_not_depend_on_the_current_folder(name, tmp_path, monkeypatch):
    """Two folders each with an ``a.mp4``: the file written from one must not count the other's
    as done, and the same file named from elsewhere is done."""
    (tmp_path / "A").mkdir()
    (tmp_path / "B").mkdir()
    out = tmp_path / name
    monkeypatch.chdir(tmp_path / "A")
    with ResultWriter(out, COLUMNS) as w:
        w.write(*_rec("a.mp4"))
    monkeypatch.chdir(tmp_path / "B")
    again = ResultWriter(out, COLUMNS)
    assert not again.is_done({"path": "a.mp4", "mode": "av", "start": 0.0})
    assert again.is_done({"path": "../A/a.mp4", "mode": "av", "start": 0.0})
    again.close()


def test_stored_path_is_absolute_and_keeps_links(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.mp4").write_bytes(b"")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert stored_path("real/a.mp4") == str(tmp_path / "real" / "a.mp4")
    assert stored_path("link/../real/a.mp4") == str(tmp_path / "real" / "a.mp4")  # folded: same file
    assert stored_path("link/a.mp4") == str(tmp_path / "link" / "a.mp4")  # the link's own name
    (tmp_path / "real" / "sub").mkdir()
    (tmp_path / "sub").symlink_to(tmp_path / "real" / "sub")
    # sub/.. is real/, not tmp_path: folding would name another file, so it stays unfolded
    assert Path(stored_path("sub/../a.mp4")).resolve() == (tmp_path / "real" / "a.mp4").resolve()
    assert stored_path("s3://bucket/a.mp4") == "s3://bucket/a.mp4"


def test_a_file_of_an_older_version_with_relative_paths_still_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "r.jsonl"
    out.write_text(json.dumps(_rec("a.mp4")[0]) + "\n")  # the path as typed, as cavmae wrote it then
    w = ResultWriter(out, COLUMNS)
    assert w.is_done({"path": str(tmp_path / "a.mp4"), "mode": "av", "start": 0.0})
    assert "older cavmae" in capsys.readouterr().err
    w.close()


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
    assert [Path(json.loads(line)["path"]).name for line in lines] == ["a.mp4", "b.mp4"]


def _csv_file(path: Path, rows_per_result: int, names: list[str]) -> bytes:
    """A CSV result file of ``names``, each result ``rows_per_result`` rows (ranks)."""
    with ResultWriter(path, COLUMNS) as w:
        for name in names:
            record, _ = _rec(name)
            w.write(record, [[name, "av", 0.0, 10.0, f"label {r}"] for r in range(rows_per_result)])
    return path.read_bytes()


def _labels_of(path: Path) -> list[tuple[str, str]]:
    return [(Path(r["path"]).name, r["label"]) for r in csv.DictReader(path.open(newline=""))]


def test_a_csv_result_cut_mid_way_is_redone_whole(tmp_path, capsys):
    """A kill inside a result's rows leaves its first rows: the result is not done, its rows are
    cut off at the next append, and the re-run writes it whole (no row twice, none missing)."""
    out = tmp_path / "r.csv"
    data = _csv_file(out, 2, ["a.mp4", "b.mp4"])
    out.write_bytes(data[:-5])  # b's second row cut mid-line; its first row is whole
    w = ResultWriter(out, COLUMNS)
    w.expect_csv_rows(2)
    assert w.is_done(_rec("a.mp4")[0]) and not w.is_done(_rec("b.mp4")[0])
    assert out.read_bytes() == data[:-5]  # nothing is cut before a result follows
    w.write(_rec("b.mp4")[0], [["b.mp4", "av", 0.0, 10.0, f"label {r}"] for r in range(2)])
    w.close()
    assert _labels_of(out) == [("a.mp4", "label 0"), ("a.mp4", "label 1"), ("b.mp4", "label 0"), ("b.mp4", "label 1")]
    assert "incomplete last line" in capsys.readouterr().err


def test_a_csv_result_cut_at_a_row_end_is_redone(tmp_path, capsys):
    """Cut right after a whole row there is no broken line to see: the row count tells."""
    out = tmp_path / "r.csv"
    data = _csv_file(out, 3, ["a.mp4", "b.mp4"])
    last_row = data.rstrip(b"\r\n").rfind(b"\n") + 1
    out.write_bytes(data[:last_row])  # b has 2 of its 3 rows
    w = ResultWriter(out, COLUMNS)
    assert w.is_done(_rec("b.mp4")[0])  # without the count, the rows look whole
    w.expect_csv_rows(3)
    assert not w.is_done(_rec("b.mp4")[0]) and w.is_done(_rec("a.mp4")[0])
    w.write(_rec("b.mp4")[0], [["b.mp4", "av", 0.0, 10.0, f"label {r}"] for r in range(3)])
    w.close()
    assert [name for name, _ in _labels_of(out)] == ["a.mp4"] * 3 + ["b.mp4"] * 3
    assert "2 of its 3 rows" in capsys.readouterr().err


def test_a_cut_line_that_began_the_next_result_keeps_the_last_whole_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "r.csv"
    data = _csv_file(out, 2, ["a.mp4", "b.mp4"])
    b_path = str(tmp_path / "b.mp4").encode()
    out.write_bytes(data[:data.index(b_path) + len(b_path) + 12])  # b's path, mode, start, and a bit
    w = ResultWriter(out, COLUMNS)
    w.expect_csv_rows(2)
    assert w.is_done(_rec("a.mp4")[0]) and not w.is_done(_rec("b.mp4")[0])
    w.write(_rec("b.mp4")[0], [["b.mp4", "av", 0.0, 10.0, f"label {r}"] for r in range(2)])
    w.close()
    assert [name for name, _ in _labels_of(out)] == ["a.mp4"] * 2 + ["b.mp4"] * 2


def test_a_refused_or_idle_run_leaves_a_cut_file_as_it_was(tmp_path):
    """The cut happens only when a result is appended: a foreign file without its last newline
    (a hand-written one) is refused untouched, and a run that writes nothing changes nothing."""
    foreign = tmp_path / "f.csv"
    foreign.write_text("name,score\nx,1")
    with pytest.raises(CavmaeError, match="columns name,score"):
        ResultWriter(foreign, COLUMNS)
    assert foreign.read_text() == "name,score\nx,1"
    notes = tmp_path / "notes.jsonl"
    notes.write_text("my notes")
    with pytest.raises(CavmaeError, match="not a JSON-lines file"):
        ResultWriter(notes, COLUMNS)
    assert notes.read_text() == "my notes"
    out = tmp_path / "r.jsonl"
    whole = json.dumps(_rec("a.mp4")[0])
    out.write_text(whole + "\n" + whole[:20])
    ResultWriter(out, COLUMNS).close()
    assert out.read_text() == whole + "\n" + whole[:20]


def test_a_file_cut_in_its_header_starts_over(tmp_path):
    out = tmp_path / "r.csv"
    out.write_text("path,mo")
    with ResultWriter(out, COLUMNS) as w:
        w.write(*_rec("a.mp4"))
    assert list(csv.reader(out.open()))[0] == COLUMNS and len(_labels_of(out)) == 1


def test_an_older_settings_value_matches_and_is_updated(tmp_path):
    out = tmp_path / "r.jsonl"
    with ResultWriter(out, COLUMNS) as w:
        w.bind_settings({"labels": "l.csv", "top_k": 5})
        w.write(*_rec("a.mp4"))
    w = ResultWriter(out, COLUMNS)
    with pytest.raises(CavmaeError, match="other settings"):
        w.bind_settings({"labels": "sha256:00", "top_k": 5})
    w.bind_settings({"labels": "sha256:00", "top_k": 5}, older={"labels": ["l.csv"]})
    assert json.loads(w.settings_path().read_text())["labels"] == "sha256:00"
    with pytest.raises(CavmaeError, match="other settings"):
        ResultWriter(out, COLUMNS).bind_settings({"labels": "sha256:11", "top_k": 5}, older={"labels": ["l.csv"]})


def test_json_file_is_rewritten_whole_and_atomically(tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    monkeypatch.setattr("cavmae.cli.results.JSON_REWRITE_INTERVAL", 0.0)
    w = ResultWriter(out, COLUMNS)
    w.write(*_rec("a.mp4"))
    # mid-run the file on disk is already a complete JSON document
    assert [Path(r["path"]).name for r in json.loads(out.read_text())] == ["a.mp4"]
    w.write(*_rec("b.mp4"))
    w.close()
    with ResultWriter(out, COLUMNS) as w2:
        w2.write(*_rec("c.mp4"))
    assert [Path(r["path"]).name for r in json.loads(out.read_text())] == ["a.mp4", "b.mp4", "c.mp4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temporaries left


def test_result_key_reads_csv_text_and_numbers_alike():
    assert result_key({"path": "a.mp4", "mode": "av", "start": "5.0"}) == result_key(
        {"path": Path("a.mp4").resolve(), "mode": "av", "start": 5}
    )


def test_shards_cannot_share_a_json_file(tmp_path):
    with pytest.raises(CavmaeError, match="shards"):
        ResultWriter(tmp_path / "r.json", COLUMNS, shared=True)
    ResultWriter(tmp_path / "r.jsonl", COLUMNS, shared=True).close()  # appended: fine


def test_settings_known_early_are_checked_alone(tmp_path):
    """``check_settings`` compares only the settings it is given (those the flags decide, before
    the model loads); the rest wait for ``bind_settings``."""
    out = tmp_path / "r.jsonl"
    with ResultWriter(out, COLUMNS) as w:
        w.bind_settings({"model": "m1", "frames": 10, "top_k": 5})
        w.write(*_rec("a.mp4"))
    w = ResultWriter(out, COLUMNS)
    w.check_settings({"top_k": 5})  # the model, not known yet, is not compared
    with pytest.raises(CavmaeError, match=r"other settings \(frames 10 -> 4\)"):
        w.check_settings({"top_k": 5, "frames": 4})
    with pytest.raises(CavmaeError, match="model 'm1' -> 'm2'"):
        w.bind_settings({"model": "m2", "frames": 10, "top_k": 5})


def test_without_its_settings_record_a_file_is_checked_by_what_its_records_show(tmp_path, capsys):
    def shows(rec):
        return {"top_k": int(rec["label"])}

    out = tmp_path / "r.csv"
    with ResultWriter(out, COLUMNS, shows=shows) as w:
        w.bind_settings({"top_k": 3})
        for k in (1, 2, 3):
            w.write({**_rec("a.mp4")[0], "label": k}, [["a.mp4", "av", 0.0, 10.0, k]])
    w.settings_path().unlink()
    with pytest.raises(CavmaeError, match=r"top_k 3 -> 2, as its results show; its settings record .* is missing"):
        ResultWriter(out, COLUMNS, shows=shows).bind_settings({"top_k": 2}, shown={"top_k": 2})
    ResultWriter(out, COLUMNS, shows=shows).bind_settings({"top_k": 3}, shown={"top_k": 3})
    assert "its results agree on top_k, but the other settings cannot be checked" in capsys.readouterr().err
