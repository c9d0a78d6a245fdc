"""Bulk inference on Ray Data (cavmae.runtime.ray_data, ``--ray``) on a local 2-CPU Ray.

One Ray per module (num_cpus=2, no dashboard), 2 model actors, a tiny classifier exported once
into a temporary ``$CAVMAE_HOME``; the sample clips plus a broken file and a sound-only file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from cavmae import CAVMAEFT, TINY, save_checkpoint  # noqa: E402
from cavmae.runtime import load, ray_data  # noqa: E402
from cavmae.runtime.index import EmbeddingIndex  # noqa: E402
from media_factory import make_media, make_text_file  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory, sample_clips):
    import torch

    tmp = tmp_path_factory.mktemp("ray")
    torch.manual_seed(0)
    ckpt = save_checkpoint(CAVMAEFT(TINY).eval(), tmp / "ft.pth")
    old = os.environ.get("CAVMAE_HOME")
    os.environ["CAVMAE_HOME"] = str(tmp / "home")
    media = tmp / "media"
    media.mkdir()
    for clip in sample_clips:
        (media / clip.name).symlink_to(clip)
    make_media(media / "sound.wav", duration=1.0, with_video=False, audio_codec="pcm_s16le")
    make_text_file(media / "broken.mp4")
    pipe = load(ckpt, engine="ort", device="cpu")  # exports into the cache the actors use
    ray_data.init_ray(num_cpus=2)
    try:
        yield ckpt, pipe, media, tmp
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("CAVMAE_HOME")
        else:
            os.environ["CAVMAE_HOME"] = old


def _classify(pipe, ckpt, media, actor=ray_data.ClassifyActor, **plan):
    ds = ray_data.read_media([str(media)])
    ds = ray_data.plan_clips(ds, modes=pipe.classify_modes, **plan)
    ds = ray_data.decode_clips(ds, pipe.manifest.preprocess)
    spec = ray_data.ModelSpec(str(ckpt), engine="ort", device="cpu")
    ds = ray_data.classify_clips(ds, spec, actors=2, actor=actor, batch_size=2)
    return {(Path(r["path"]).name, r["offset"]): r for r in ds.take_all()}


def test_cpu_reservations_leave_room_for_decode():
    """2 actors on 2 CPUs reserve 1 CPU together: the read/decode tasks always fit."""
    assert ray_data.actor_resources(2, 0.0, {"CPU": 2.0}) == (2, 0.5)
    assert ray_data.actor_resources(None, 0.0, {"CPU": 2.0}) == (1, 1.0)
    assert ray_data.actor_resources(None, 1.0, {"CPU": 16.0, "GPU": 4.0}) == (4, 1.0)


def test_results_equal_single_process_2_actors_on_2_cpus(setup):
    """Deadlock layout (2 actors, 2 CPUs) completes, and gives the single-process numbers."""
    ckpt, pipe, media, _ = setup
    rows = _classify(pipe, ckpt, media, window=5.0, hop=5.0)
    assert rows[("broken.mp4", 0.0)]["error"]
    from cavmae.media import probe, window_offsets
    from cavmae.modes import best_mode

    checked = 0
    for path in sorted(media.iterdir()):
        if path.name == "broken.mp4":
            continue
        info = probe(path)
        mode = best_mode(pipe.classify_modes, info.has_audio, info.has_video)
        for start in window_offsets(info.duration, 5.0, 5.0):
            want = pipe.classify_file(path, mode, offset=start, duration=5.0)
            got = rows[(path.name, start)]
            assert not got["error"] and got["mode"] == mode
            np.testing.assert_allclose(got["probs"], want.probs, atol=1e-6, rtol=0)
            assert list(np.argsort(-got["probs"], kind="stable")[:5]) == [i for i, _, _ in want.top(5)]
            assert got["end"] == pytest.approx(want.end)
            checked += 1
    assert checked >= 5


class DyingOnce(ray_data.ClassifyActor):
    """Kills its process on the first batch it sees (once per test, by a marker file)."""

    def __call__(self, batch):
        marker = Path(os.environ["CAVMAE_HOME"]) / "killed"
        if not marker.exists():
            marker.write_text("x")
            os._exit(1)
        return super().__call__(batch)


def test_dead_actor_is_restarted_and_its_batch_retried(setup):
    ckpt, pipe, media, tmp = setup
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    rows = _classify(pipe, ckpt, media, actor=DyingOnce)
    assert (Path(os.environ["CAVMAE_HOME"]) / "killed").exists()
    good = {k for k, r in rows.items() if not r["error"]}
    assert good == {(p.name, 0.0) for p in media.iterdir() if p.name != "broken.mp4"}


def _cavmae(tmp, ckpt, *args):
    exe = str(Path(sys.executable).with_name("cavmae"))
    env = {**os.environ, "CAVMAE_NO_PROGRESS": "1"}
    env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address  # --ray auto joins this Ray
    return subprocess.run([exe, *args, "--model", str(ckpt), "--engine", "ort", "--device", "cpu",
                           "--ray-actors", "2"], capture_output=True, text=True, env=env, cwd=tmp,
                          timeout=300)


def test_cli_classify_and_embed_on_ray(setup):
    ckpt, pipe, media, tmp = setup
    out = tmp / "out.jsonl"
    res = _cavmae(tmp, ckpt, "classify", str(media), "--ray", "auto", "-o", str(out), "--json")
    assert res.returncode == 2, res.stderr
    assert "1 of 4 inputs failed" in res.stderr and "broken.mp4" in res.stderr
    records = [json.loads(s) for s in out.read_text().splitlines()]
    assert len(records) == 3
    want = pipe.classify_file(media / "sound.wav", "audio")
    got = next(r for r in records if r["path"].endswith("sound.wav"))
    assert [t["index"] for t in got["top"]] == [i for i, _, _ in want.top(5)]
    again = _cavmae(tmp, ckpt, "classify", str(media), "--ray", "auto", "-o", str(out))
    assert again.returncode == 2 and len(out.read_text().splitlines()) == 3  # done ones skipped

    index = tmp / "index"
    res = _cavmae(tmp, ckpt, "embed", str(media), "-o", str(index), "--ray", "auto", "--json")
    assert res.returncode == 2, res.stderr
    summary = json.loads(res.stdout)
    assert summary["added"] == 3 and len(summary["failed"]) == 1
    idx = EmbeddingIndex.open(index)
    assert len(idx) == 3
    clip = pipe.load_clip(media / "sound.wav", need_video=False)
    row = idx.row_of(media / "sound.wav")
    assert row is not None and not idx.has("visual")[row]
    np.testing.assert_allclose(idx.vectors("audio", np.array([row]))[0],
                               pipe.embed_audio(clip.audio[None])[0], atol=1e-6)


def test_import_does_not_load_ray():
    code = ("import sys, cavmae.runtime, cavmae.cli.main, cavmae.cli.classify_cmd, "
            "cavmae.cli.embed_cmd; assert 'ray' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
