"""Bulk inference on Ray Data (cavmae.runtime.ray_data, ``--ray``) on a local 2-CPU Ray.

One Ray for the whole module (the ``setup`` fixture: num_cpus=2, no dashboard), so its worker
processes start once and are reused by every test; a tiny classifier exported once into a
temporary ``$CAVMAE_HOME``; the two sample clips plus a broken file and a sound-only file.
A console-script run costs a new process and a new Ray job (new workers): there are two, one
for each thing only a console script shows (bare ``--ray`` starts its own Ray, ``--ray auto``
joins the running one); the other CLI checks run in this process through click's runner.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

ray = pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")

from cavmae import CAVMAEFT, TINY, save_checkpoint  # noqa: E402
from cavmae.cli.main import cli  # noqa: E402
from cavmae.cli.ray_run import ParquetResults  # noqa: E402
from cavmae.errors import CavmaeError  # noqa: E402
from cavmae.runtime import load, ray_data  # noqa: E402
from cavmae.runtime.index import EmbeddingIndex  # noqa: E402
from media_factory import make_media, make_text_file  # noqa: E402

PARQUET_COLUMNS = ["path", "mode", "offset", "duration", "end", "top_index", "top_label",
                   "top_score", "scores", "error"]


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


def _classify(pipe, ckpt, inputs, actor=ray_data.ClassifyActor, **plan):
    ds = ray_data.read_media([str(p) for p in inputs])
    ds = ray_data.plan_clips(ds, modes=pipe.classify_modes, **plan)
    ds = ray_data.decode_clips(ds, pipe.manifest.preprocess)
    spec = ray_data.ModelSpec(str(ckpt), engine="ort", device="cpu")
    ds = ray_data.classify_clips(ds, spec, actors=2, actor=actor, batch_size=2)
    return {(Path(r["path"]).name, r["offset"]): r for r in ds.take_all()}


def _mode(pipe, path: Path) -> str:
    from cavmae.media import probe
    from cavmae.modes import best_mode

    info = probe(path)
    mode = best_mode(pipe.classify_modes, info.has_audio, info.has_video)
    assert mode is not None
    return mode


# -- no Ray needed -----------------------------------------------------------------------------
def test_cpu_reservations_leave_room_for_decode():
    """2 actors on 2 CPUs reserve 1 CPU together: the read/decode tasks always fit (a full CPU
    per actor, the deadlock layout, is never asked for)."""
    assert ray_data.actor_resources(2, 0.0, {"CPU": 2.0}) == (2, 0.5)
    assert ray_data.actor_resources(None, 0.0, {"CPU": 2.0}) == (1, 1.0)
    assert ray_data.actor_resources(None, 1.0, {"CPU": 16.0, "GPU": 4.0}) == (4, 1.0)


@pytest.mark.parametrize("actors, gpus, cluster, message", [
    (None, 1.0, {"CPU": 2.0}, "has 0 GPUs"),  # Ray would wait for a GPU forever
    (3, 1.0, {"CPU": 16.0, "GPU": 2.0}, "need 3 GPUs"),
    (50, 0.0, {"CPU": 2.0}, "use at most 2"),  # 50 model copies on 2 CPUs
])
def test_a_pool_the_cluster_cannot_hold_is_refused(actors, gpus, cluster, message):
    with pytest.raises(CavmaeError, match=message):
        ray_data.actor_resources(actors, gpus, cluster)


def test_ray_before_the_inputs_and_parquet_without_ray_are_refused(tmp_path, sample_clips):
    """Both are refused in one line before a model loads (the model named does not exist)."""
    clip = str(sample_clips[0])
    missing = str(tmp_path / "no-such-model.pth")
    res = CliRunner().invoke(cli, ["classify", "--ray", clip, clip, "--model", missing])
    assert res.exit_code == 2 and "is not a Ray address" in res.output, res.output
    assert "no-such-model" not in res.output
    res = CliRunner().invoke(cli, ["classify", clip, "-o", str(tmp_path / "r.parquet"),
                                   "--model", missing])
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines() == [
        f"Error: -o {tmp_path / 'r.parquet'}: Parquet results are written with --ray only;"
        " add --ray, or use a .csv, .jsonl or .json file"]
    assert not (tmp_path / "r.parquet").exists()


def _record(path: str, start: float, probs: list[float]) -> dict:
    top = [{"rank": 1, "index": int(np.argmax(probs)), "label": "x", "score": max(probs)}]
    return {"path": path, "mode": "av", "start": start, "end": start + 5.0, "top": top,
            "scores": probs}


def test_parquet_results_carry_over_and_retry_errors(tmp_path):
    out = tmp_path / "r.parquet"
    w = ParquetResults(out, all_scores=True)
    w.write(_record("/m/a.mp4", 0.0, [0.25, 0.75]))
    w.write(_record("/m/a.mp4", 5.0, [0.5, 0.5]))
    w.write_error("/m/bad.mp4", "auto", 0.0, "/m/bad.mp4: not a media file")
    w.close()
    table = pq.read_table(out)
    assert table.column_names == PARQUET_COLUMNS and table.num_rows == 3
    again = ParquetResults(out, all_scores=True)
    assert again.is_done({"path": "/m/a.mp4", "mode": "av", "start": 5.0})
    assert not again.is_done({"path": "/m/bad.mp4", "mode": "auto", "start": 0.0})
    again.close()  # a run that did not try bad.mp4 again keeps its error row
    assert pq.read_table(out).to_pylist()[2]["error"] == "/m/bad.mp4: not a media file"
    third = ParquetResults(out, all_scores=True)
    third.write_error("/m/bad.mp4", "auto", 0.0, "still broken")  # replaces the old one
    third.close()
    rows = pq.read_table(out).to_pylist()
    assert [r["error"] for r in rows] == ["", "", "still broken"]
    assert rows[0]["scores"] == [0.25, 0.75] and rows[2]["top_index"] == []
    with pytest.raises(CavmaeError, match="--all-scores"):
        ParquetResults(out, all_scores=False)  # the columns would not match
    (tmp_path / "t.parquet").write_text("not parquet")
    with pytest.raises(CavmaeError, match="not a Parquet file"):
        ParquetResults(tmp_path / "t.parquet", all_scores=False)


# -- on the module's Ray -----------------------------------------------------------------------
def test_results_equal_single_process_2_actors_on_2_cpus(setup):
    """The 2-actors-on-2-CPUs layout completes and gives the single-process numbers."""
    ckpt, pipe, media, _ = setup
    rows = _classify(pipe, ckpt, [media], window=5.0, hop=5.0)
    assert rows[("broken.mp4", 0.0)]["error"]
    from cavmae.media import probe, window_offsets

    checked = 0
    for path in sorted(media.iterdir()):
        if path.name == "broken.mp4":
            continue
        mode = _mode(pipe, path)
        for start in window_offsets(probe(path).duration, 5.0, 5.0):
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


def test_dead_actor_is_restarted_and_its_batch_retried(setup, sample_clips):
    ckpt, pipe, media, _ = setup
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    files = [media / sample_clips[0].name, media / "sound.wav"]  # one batch of 2: the one killed
    rows = _classify(pipe, ckpt, files, actor=DyingOnce)
    assert (Path(os.environ["CAVMAE_HOME"]) / "killed").exists()
    assert {k for k, r in rows.items() if not r["error"]} == {(p.name, 0.0) for p in files}
    want = pipe.classify_file(files[1], "audio")
    np.testing.assert_allclose(rows[("sound.wav", 0.0)]["probs"], want.probs, atol=1e-6, rtol=0)


# -- the console script ------------------------------------------------------------------------
def _cavmae(tmp, ckpt, *args, env=None):
    exe = str(Path(sys.executable).with_name("cavmae"))
    env = {**os.environ, "CAVMAE_NO_PROGRESS": "1", **(env or {})}
    return subprocess.run([exe, *args, "--model", str(ckpt), "--engine", "ort", "--device", "cpu",
                           "--ray-actors", "2"], capture_output=True, text=True, env=env, cwd=tmp,
                          timeout=300)


def test_cli_classify_bare_ray_starts_a_local_ray_and_writes_parquet(setup, monkeypatch):
    ckpt, pipe, media, tmp = setup
    out = tmp / "out.parquet"
    # RAY_ADDRESS names the module's Ray: bare --ray must start its own (2 CPUs) instead
    res = _cavmae(tmp, ckpt, "classify", str(media), "--ray", "-o", str(out), "--all-scores",
                  "--json", env={"RAY_ADDRESS": ray.get_runtime_context().gcs_address,
                                 "RAY_OVERRIDE_RESOURCES": json.dumps({"CPU": 2})})
    assert res.returncode == 2, res.stderr
    assert "ray: started a new local Ray on this machine (2 CPUs)" in res.stderr
    assert "1 of 4 inputs failed" in res.stderr and "broken.mp4" in res.stderr
    assert len([s for s in res.stdout.splitlines() if s.startswith("{")]) == 3  # --json too
    table = pq.read_table(out)
    assert table.column_names == PARQUET_COLUMNS and table.num_rows == 4
    rows = {Path(r["path"]).name: r for r in table.to_pylist()}
    bad = rows.pop("broken.mp4")
    assert bad["error"] and bad["top_index"] == [] and math.isnan(bad["duration"])
    for name, row in rows.items():
        want = pipe.classify_file(media / name, _mode(pipe, media / name))
        assert not row["error"] and row["mode"] == want.mode and row["offset"] == 0.0
        np.testing.assert_allclose(row["scores"], want.probs, atol=1e-6, rtol=0)
        assert row["top_index"] == [i for i, _, _ in want.top(5)]
        assert row["duration"] == pytest.approx(want.end - want.offset, abs=1e-3)

    # a re-run with the same -o (here in this process, on the module's Ray) skips what is done
    # and tries the broken file again
    monkeypatch.setenv("CAVMAE_NO_PROGRESS", "1")
    again = CliRunner().invoke(cli, ["classify", str(media), "--ray", "auto", "-o", str(out),
                                     "--all-scores", "--json", "--model", str(ckpt), "--engine",
                                     "ort", "--device", "cpu", "--ray-actors", "2"])
    assert again.exit_code == 2, again.output
    assert not [line for line in again.stdout.splitlines() if line.startswith("{")]
    rerun = pq.read_table(out).to_pylist()
    assert len(rerun) == 4 and sum(bool(r["error"]) for r in rerun) == 1
    assert {r["path"]: r["scores"] for r in rerun if not r["error"]} == {
        r["path"]: r["scores"] for r in rows.values()}


def test_cli_embed_on_ray_auto(setup):
    ckpt, pipe, media, tmp = setup
    index = tmp / "index"
    res = _cavmae(tmp, ckpt, "embed", str(media), "-o", str(index), "--ray", "auto", "--json",
                  env={"RAY_ADDRESS": ray.get_runtime_context().gcs_address})
    assert res.returncode == 2, res.stderr
    assert "ray: joined the running Ray cluster (2 CPUs)" in res.stderr
    summary = json.loads(res.stdout)
    assert summary["added"] == 3 and len(summary["failed"]) == 1
    idx = EmbeddingIndex.open(index)
    assert len(idx) == 3
    clip = pipe.load_clip(media / "sound.wav", need_video=False)
    row = idx.row_of(media / "sound.wav")
    assert row is not None and not idx.has("visual")[row]
    np.testing.assert_allclose(idx.vectors("audio", np.array([row]))[0],
                               pipe.embed_audio(clip.audio[None])[0], atol=1e-6)
    # a list of paths naming a clip already indexed and a new one: the driver expands the list,
    # so the indexed clip is skipped and the run goes on (it stopped at a duplicate before)
    shutil.copyfile(media / "sound.wav", tmp / "new.wav")
    (tmp / "list.txt").write_text(f"{media / 'sound.wav'}\nnew.wav\nmissing.wav\n")
    res = _cavmae(tmp, ckpt, "embed", str(tmp / "list.txt"), "-o", str(index), "--ray", "auto", "--json",
                  env={"RAY_ADDRESS": ray.get_runtime_context().gcs_address})
    assert res.returncode == 2, res.stderr  # the missing entry is that file's failure, not the job's
    summary = json.loads(res.stdout)
    assert (summary["added"], summary["skipped"]) == (1, 1) and summary["failed"][0]["path"].endswith("missing.wav")


def test_import_does_not_load_ray():
    code = ("import sys, cavmae.runtime, cavmae.cli.main, cavmae.cli.classify_cmd, "
            "cavmae.cli.embed_cmd; assert 'ray' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
