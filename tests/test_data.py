"""Datasets: the reference layout, video lists, labels, weights, items, sampling."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cavmae.audio import prepare_audio
from cavmae.augment import AugmentConfig
from cavmae.config import DEFAULT_PREPROCESS
from cavmae.data import (
    AVDataset,
    ItemKey,
    StepBatchSampler,
    balanced_sample_weights,
    collate,
    encode_labels,
    epoch_order,
    eval_batches,
    read_clips,
    read_labels,
    read_wav,
    read_weights,
    write_dataset_json,
)
from cavmae.errors import DatasetError
from cavmae.media import decode_audio, load_clip
from cavmae.visual import load_image, preprocess_frame
from conftest import AUDIOSET_LABELS
from media_factory import make_media
from synthetic_av import make_synthetic_dataset


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("data"), num_classes=3, splits={"train": 2, "val": 1}, seconds=1.5
    )


# -- labels, weights, clip lists -----------------------------------------------------------------


def test_read_labels(ds):
    labels = read_labels(ds.label_csv)
    assert len(labels) == 3 and labels.ids[2] == "/m/c2" and labels.names[0] == "class 0, synthetic"
    np.testing.assert_array_equal(encode_labels(labels, ["/m/c2", "/m/c0"]), [1, 0, 1])
    with pytest.raises(DatasetError, match="not in the label CSV"):
        encode_labels(labels, ["/m/nope"])
    if AUDIOSET_LABELS.is_file():
        audioset = read_labels(AUDIOSET_LABELS)
        assert len(audioset) == 527 and audioset.ids[0] == "/m/09x0r"


def test_read_labels_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    for text, message in (
        ("a,b\n1,2\n", "not a label CSV"),
        ("index,mid,display_name\n0,/m/a,A\n2,/m/b,B\n", "0..1"),
        ("index,mid,display_name\nx,/m/a,A\n", "integers"),
        ("index,mid,display_name\n0,/m/a,A\n1,/m/a,B\n", "twice"),
    ):
        bad.write_text(text)
        with pytest.raises(DatasetError, match=message):
            read_labels(bad)
    with pytest.raises(DatasetError, match="not found"):
        read_labels(tmp_path / "missing.csv")


def test_weights_and_balanced_weights(ds, tmp_path):
    clips = read_clips(ds.splits["train"])
    w = read_weights(ds.weight_csv, len(clips))
    assert w.shape == (6,) and w[1] == 2.0
    with pytest.raises(DatasetError, match="one line per clip"):
        read_weights(ds.weight_csv, 7)
    (tmp_path / "neg.csv").write_text("1\n-1\n")
    with pytest.raises(DatasetError, match=">= 0"):
        read_weights(tmp_path / "neg.csv")
    labels = read_labels(ds.label_csv)
    bal = balanced_sample_weights(clips, labels)
    # every class has 2 clips: each weighs 1000 / 2.01
    np.testing.assert_allclose(bal, 1000 / 2.01)


def test_reference_json_relative_paths(ds, tmp_path):
    clips = read_clips(ds.splits["val"])
    assert len(clips) == 3 and clips[0].labels == ("/m/c0",)
    assert clips[0].frame_path(4).endswith(f"frame_4/{clips[0].video_id}.jpg")
    # relative paths resolve against the JSON's folder
    entries = [dict(c.to_json(), wav=f"audio/{c.video_id}.wav", video_path="frames") for c in clips]
    rel = ds.root / "rel.json"
    rel.write_text(json.dumps({"data": entries}))
    again = read_clips(rel)
    assert again[1].wav == str(ds.root / "audio" / f"{clips[1].video_id}.wav")
    assert again[1].frame_dir == str(ds.root / "frames")
    # round trip through the writer
    write_dataset_json(again, tmp_path / "out.json")
    assert json.loads((tmp_path / "out.json").read_text())["data"][0]["labels"] == "/m/c0"


def test_dataset_file_errors(tmp_path):
    path = tmp_path / "d.json"
    for content, message in (
        ("{not json", "not valid JSON"),
        ('{"data": []}', "empty"),
        ('{"data": [{"wav": "a.wav"}]}', "video_id"),
        ('{"data": [{"labels": "x"}]}', "no video path"),
        ('{"rows": 1}', "expected"),
    ):
        path.write_text(content)
        with pytest.raises(DatasetError, match=message):
            read_clips(path)
    (tmp_path / "v.csv").write_text("name,labels\na.mp4,x\n")
    with pytest.raises(DatasetError, match="'video'"):
        read_clips(tmp_path / "v.csv")


def test_video_lists(tmp_path):
    (tmp_path / "v.csv").write_text('video,labels\nclips/a.mp4,"/m/x,/m/y"\n/abs/b.mkv,/m/z\n')
    clips = read_clips(tmp_path / "v.csv")
    assert clips[0].video == str(tmp_path / "clips" / "a.mp4") and clips[0].label_tokens() == ["/m/x", "/m/y"]
    assert clips[1].video == "/abs/b.mkv" and clips[1].video_id == "b"
    (tmp_path / "v.json").write_text(json.dumps([{"path": "c.mp4", "labels": ["/m/q"]}, "d.mp4"]))
    clips = read_clips(tmp_path / "v.json")
    assert [c.video_id for c in clips] == ["c", "d"] and clips[0].labels == ("/m/q",) and clips[1].labels is None


def test_one_reader_for_training_and_evaluation(ds, tmp_path, monkeypatch):
    from cavmae.clip_lists import read_dataset_json

    # training and evaluation read a reference JSON into the same records
    assert read_clips(ds.splits["val"]) == list(read_dataset_json(ds.splits["val"]).clips)
    # one path rule: as given when it exists (the reference's working-directory paths), else
    # relative to the dataset file's folder
    monkeypatch.chdir(ds.root)
    entry = {"video_id": "x", "wav": "audio/x.wav", "video_path": "frames", "labels": "/m/c0"}
    (tmp_path / "audio").mkdir()
    (tmp_path / "audio" / "x.wav").write_bytes(b"")
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": [entry]}))
    for clip in (read_clips(path)[0], read_dataset_json(path).clips[0]):
        assert clip.frame_dir == "frames"  # exists in the working directory
        assert clip.wav == str(tmp_path / "audio" / "x.wav")  # only beside the JSON
    # a bad entry: evaluation records it and goes on, training refuses the file
    path.write_text(json.dumps({"data": [entry, {"labels": "/m/c0"}]}))
    bad = read_dataset_json(path).clips[1]
    assert bad.video_id == "#1" and "no video_id" in (bad.problem or "")
    with pytest.raises(DatasetError, match="entry 1: the entry has no video_id"):
        read_clips(path)


# -- items ---------------------------------------------------------------------------------------


def test_eval_item_is_the_reference_preprocessing(ds):
    clips = read_clips(ds.splits["val"])
    labels = read_labels(ds.label_csv)
    item = AVDataset(clips, labels)[1]
    assert set(item) == {"index", "audio", "image", "target"}
    expected_audio = prepare_audio(read_wav(clips[1].wav))
    np.testing.assert_array_equal(item["audio"], expected_audio)
    expected_image = preprocess_frame(load_image(clips[1].frame_path(DEFAULT_PREPROCESS.middle_frame)))
    np.testing.assert_array_equal(item["image"], expected_image)
    np.testing.assert_array_equal(item["target"], [0, 1, 0])
    frames = AVDataset(clips, labels, frame="all")[0]["frames"]
    assert frames.shape == (10, 3, 224, 224)
    np.testing.assert_array_equal(frames[3], preprocess_frame(load_image(clips[0].frame_path(3))))
    audio_only = AVDataset(clips, video=False)[0]
    assert set(audio_only) == {"index", "audio"}


def test_read_wav_matches_ffmpeg(ds):
    clip = read_clips(ds.splits["val"])[0]
    np.testing.assert_allclose(read_wav(clip.wav), decode_audio(clip.wav), atol=1e-6)


def test_training_items_are_deterministic_and_augmented(ds):
    clips = read_clips(ds.splits["train"])
    labels = read_labels(ds.label_csv)
    aug = AugmentConfig(mixup=1.0, freqm=20, timem=100, noise=True, label_smooth=0.1)
    train = AVDataset(clips, labels, augment=aug, frame="random")
    key = ItemKey(2, seed=11, epoch=3, position=5)
    a, b = train[key], train[key]
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    other = train[ItemKey(2, seed=11, epoch=3, position=6)]
    assert not np.array_equal(a["audio"], other["audio"])
    # mixup with label smoothing: a smoothed mixture of two one-hot vectors
    assert a["target"].sum() == pytest.approx(1.0, abs=1e-6)
    assert a["target"].min() >= 0.1 / 3 - 1e-6
    # an int key is evaluation: no augmentation even with an augmenting dataset
    plain = train[2]
    np.testing.assert_array_equal(plain["audio"], prepare_audio(read_wav(clips[2].wav)))
    np.testing.assert_array_equal(plain["target"], encode_labels(labels, clips[2].labels))
    # the random frame is one of the clip's frames
    no_mix = AVDataset(clips, labels, augment=AugmentConfig(), frame="random")
    image = no_mix[ItemKey(0, 1, 1, 1)]["image"]
    candidates = [preprocess_frame(load_image(clips[0].frame_path(i))) for i in range(10)]
    assert any(np.array_equal(image, c) for c in candidates)


def test_missing_files(ds, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(ds.root, root)
    clips = read_clips(ds.splits["val"])
    clips = [type(c)(c.video_id, c.labels, str(root / "audio" / f"{c.video_id}.wav"), str(root / "frames")) for c in clips]
    vid = clips[0].video_id
    (root / "frames" / "frame_5" / f"{vid}.jpg").unlink()
    # a missing frame fails the clip, naming the file ...
    with pytest.raises(DatasetError, match=f"frame 5 is missing .*frame_5/{vid}.jpg"):
        AVDataset(clips)[0]
    # ... unless the reference's fallback to the nearest lower frame is asked for
    dataset = AVDataset(clips, frame_fallback=True)
    np.testing.assert_array_equal(
        dataset[0]["image"], preprocess_frame(load_image(root / "frames" / "frame_4" / f"{vid}.jpg"))
    )
    for i in range(5):
        (root / "frames" / f"frame_{i}" / f"{vid}.jpg").unlink()
    with pytest.raises(DatasetError, match="re-run"):
        dataset[0]
    (root / "audio" / f"{clips[1].video_id}.wav").unlink()
    with pytest.raises(DatasetError, match="audio file not found"):
        dataset[1]
    with pytest.raises(DatasetError, match="no labels"):
        AVDataset([type(c)(c.video_id, (), c.wav, c.frame_dir) for c in clips], read_labels(ds.label_csv))


def test_video_file_dataset(tmp_path):
    video = make_media(tmp_path / "v.mp4", duration=2.0, fps=10, channels=2, tones=(440.0, 1000.0))
    (tmp_path / "list.csv").write_text("video,labels\nv.mp4,/m/a\n")
    dataset = AVDataset(read_clips(tmp_path / "list.csv"), frame="all")
    item = dataset[0]
    clip = load_clip(video)
    np.testing.assert_allclose(item["audio"], clip.audio, atol=1e-5)
    np.testing.assert_allclose(item["frames"], clip.frames, atol=1e-6)
    assert DEFAULT_PREPROCESS.audio_seconds == pytest.approx(10.255)


def test_collate(ds):
    dataset = AVDataset(read_clips(ds.splits["val"]), read_labels(ds.label_csv))
    batch = collate([dataset[0], dataset[2]])
    assert batch["audio"].shape == (2, 1024, 128) and batch["image"].shape == (2, 3, 224, 224)
    assert batch["index"].tolist() == [0, 2] and batch["target"].shape == (2, 3)


# -- sampling ------------------------------------------------------------------------------------


def test_epoch_order():
    a = epoch_order(50, seed=1, epoch=2)
    assert sorted(a.tolist()) == list(range(50))
    np.testing.assert_array_equal(a, epoch_order(50, seed=1, epoch=2))
    assert not np.array_equal(a, epoch_order(50, seed=1, epoch=3))
    np.testing.assert_array_equal(epoch_order(5, 0, 1, shuffle=False), np.arange(5))
    w = np.array([0.0, 1.0, 3.0])
    drawn = epoch_order(3, seed=0, epoch=1, weights=w, num_samples=20000)
    counts = np.bincount(drawn, minlength=3) / 20000
    assert counts[0] == 0 and counts[2] == pytest.approx(0.75, abs=0.02)


@pytest.mark.parametrize("world, accum", [(1, 1), (2, 1), (1, 4), (2, 2)])
def test_step_sampler_shards(world, accum):
    order = epoch_order(37, seed=4, epoch=1)
    per_rank = [
        list(StepBatchSampler(order, 8, seed=4, epoch=1, world_size=world, rank=r, accum_steps=accum))
        for r in range(world)
    ]
    assert all(len(p) == 4 * accum for p in per_rank)  # 4 full steps, the last 5 dropped
    for step in range(4):
        keys = [k for p in per_rank for mb in p[step * accum : (step + 1) * accum] for k in mb]
        # every rank's micro-batches are disjoint; together they are the step's 8 positions
        assert sorted(k.position for k in keys) == list(range(step * 8, step * 8 + 8))
        assert all(k.clip == order[k.position] for k in keys)
    # resuming skips whole steps
    resumed = list(StepBatchSampler(order, 8, seed=4, epoch=1, world_size=world, accum_steps=accum, start_step=3))
    assert resumed == per_rank[0][3 * accum :]
    with pytest.raises(ValueError, match="divisible"):
        StepBatchSampler(order, 6, seed=0, epoch=1, world_size=4)


def test_eval_batches():
    for world in (1, 2, 3):
        shards = [eval_batches(10, 3, world, r) for r in range(world)]
        flat = [i for s in shards for b in s for i in b]
        assert flat == list(range(10))
        assert all(len(b) <= 3 for s in shards for b in s)


def test_training_runs_keep_the_reference_frame_fallback(ds):
    """Training follows the reference loader (a missing frame falls back to a lower one) unless
    the config says otherwise; evaluation datasets stay strict (test_missing_files)."""
    from cavmae.train import PretrainConfig
    from cavmae.train.data import load_data

    cfg = PretrainConfig(train_data=str(ds.splits["train"]), val_data=str(ds.splits["val"]), output_dir="unused")
    run = load_data(cfg, None, DEFAULT_PREPROCESS, audio=True, video=True)
    assert run.train.frame_fallback and run.val is not None and run.val.frame_fallback
    strict = load_data(cfg.replace(frame_fallback=False), None, DEFAULT_PREPROCESS, audio=True, video=True)
    assert not strict.train.frame_fallback


@pytest.mark.parametrize("channels", [1, 2])
def test_a_wav_cut_inside_a_frame_keeps_its_whole_frames(tmp_path, channels):
    import wave

    samples = (np.arange(1000, dtype=np.int16) * 7).repeat(channels)
    path = tmp_path / "cut.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(DEFAULT_PREPROCESS.sample_rate)
        w.writeframes(samples.tobytes())
    path.write_bytes(path.read_bytes()[:-3])  # cut in the middle of the last frame
    got = read_wav(path)
    expect = (np.arange(1000, dtype=np.int16) * 7).astype(np.float32) / 32768.0
    whole = (1000 * 2 * channels - 3) // (2 * channels)
    np.testing.assert_array_equal(got, expect[:whole])
