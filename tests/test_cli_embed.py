"""``cavmae embed`` / ``cavmae search`` through the real console script, on a tiny classifier.

The checkpoint is exported once into a temporary ``$CAVMAE_HOME`` by the module fixture; every
command then runs ``cavmae ... --model ft.pth --engine ort --device cpu`` in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cavmae import CAVMAEFT, TINY, save_checkpoint
from cavmae.media import decode_frames, load_clip
from cavmae.runtime import load
from cavmae.runtime.index import EmbeddingIndex, path_key
from conftest import AUDIOSET_CLIP, VGGSOUND_CLIP
from media_factory import make_media, make_text_file


def _console_script() -> str:
    beside = Path(sys.executable).with_name("cavmae")
    found = str(beside) if beside.is_file() else shutil.which("cavmae")
    if not found:
        pytest.skip("the cavmae console script is not installed")
    return found


CAVMAE = _console_script()


@pytest.fixture(scope="module")
def env(tmp_path_factory, sample_clips):
    """Checkpoint, media, cache: ``(ckpt, env vars, pipeline, work dir)``."""
    tmp = tmp_path_factory.mktemp("cli-embed")
    torch.manual_seed(0)
    ckpt = save_checkpoint(CAVMAEFT(TINY).eval(), tmp / "ft.pth")
    torch.manual_seed(1)
    save_checkpoint(CAVMAEFT(TINY).eval(), tmp / "other.pth")
    variables = {**os.environ, "CAVMAE_HOME": str(tmp / "home"), "CAVMAE_NO_PROGRESS": "1"}
    variables.pop("CAVMAE_MODEL", None)
    old = os.environ.get("CAVMAE_HOME")
    os.environ["CAVMAE_HOME"] = variables["CAVMAE_HOME"]
    try:  # export once into the cache the commands use
        pipe = load(ckpt, engine="ort", device="cpu")
    finally:
        if old is None:
            os.environ.pop("CAVMAE_HOME")
        else:
            os.environ["CAVMAE_HOME"] = old
    good = tmp / "good"
    good.mkdir()
    make_media(good / "tone.mp4", duration=2.0, tones=(440.0,))
    make_media(good / "silent-video.mp4", duration=1.5, with_audio=False, size=(48, 64))
    make_media(good / "sound.wav", duration=1.0, with_video=False, audio_codec="pcm_s16le", tones=(1000.0,))
    mixed = tmp / "mixed"
    shutil.copytree(good, mixed)
    make_text_file(mixed / "broken.mp4")
    return ckpt, variables, pipe, tmp


def cavmae(env, *args: str, model: bool = True) -> subprocess.CompletedProcess:
    ckpt, variables, _, tmp = env
    extra = ["--model", str(ckpt), "--engine", "ort", "--device", "cpu"] if model else []
    return subprocess.run([CAVMAE, *args, *extra], capture_output=True, text=True, env=variables,
                          cwd=tmp, timeout=300)


@pytest.fixture(scope="module")
def built(env):
    """The mixed folder (one broken file) plus one real clip, embedded in one run."""
    tmp = env[3]
    proc = cavmae(env, "embed", str(tmp / "mixed"), str(AUDIOSET_CLIP), "-o", str(tmp / "idx"), "--json",
                  "--batch", "2", "--commit-every", "2")
    return proc, tmp / "idx"


def check_against_pipeline(index: EmbeddingIndex, pipe) -> None:
    """Every row equals ``Pipeline.embed`` of its file; missing modalities are masked."""
    audio, visual = index.embeddings("audio"), index.embeddings("visual")
    for it in index.items():
        clip = load_clip(it["path"], need_audio=it["has_audio"], need_video=it["has_video"])
        ea, ev = pipe.embed(clip.audio, clip.frames)
        r = it["row"]
        assert (ea is not None) == it["has_audio"] == bool(index.has("audio")[r])
        assert (ev is not None) == it["has_video"] == bool(index.has("visual")[r])
        if ea is not None:
            np.testing.assert_allclose(audio[r], ea, atol=2e-5, err_msg=it["path"])
        if ev is not None:
            np.testing.assert_allclose(visual[r], ev, atol=2e-5, err_msg=it["path"])


def test_help_has_examples(env):
    for cmd in ("embed", "search"):
        proc = cavmae(env, cmd, "--help", model=False)
        assert proc.returncode == 0
        assert "Example" in proc.stdout and f"cavmae {cmd}" in proc.stdout


def test_bad_file_is_skipped_reported_and_exit_nonzero(env, built):
    proc, idx = built
    assert proc.returncode == 2, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["added"] == 4 and summary["count"] == 4 and summary["skipped"] == 0
    assert [Path(f["path"]).name for f in summary["failed"]] == ["broken.mp4"]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "broken.mp4" in warnings[0]
    index = EmbeddingIndex.open(idx)
    names = {Path(it["path"]).name: it for it in index.items()}
    assert set(names) == {"tone.mp4", "silent-video.mp4", "sound.wav", AUDIOSET_CLIP.name}
    assert not names["silent-video.mp4"]["has_audio"] and not names["sound.wav"]["has_video"]
    assert index.model["ref"] == str(env[0].resolve())
    check_against_pipeline(index, env[2])


def test_incremental_run_adds_only_new_files(env, built):
    tmp = env[3]
    copy = tmp / "idx-incremental"
    shutil.copytree(built[1], copy)
    before = EmbeddingIndex.open(copy)
    rows_before = {it["path"]: it["row"] for it in before.items()}
    audio_before = np.array(before.embeddings("audio"))
    # no --model: the index's model is used; the broken file is tried (and reported) again
    proc = cavmae(env, "embed", str(tmp / "mixed"), str(AUDIOSET_CLIP), str(VGGSOUND_CLIP), "-o", str(copy),
                  "--json", model=False)
    assert proc.returncode == 2, proc.stderr
    summary = json.loads(proc.stdout)
    assert (summary["added"], summary["skipped"], summary["count"]) == (1, 4, 5)
    assert [Path(f["path"]).name for f in summary["failed"]] == ["broken.mp4"]
    after = EmbeddingIndex.open(copy)
    rows_after = {it["path"]: it["row"] for it in after.items()}
    assert {p: rows_after[p] for p in rows_before} == rows_before
    assert rows_after[path_key(VGGSOUND_CLIP)] == 4
    np.testing.assert_array_equal(after.embeddings("audio")[:4], audio_before)
    check_against_pipeline(after, env[2])


def test_a_file_changed_since_it_was_indexed_is_reported(env):
    tmp = env[3]
    folder = tmp / "changing"
    shutil.copytree(tmp / "good", folder)
    proc = cavmae(env, "embed", str(folder), "-o", str(tmp / "idx-changing"), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["changed"] == []
    items = EmbeddingIndex.open(tmp / "idx-changing").items()
    assert all(it["size"] > 0 and it["mtime_ns"] > 0 for it in items)  # each row's file stamp
    shutil.copyfile(folder / "sound.wav", folder / "tone.mp4")  # other content under a known name
    proc = cavmae(env, "embed", str(folder), "-o", str(tmp / "idx-changing"), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["skipped"] == 3 and summary["added"] == 0
    assert [Path(p).name for p in summary["changed"]] == ["tone.mp4"]
    assert "1 file(s) changed since they were indexed" in proc.stderr and "tone.mp4" in proc.stderr
    assert "cavmae index prune" in proc.stderr
    # the way out it names: prune drops the changed (and deleted) files' rows, embed redoes them
    (folder / "silent-video.mp4").unlink()
    proc = cavmae(env, "index", "prune", str(tmp / "idx-changing"), "--dry-run", model=False)
    assert proc.returncode == 0 and "would drop 2 row(s) (1 deleted, 1 changed)" in proc.stdout, proc.stderr
    proc = cavmae(env, "index", "prune", str(tmp / "idx-changing"), "--json", model=False)
    assert proc.returncode == 0, proc.stderr
    assert {k: json.loads(proc.stdout)[k] for k in ("kept", "missing", "changed")} == {"kept": 1, "missing": 1, "changed": 1}
    proc = cavmae(env, "embed", str(folder), "-o", str(tmp / "idx-changing"), "--json")
    summary = json.loads(proc.stdout)
    assert proc.returncode == 0 and (summary["added"], summary["skipped"], summary["changed"]) == (1, 1, [])
    proc = cavmae(env, "index", "prune", str(tmp / "nowhere"), model=False)
    assert proc.returncode == 2 and proc.stderr.startswith("Error: no index at"), proc.stderr


def test_other_model_is_refused(env, built):
    proc = cavmae(env, "embed", str(VGGSOUND_CLIP), "-o", str(built[1]), "--model", str(env[3] / "other.pth"),
                  "--engine", "ort", "--device", "cpu", model=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "not of" in proc.stderr and "Traceback" not in proc.stderr
    assert len(EmbeddingIndex.open(built[1])) == 4


def _search(env, idx, *args):
    proc = cavmae(env, "search", str(idx), *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _check_hits(hits, index, target, k):
    flag = "has_audio" if target == "audio" else "has_video"
    assert len(hits) == min(k, int(index.has(target).sum()))
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert all(-1.0001 <= s <= 1.0001 for s in scores)
    assert [h["rank"] for h in hits] == list(range(1, len(hits) + 1))
    assert all(h[flag] for h in hits)


def test_search_with_own_video_finds_itself(env, built):
    idx = built[1]
    out = _search(env, idx, "--video", str(AUDIOSET_CLIP), "--k", "3")
    assert [(r["query"], r["target"]) for r in out["results"]] == [("audio", "audio"), ("visual", "visual")]
    index = EmbeddingIndex.open(idx)
    for res in out["results"]:
        _check_hits(res["hits"], index, res["target"], 3)
        assert res["hits"][0]["path"] == path_key(AUDIOSET_CLIP)
        assert res["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    # text output: rank, score, path
    proc = cavmae(env, "search", str(idx), "--video", str(AUDIOSET_CLIP), "--k", "2")
    assert proc.returncode == 0
    assert "audio -> audio" in proc.stdout and f"1  +1.0000  {path_key(AUDIOSET_CLIP)}" in proc.stdout


def test_search_cross_modal_and_image(env, built):
    idx = built[1]
    index = EmbeddingIndex.open(idx)
    out = _search(env, idx, "--audio", str(AUDIOSET_CLIP), "--k", "10")
    [res] = out["results"]
    assert (res["query"], res["target"]) == ("audio", "visual")
    _check_hits(res["hits"], index, "visual", 10)  # 3 rows have video
    # the clip's own middle frame as an image, against the visual rows: itself first
    frames, _ = decode_frames(AUDIOSET_CLIP, num_frames=env[2].num_frames)
    image = env[3] / "middle.png"
    cv2.imwrite(str(image), cv2.cvtColor(frames[env[2].manifest.preprocess.middle_frame], cv2.COLOR_RGB2BGR))
    [res] = _search(env, idx, "--image", str(image), "--target", "visual")["results"]
    assert res["hits"][0]["path"] == path_key(AUDIOSET_CLIP)
    assert res["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    # image -> audio rows by default; --target both gives both lists
    [res] = _search(env, idx, "--image", str(image), "--k", "2")["results"]
    assert res["target"] == "audio"
    _check_hits(res["hits"], index, "audio", 2)
    out = _search(env, idx, "--image", str(image), "--target", "both")
    assert [r["target"] for r in out["results"]] == ["audio", "visual"]


def test_user_mistakes_exit_2_with_one_line(env, built):
    idx = str(built[1])
    cases = [
        ("search", idx),  # no query
        ("search", idx, "--audio", str(AUDIOSET_CLIP), "--image", "x.png"),  # two queries
        ("search", str(env[3] / "missing-index"), "--audio", str(AUDIOSET_CLIP)),
        ("search", idx, "--image", str(env[3] / "missing.png")),
        ("embed", str(AUDIOSET_CLIP)),  # no -o
        ("embed", str(AUDIOSET_CLIP), "-o", idx, "--shard", "2/2"),
        ("embed", str(env[3] / "no-such-folder"), "-o", idx),
        ("embed", "--merge", idx),  # no shards
        ("search", idx, "--audio", str(AUDIOSET_CLIP), "--modality", "visual"),  # an --audio query has one stream
        ("search", idx, "--audio", str(env[3] / "good")),  # a folder
        ("embed", str(AUDIOSET_CLIP), "-o", idx, "--shard", "0/99999999999999999999"),
    ]
    for args in cases:
        proc = cavmae(env, *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
        assert len(errors) == 1, (args, proc.stderr)


def test_two_shard_processes_then_merge_equal_single_run(env):
    tmp = env[3]
    inputs = [str(tmp / "good"), str(AUDIOSET_CLIP), str(VGGSOUND_CLIP)]
    sharded = tmp / "sharded"
    ckpt, variables = env[0], env[1]
    procs = [
        subprocess.Popen([CAVMAE, "embed", *inputs, "-o", str(sharded), "--shard", f"{i}/2", "--json",
                          "--model", str(ckpt), "--engine", "ort", "--device", "cpu", "--workers", "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=variables, cwd=tmp)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    summaries = [json.loads(out) for out, _ in outs]
    assert sorted(s["shard"][0] for s in summaries) == [0, 1]
    assert sum(s["added"] for s in summaries) == 5 and all(s["added"] for s in summaries)
    assert {Path(s["index"]).name for s in summaries} == {"shard-0-of-2", "shard-1-of-2"}

    proc = cavmae(env, "index", "merge", str(sharded), "--json", model=False)  # = embed --merge
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["count"] == 5
    assert not list(sharded.glob("shard-*"))

    single = tmp / "single"
    proc = cavmae(env, "embed", *inputs, "-o", str(single))
    assert proc.returncode == 0, proc.stderr
    a, b = EmbeddingIndex.open(sharded), EmbeddingIndex.open(single)
    items_a = {it["path"]: it for it in a.items()}
    items_b = {it["path"]: it for it in b.items()}
    assert set(items_a) == set(items_b) and len(items_a) == 5
    for path, ia in items_a.items():
        ib = items_b[path]
        assert (ia["has_audio"], ia["has_video"]) == (ib["has_audio"], ib["has_video"])
        for modality, flag in (("audio", "has_audio"), ("visual", "has_video")):
            if ia[flag]:
                np.testing.assert_allclose(a.embeddings(modality)[ia["row"]], b.embeddings(modality)[ib["row"]],
                                           atol=2e-5, err_msg=path)
    # merging is idempotent with respect to paths: re-running the shards adds nothing new
    proc = cavmae(env, "embed", *inputs, "-o", str(sharded), "--shard", "1/2", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["added"] == 0


def test_a_list_of_paths_is_an_input_without_ray_too(env):
    tmp = env[3]
    (tmp / "paths.txt").write_text("# clips to index\ngood/tone.mp4\n\ngood/sound.wav\n")
    proc = cavmae(env, "embed", str(tmp / "paths.txt"), "-o", str(tmp / "idx-list"), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["added"] == 2
    assert EmbeddingIndex.open(tmp / "idx-list").rows_of([tmp / "good" / "tone.mp4"])[0] >= 0
