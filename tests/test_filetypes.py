"""Media file endings: one list (cavmae.filetypes) for the CLI's folder search and prepare's."""

from __future__ import annotations

from pathlib import Path

import pytest

from cavmae.cli.common import expand_inputs
from cavmae.filetypes import AUDIO_SUFFIXES, MEDIA_SUFFIXES, VIDEO_SUFFIXES, is_media_file
from cavmae.prepare import _collect


def test_one_list_video_within_media() -> None:
    assert set(VIDEO_SUFFIXES) | set(AUDIO_SUFFIXES) == set(MEDIA_SUFFIXES)
    assert all(s.startswith(".") and s == s.lower() for s in MEDIA_SUFFIXES)
    assert is_media_file("CLIP.MP4") and is_media_file("a.b.webm") and not is_media_file("notes.txt")


def test_folder_searches_take_their_endings_from_the_one_list(tmp_path: Path) -> None:
    names = [f"v{k}{s}" for k, s in enumerate(MEDIA_SUFFIXES)] + ["UPPER.MKV", "notes.txt", "cover.jpg"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    found = {p.name for p in expand_inputs([str(tmp_path)])}
    assert found == {n for n in names if is_media_file(n)}  # every media ending, any case
    videos = {Path(c.video or "").name for c in _collect([tmp_path], None)}
    assert videos == {n for n in names if is_media_file(n, VIDEO_SUFFIXES)}  # video only
    assert "v0.mp4" in videos and not any(n.endswith(AUDIO_SUFFIXES) for n in videos)


def test_a_named_pipe_is_named_as_not_a_file(tmp_path):
    import os

    from cavmae.errors import CavmaeError
    from cavmae.filetypes import expand_inputs

    os.mkfifo(tmp_path / "p.mp4")
    with pytest.raises(CavmaeError, match="not a regular file"):
        expand_inputs([str(tmp_path / "p.mp4")])


def test_a_named_pipe_inside_a_folder_is_skipped_with_a_warning(tmp_path, caplog):
    import os

    from cavmae.filetypes import expand_inputs

    (tmp_path / "a.mp4").write_bytes(b"x")
    os.mkfifo(tmp_path / "p.mp4")
    (tmp_path / "gone.mp4").symlink_to(tmp_path / "nowhere.mp4")
    with caplog.at_level("WARNING"):
        assert expand_inputs([str(tmp_path)]) == [str(tmp_path / "a.mp4")]
    assert "skipped 2 entries with a media name that are no regular file" in caplog.text


def test_a_list_with_a_byte_order_mark_and_a_name_that_is_not_utf8(tmp_path):
    import os

    from cavmae.filetypes import expand_inputs as expand

    odd = os.fsdecode(b"caf\xe9.mp4")
    (tmp_path / "a.mp4").write_bytes(b"x")
    (tmp_path / "list.txt").write_bytes(b"\xef\xbb\xbfa.mp4\ncaf\xe9.mp4\n")
    assert expand([str(tmp_path / "list.txt")], path_lists=True) == [str(tmp_path / "a.mp4"), str(tmp_path / odd)]
