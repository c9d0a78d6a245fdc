"""``cavmae prepare``: videos -> the reference layout, bad files skipped, resumable, parallel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import wave

import numpy as np
import pytest
from click.testing import CliRunner

from cavmae import fsio
from cavmae.cli.main import cli
from cavmae.data import AVDataset, read_clips, read_wav, read_weights
from cavmae.errors import CavmaeError
from cavmae.media import decode_audio, decode_frames
from cavmae.prepare import prepare_videos
from cavmae.visual import load_image, resize_center_crop
from media_factory import dominant_frequency, frame_index_of, make_media, make_text_file


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    src = tmp_path_factory.mktemp("videos")
    good = make_media(src / "good.mp4", duration=2.0, fps=10, channels=2, tones=(440.0, 1000.0), size=(96, 64))
    (src / "sub").mkdir()
    other = make_media(src / "sub" / "other.mkv", duration=1.5, fps=8, tones=(700.0,), audio_rate=44100)
    silent = make_media(src / "silent.mp4", with_audio=False)
    broken = make_text_file(src / "broken.mp4")
    return src, good, other, silent, broken


def test_prepare_layout_failures_and_resume(videos, tmp_path):
    src, good, other, silent, broken = videos
    out = tmp_path / "out"
    report = prepare_videos([good, other, silent, broken], out, progress=False)
    assert (report.extracted, report.skipped, len(report.failed)) == (2, 0, 2)
    failed = dict(report.failed)
    assert "audio" in failed[str(silent)].lower()
    assert str(broken) in failed
    assert (out / "failed.txt").read_text().count("\n") == 2

    data = json.loads((out / "data.json").read_text())["data"]
    assert [d["video_id"] for d in data] == ["good", "other"]
    entry = data[0]
    assert entry["wav"] == str(out / "audio" / "good.wav") and entry["video_path"] == str(out / "frames")
    with wave.open(entry["wav"]) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
    wav = read_wav(entry["wav"])
    assert dominant_frequency(wav, 16000) == pytest.approx(440.0, abs=5)  # the first channel
    np.testing.assert_allclose(wav, decode_audio(good), atol=1.5 / 32768)
    assert dominant_frequency(read_wav(data[1]["wav"]), 16000) == pytest.approx(700.0, abs=5)

    # frames: 224 x 224 JPEGs of the reference positions, resized and centre-cropped
    rgb, _ = decode_frames(good, 10)
    for i in range(10):
        img = load_image(out / "frames" / f"frame_{i}" / "good.jpg")
        assert img.shape == (224, 224, 3)
        assert frame_index_of(img) == frame_index_of(rgb[i])
        assert np.abs(img.astype(float) - resize_center_crop(rgb[i], 224)).mean() < 3

    # the dataset loader reads the result
    clips = read_clips(out / "data.json")
    item = AVDataset(clips)[0]
    assert item["audio"].shape == (1024, 128) and item["image"].shape == (3, 224, 224)

    # resume: complete clips are skipped; a clip with a missing file is redone
    (out / "frames" / "frame_3" / "other.jpg").unlink()
    again = prepare_videos([good, other, silent, broken], out, progress=False)
    assert (again.extracted, again.skipped, len(again.failed)) == (1, 1, 2)
    assert (out / "frames" / "frame_3" / "other.jpg").is_file()
    assert not list(out.rglob("*.tmp"))
    # a video replaced since it was extracted (newer than its outputs) is extracted again
    later = (out / "audio" / "good.wav").stat().st_mtime_ns + 10**9
    os.utime(good, ns=(later, later))
    again = prepare_videos([good, other], out, progress=False)
    assert (again.extracted, again.skipped) == (1, 1)
    # the dataset JSON's name is a file name inside the output folder
    for bad in ("", "../escape.json", "data.txt"):
        with pytest.raises(CavmaeError, match="file name ending in .json"):
            prepare_videos([good], out, json_name=bad, progress=False)


def test_prepare_list_labels_relative_parallel(videos, tmp_path):
    src, good, other, _, _ = videos
    (tmp_path / "list.csv").write_text(f'video,labels\n{good},"/m/a,/m/b"\n{other},/m/c\n')
    (tmp_path / "labels.csv").write_text("index,mid,display_name\n0,/m/a,A\n1,/m/b,B\n2,/m/c,C\n")
    out = tmp_path / "out"
    seen = []
    report = prepare_videos(list_file=tmp_path / "list.csv", output_dir=out, jobs=2, relative_paths=True,
                            json_name="train.json", progress=False, label_csv=tmp_path / "labels.csv",
                            on_clip=lambda v, s: seen.append(s))
    # class-balanced weights: each class has one clip (weight 1000 / 1.01); clip 0 has two classes
    assert report.weight_csv == out / "train_weight.csv"
    weights = read_weights(report.weight_csv, 2)
    np.testing.assert_allclose(weights, [2000 / 1.01, 1000 / 1.01], rtol=1e-5)
    assert sorted(seen) == ["extracted", "extracted"] and not report.failed
    data = json.loads((out / "train.json").read_text())["data"]
    assert data[0]["labels"] == "/m/a,/m/b" and data[0]["wav"] == "audio/good.wav"
    assert data[1]["video_path"] == "frames"
    # a misnamed labels column, or weights without labels, are refused before any extraction
    (tmp_path / "tags.csv").write_text(f"file,tags\n{good},/m/a\n")
    with pytest.raises(CavmaeError, match="unknown column.*tags"):
        prepare_videos(list_file=tmp_path / "tags.csv", output_dir=tmp_path / "o2", progress=False)
    with pytest.raises(CavmaeError, match="need labelled clips"):
        prepare_videos([good], tmp_path / "o3", progress=False, label_csv=tmp_path / "labels.csv")
    clips = read_clips(out / "train.json")
    assert clips[0].wav == str(out / "audio" / "good.wav")


def test_prepare_folder_and_duplicate_names(videos, tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    make_media(src / "a" / "clip.mp4", duration=1.0)
    make_media(src / "b" / "clip.mp4", duration=1.0)
    report = prepare_videos([src], tmp_path / "out", progress=False)
    ids = [c.video_id for c in report.clips]
    assert len(ids) == 2 and len(set(ids)) == 2 and all(i.startswith("clip-") for i in ids)


def test_prepare_cli(videos, tmp_path):
    src, good, _, silent, _ = videos
    runner = CliRunner()
    res = runner.invoke(cli, ["prepare", str(good), str(silent), "-o", str(tmp_path / "o"), "--no-progress"])
    assert res.exit_code == 2, res.output  # an input failed: the batch exit code, the rest prepared
    assert "1 clips" in res.output and "1 failed" in res.output
    res = runner.invoke(cli, ["prepare", str(silent), "-o", str(tmp_path / "o2"), "--no-progress"])
    assert res.exit_code == 2 and "no video could be prepared" in res.output


def test_prepare_reports_each_failure_once(videos, tmp_path):
    """A failed file is named once on stderr, as a ``warning:`` line like the other commands'."""
    _, good, _, _, broken = videos
    env = {**os.environ, "CAVMAE_NO_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, "-m", "cavmae.cli", "prepare", str(good), str(broken),
                           "-o", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count(str(broken)) == 1, proc.stderr
    assert f"warning: skipped {broken}: not a readable" in proc.stderr
    assert "1 of 2 inputs failed" in proc.stderr


def _tone(wav) -> float:
    return dominant_frequency(read_wav(wav), 16000)


def test_prepare_same_name_from_another_video_gets_its_own_id(tmp_path):
    """Two runs into one folder, two different videos named clip.mp4: neither is served the
    other's extraction, and a list's labels stay with their own video."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = make_media(tmp_path / "a" / "clip.mp4", duration=1.0, tones=(440.0,))
    b = make_media(tmp_path / "b" / "clip.mp4", duration=1.0, tones=(1000.0,))
    out = tmp_path / "out"
    (tmp_path / "la.csv").write_text(f"video,labels\n{a},/m/a\n")
    (tmp_path / "lb.csv").write_text(f"video,labels\n{b},/m/b\n")
    first = prepare_videos(list_file=tmp_path / "la.csv", output_dir=out, progress=False)
    res = CliRunner().invoke(cli, ["prepare", "--list", str(tmp_path / "lb.csv"), "-o", str(out),
                                   "--no-progress", "--json"])
    assert res.exit_code == 0, res.output
    second = json.loads(res.stdout)
    assert (second["extracted"], second["skipped"], second["kept"], second["clips"]) == (1, 0, 1, 2)
    [renamed] = second["renamed"]
    b_id = renamed["video_id"]
    assert renamed["video"] == str(b) and b_id.startswith("clip-")
    data = {d["video_id"]: d for d in json.loads((out / "data.json").read_text())["data"]}
    assert set(data) == {"clip", b_id} and first.clips[0].video_id == "clip"
    assert _tone(data["clip"]["wav"]) == pytest.approx(440.0, abs=5) and data["clip"]["labels"] == "/m/a"
    assert _tone(data[b_id]["wav"]) == pytest.approx(1000.0, abs=5) and data[b_id]["labels"] == "/m/b"
    # later runs find each video's id again: nothing re-extracted, renamed or duplicated
    again = prepare_videos([tmp_path / "a", tmp_path / "b"], out, progress=False)
    assert (again.extracted, again.skipped, again.renamed) == (0, 2, [])
    assert sorted(c.video_id for c in again.clips) == sorted(["clip", b_id])
    # the same path with other content, even with an older mtime (cp -p), is extracted again
    old = a.stat().st_mtime_ns - 10**10
    a.write_bytes(b.read_bytes())
    os.utime(a, ns=(old, old))
    redo = prepare_videos([a], out, progress=False)
    assert (redo.extracted, redo.skipped) == (1, 0)
    assert _tone(out / "audio" / "clip.wav") == pytest.approx(1000.0, abs=5)
    # outputs the record does not vouch for (an older version's folder) are not trusted
    (out / ".prepare-sources.json").unlink()
    assert prepare_videos([a], out, progress=False).extracted == 1
    # one run at a time per folder: two would each rewrite the JSON without the other's clips
    with fsio.exclusive_lock(out / ".prepare.lock"), pytest.raises(CavmaeError, match="another cavmae prepare"):
        prepare_videos([a], out, progress=False)


def test_prepare_interrupted_run_resumes(videos, tmp_path):
    """The record of what was extracted is saved when a run is interrupted, so a re-run skips it."""
    _, good, other, _, _ = videos
    out = tmp_path / "out"

    def stop(video, status):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare_videos([good, other], out, progress=False, on_clip=stop)
    again = prepare_videos([good, other], out, progress=False)
    assert (again.extracted, again.skipped) == (1, 1)


def test_prepare_rerun_adds_to_the_dataset_and_keeps_weights_aligned(videos, tmp_path):
    src, good, other, _, broken = videos
    third = make_media(tmp_path / "third.mp4", duration=1.0, tones=(300.0,))
    (tmp_path / "labels.csv").write_text("index,mid,display_name\n0,/m/a,A\n1,/m/b,B\n")
    (tmp_path / "l1.csv").write_text(f"video,labels\n{good},/m/a\n{other},/m/a\n")
    (tmp_path / "l2.csv").write_text(f"video,labels\n{third},/m/b\n{broken},/m/b\n")
    out = tmp_path / "out"
    prepare_videos(list_file=tmp_path / "l1.csv", output_dir=out, progress=False,
                   label_csv=tmp_path / "labels.csv")
    # a second run adds its clips (a failed one adds nothing) and keeps the first run's
    rep = prepare_videos(list_file=tmp_path / "l2.csv", output_dir=out, progress=False,
                         label_csv=tmp_path / "labels.csv", relative_paths=True)
    assert (rep.extracted, rep.kept, len(rep.failed)) == (1, 2, 1)
    data = json.loads((out / "data.json").read_text())["data"]
    assert [d["video_id"] for d in data] == ["good", "other", "third"]
    assert [d["labels"] for d in data] == ["/m/a", "/m/a", "/m/b"]
    assert data[0]["wav"] == "audio/good.wav"  # kept entries follow this run's path style
    np.testing.assert_allclose(read_weights(out / "data_weight.csv", 3),
                               [1000 / 2.01, 1000 / 2.01, 1000 / 1.01], rtol=1e-5)
    assert len(AVDataset(read_clips(out / "data.json"))) == 3
    # relabelling a clip replaces its entry in place, weights follow
    (tmp_path / "l3.csv").write_text(f"video,labels\n{other},/m/b\n")
    prepare_videos(list_file=tmp_path / "l3.csv", output_dir=out, progress=False,
                   label_csv=tmp_path / "labels.csv")
    data = json.loads((out / "data.json").read_text())["data"]
    assert [(d["video_id"], d["labels"]) for d in data] == [("good", "/m/a"), ("other", "/m/b"), ("third", "/m/b")]
    np.testing.assert_allclose(read_weights(out / "data_weight.csv", 3),
                               [1000 / 1.01, 1000 / 2.01, 1000 / 2.01], rtol=1e-5)
    # without --label-csv: a run that leaves the list as it is may; one that changes it is refused
    # before extracting anything, rather than leave the weights misaligned
    before = (out / "data.json").read_bytes(), (out / "data_weight.csv").read_bytes()
    assert prepare_videos([good], out, progress=False).skipped == 1
    fresh = make_media(tmp_path / "fresh.mp4", duration=1.0)
    with pytest.raises(CavmaeError, match="data_weight.csv.*--label-csv"):
        prepare_videos([fresh], out, progress=False)
    assert not (out / "audio" / "fresh.wav").exists()
    assert ((out / "data.json").read_bytes(), (out / "data_weight.csv").read_bytes()) == before
    # a dataset JSON that is not one prepare can add to is refused, not overwritten
    (out / "other.json").write_text("{not json")
    with pytest.raises(CavmaeError, match="other.json.*another --json-name"):
        prepare_videos([fresh], out, json_name="other.json", progress=False)
    assert (out / "other.json").read_text() == "{not json"


def test_prepare_checks_labels_before_extracting(videos, tmp_path):
    _, good, other, _, _ = videos
    (tmp_path / "labels.csv").write_text("index,mid,display_name\n0,/m/a,A\n")
    (tmp_path / "list.csv").write_text(f"video,labels\n{good},/m/a\n{other},/m/zz\n")
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["prepare", "--list", str(tmp_path / "list.csv"), "--label-csv",
                                   str(tmp_path / "labels.csv"), "-o", str(out), "--no-progress"])
    assert res.exit_code == 2, res.output
    assert "'/m/zz'" in res.output and "line 3" in res.output and "Traceback" not in res.output
    assert not list(out.rglob("*.wav")) and not (out / "data.json").exists()


def test_prepare_refuses_ids_that_leave_the_folder_and_warns_of_unlabelled_clips(videos, tmp_path, caplog):
    import logging

    _, good, other, _, _ = videos
    (tmp_path / "list.json").write_text(json.dumps({"data": [{"video_id": "../../evil", "video": str(good)}]}))
    with pytest.raises(CavmaeError, match=r"video_id '\.\./\.\./evil' .* must be a plain name"):
        prepare_videos(list_file=tmp_path / "list.json", output_dir=tmp_path / "out", progress=False)
    assert not list(tmp_path.rglob("evil*")) and not list((tmp_path / "out").rglob("*.wav"))
    (tmp_path / "labels.csv").write_text("index,mid,display_name\n0,/m/a,A\n")
    (tmp_path / "list.csv").write_text(f"video,labels\n{good},/m/a\n{other},\n")
    with caplog.at_level(logging.WARNING, logger="cavmae.prepare"):
        report = prepare_videos(list_file=tmp_path / "list.csv", output_dir=tmp_path / "o2", progress=False,
                                label_csv=tmp_path / "labels.csv")
    assert report.weight_csv is not None and "1 clip(s) have no labels" in caplog.text


def test_prepare_a_moved_video_keeps_its_id_labels_and_files(videos, tmp_path):
    import shutil

    _, good, _, _, _ = videos
    (tmp_path / "a").mkdir()
    first = shutil.copy2(good, tmp_path / "a" / "clip.mp4")
    (tmp_path / "list.csv").write_text(f"video,labels\n{first},/m/a\n")
    out = tmp_path / "out"
    prepare_videos(list_file=tmp_path / "list.csv", output_dir=out, progress=False)
    (tmp_path / "b").mkdir()
    moved = tmp_path / "b" / "clip.mp4"
    os.rename(first, moved)  # as mv does: same name, size and mtime
    report = prepare_videos([moved], out, progress=False)
    assert (report.extracted, report.skipped, report.renamed) == (0, 1, [])
    assert [(c.video_id, c.labels) for c in report.clips] == [("clip", ("/m/a",))]
