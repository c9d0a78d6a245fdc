"""Evaluation plumbing: dataset readers, label mapping, the loop, block-wise retrieval ranks.

The readers live in :mod:`cavmae.clip_lists`, the metric summaries in :mod:`cavmae.metrics`,
the driver in :mod:`cavmae.runtime.evaluation`.

The metrics themselves are checked against hand-computed cases in ``test_metrics.py``; here the
reported numbers must equal those metrics computed on probabilities and embeddings obtained
directly from the pipeline, on a tiny dataset written in the reference layout.
"""

from __future__ import annotations

import json
import wave
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cavmae import CAVMAEFT, TINY, save_checkpoint
from cavmae import clip_lists as cl
from cavmae.audio import prepare_audio
from cavmae.errors import CavmaeError, DatasetError, ModelKindError
from cavmae.labels import LabelSet, read_label_csv
from cavmae.media import decode_audio, load_clip
from cavmae.metrics import (
    accuracy,
    classification_metrics,
    mean_auc,
    mean_average_precision,
    retrieval_metrics,
    retrieval_ranks,
    retrieval_report,
    summarize_ranks,
)
from cavmae.runtime import evaluation as ev
from cavmae.runtime import load
from cavmae.visual import load_image, preprocess_frame
from media_factory import make_media, make_text_file

LABEL_ROWS = [
    ("/m/dog", "Dog"),
    ("/m/cat", "Cat"),
    ("/m/speech", "Male speech, man speaking"),
    ("/m/music", "Music"),
]
#: video_id -> comma-separated mids (reference JSON); every class has a positive
CLIP_LABELS = {
    "clip_a": "/m/dog",
    "clip_b": "/m/cat,/m/music",
    "clip_c": "/m/speech",
    "clip_d": "/m/dog,/m/speech",
    "clip_e": "/m/music",
}
NUM_FRAMES = 10


# -- builders shared with test_cli_evaluate.py -------------------------------------------------
def write_label_csv(path: Path) -> Path:
    lines = ["index,mid,display_name"] + [
        f'{i},{mid},"{name}"' for i, (mid, name) in enumerate(LABEL_ROWS)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_wav(path: Path, samples: np.ndarray, rate: int = 16000) -> Path:
    """16-bit PCM wav; ``samples`` [n] or [n, channels] in [-1, 1]."""
    data = np.asarray(samples, dtype=np.float64)
    if data.ndim == 1:
        data = data[:, None]
    pcm = np.clip(np.round(data * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(data.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def build_reference_dataset(root: Path, labels: dict[str, str] = CLIP_LABELS) -> Path:
    """Wavs in ``root/audio``, frames in ``root/frames/frame_i/{id}.jpg``; JSON paths relative."""
    rng = np.random.default_rng(0)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    entries = []
    for k, (vid, mids) in enumerate(labels.items()):
        # different tones, rates and channel counts per clip; one stereo 44.1 kHz file
        rate, channels = (44100, 2) if k == 1 else (16000, 1)
        t = np.arange(int(1.2 * rate)) / rate
        tone = 0.4 * np.sin(2 * np.pi * (300 + 250 * k) * t) + 0.05 * rng.standard_normal(t.size)
        samples = np.stack([tone, -tone], axis=1) if channels == 2 else tone
        write_wav(root / "audio" / f"{vid}.wav", samples, rate)
        base = rng.integers(0, 255, size=3)
        for i in range(NUM_FRAMES):
            d = root / "frames" / f"frame_{i}"
            d.mkdir(parents=True, exist_ok=True)
            img = np.clip(base + rng.integers(-40, 40, size=(24, 32, 3)), 0, 255).astype(np.uint8)
            cv2.imwrite(str(d / f"{vid}.jpg"), img)
        entries.append(
            {"video_id": vid, "wav": f"audio/{vid}.wav", "video_path": "frames", "labels": mids}
        )
    path = root / "data.json"
    path.write_text(json.dumps({"data": entries}))
    return path


def make_classifier_checkpoint(path: Path, num_classes: int = len(LABEL_ROWS)) -> Path:
    torch.manual_seed(0)
    model = CAVMAEFT(TINY.replace(num_classes=num_classes)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return save_checkpoint(model, path)


def reference_inputs(
    json_path: Path, num_frames: int = NUM_FRAMES
) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs of every clip of a reference JSON, loaded independently of the evaluator."""
    root = json_path.parent
    audio, frames = [], []
    for e in json.loads(json_path.read_text())["data"]:
        audio.append(prepare_audio(decode_audio(root / e["wav"], sample_rate=16000)))
        frames.append(
            np.stack(
                [
                    preprocess_frame(
                        load_image(root / e["video_path"] / f"frame_{i}" / f"{e['video_id']}.jpg")
                    )
                    for i in range(num_frames)
                ]
            )
        )
    return np.stack(audio), np.stack(frames)


def multi_hot(label_strings: list[str]) -> np.ndarray:
    mids = [m for m, _ in LABEL_ROWS]
    out = np.zeros((len(label_strings), len(mids)), dtype=np.uint8)
    for n, s in enumerate(label_strings):
        for mid in s.split(","):
            out[n, mids.index(mid)] = 1
    return out


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluation")
    from cavmae.export import export_model

    labels = write_label_csv(tmp / "labels.csv")
    ckpt = make_classifier_checkpoint(tmp / "ft.pth")
    export_model(ckpt, tmp / "export", max_batch=4, labels=labels)
    data = build_reference_dataset(tmp / "ds")
    return {"tmp": tmp, "labels": labels, "export": tmp / "export", "json": data}


@pytest.fixture(scope="module")
def pipe(files):
    return load(files["export"], engine="ort", device="cpu")


@pytest.fixture(scope="module")
def direct(files, pipe):
    """Probabilities and embeddings straight from the pipeline on independently loaded inputs."""
    audio, frames = reference_inputs(files["json"])
    return {
        "probs": pipe.classify_batch(audio, frames, "av"),
        "ea": pipe.embed_audio(audio),
        "ev": pipe.embed_frames(frames, "middle"),
        "targets": multi_hot(list(CLIP_LABELS.values())),
    }


# -- reading datasets ----------------------------------------------------------------------------
def test_read_dataset_json_resolves_relative_paths(files):
    data = cl.read_dataset_json(files["json"])
    assert data.kind == "reference-json" and len(data) == len(CLIP_LABELS)
    item = data.clips[0]
    assert item.video_id == "clip_a" and item.labels == ("/m/dog",)
    assert item.wav == str(files["json"].parent / "audio" / "clip_a.wav")
    assert Path(item.wav).is_file()
    assert item.frame_path(3) == str(files["json"].parent / "frames" / "frame_3" / "clip_a.jpg")


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"data": {}}', '{"data": []}'])
def test_malformed_dataset_json_is_a_dataset_error(tmp_path, text):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DatasetError):
        cl.read_dataset_json(path)
    with pytest.raises(DatasetError, match="cannot read"):
        cl.read_dataset_json(tmp_path / "missing.json")


def test_labels_file_format(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "labels.csv"
    path.write_text(
        "# comment line\n"
        "file,labels\n"
        "a.mp4,Dog;Cat\n"
        'b,"/m/dog,/m/music"\n'
        "sub/c.mkv,Music\n"
        'd.mp4,"Male speech, man speaking"\n'
        "e.mp4,Dog,Cat\n"
        "\n"
    )
    table = cl.read_labels_file(path)
    assert table["a.mp4"] == ("Dog;Cat",)
    assert table[str((tmp_path / "sub" / "c.mkv").resolve())] == ("Music",)
    index = cl.label_index(
        LabelSet(names=tuple(n for _, n in LABEL_ROWS), ids=tuple(m for m, _ in LABEL_ROWS))
    )
    assert cl.split_labels(table["a.mp4"], index) == ["Dog", "Cat"]
    assert cl.split_labels(table["b"], index) == ["/m/dog", "/m/music"]
    assert cl.split_labels(table["d.mp4"], index) == ["Male speech, man speaking"]
    assert cl.split_labels(table["e.mp4"], index) == ["Dog", "Cat"]

    path.write_text("a.mp4,Dog\na.mp4,Cat\n")
    with pytest.raises(DatasetError, match="twice"):
        cl.read_labels_file(path)
    path.write_text("a.mp4\n")
    with pytest.raises(DatasetError, match="line 1"):
        cl.read_labels_file(path)


def test_encode_targets_reports_bad_labels():
    labels = LabelSet(names=tuple(n for _, n in LABEL_ROWS), ids=tuple(m for m, _ in LABEL_ROWS))
    items = [
        cl.ClipRecord("a", ("/m/dog,/m/cat",)),
        cl.ClipRecord("b", ("music",)),  # display names match case-insensitively
        cl.ClipRecord("c", ("/m/nope",)),
        cl.ClipRecord("d", None),
        cl.ClipRecord("e", ("",)),  # no label: all-negative is legal for multi-label
    ]
    targets, problems = cl.encode_targets(items, labels, "multi-label")
    np.testing.assert_array_equal(targets[0], [1, 1, 0, 0])
    np.testing.assert_array_equal(targets[1], [0, 0, 0, 1])
    assert set(problems) == {2, 3} and "unknown label '/m/nope'" in problems[2]
    _, problems = cl.encode_targets(items, labels, "single-label")
    assert set(problems) == {0, 2, 3, 4} and "exactly one" in problems[0]


# -- metrics glue --------------------------------------------------------------------------------
def test_classification_metrics_hand_computed():
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.3, 0.6, 0.1], [0.1, 0.2, 0.7]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1]])
    single = classification_metrics(scores, targets, "single-label")
    assert single["accuracy"] == pytest.approx(0.75)  # clip 2 predicts class 1
    assert single["top5_accuracy"] == pytest.approx(1.0)
    multi = classification_metrics(scores, targets, "multi-label")
    # class 0: positives ranked 1st and 2nd -> AP 1; class 1: positive 1st -> 1; class 2: 1
    assert multi["mAP"] == pytest.approx(1.0)
    assert multi["num_classes_with_positives"] == 3
    assert multi["mAUC"] == pytest.approx(mean_auc(scores, targets).auc)


@pytest.mark.parametrize("block", [1, 4, 7, 37, 100])
def test_block_ranks_equal_full_matrix(block):
    rng = np.random.default_rng(block)
    a = rng.standard_normal((37, 8))
    v = a + 0.8 * rng.standard_normal((37, 8))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    sim = a @ v.T
    for q, items, s in ((a, v, sim), (v, a, sim.T)):
        ranks = retrieval_ranks(q, items, block)
        want = retrieval_metrics(s)
        assert summarize_ranks(ranks) == pytest.approx(want)
        # the rank itself: 1 + items strictly above the correct one
        np.testing.assert_array_equal(ranks, (s > np.diag(s)[:, None]).sum(1) + 1)
    metrics, _ = retrieval_report(a, v, block)
    assert metrics["audio_to_visual"] == pytest.approx(retrieval_metrics(sim))
    assert metrics["visual_to_audio"] == pytest.approx(retrieval_metrics(sim.T))


def test_block_ranks_exact_ties():
    # integer embeddings: products are exact, so ties are real ties (optimistic rule)
    a = np.array([[1, 0], [1, 0], [0, 1], [1, 1], [2, 0]], dtype=np.float64)
    v = np.array([[1, 0], [1, 0], [1, 1], [0, 1], [1, 0]], dtype=np.float64)
    # hand-computed: sim rows a.v ->
    # q0 [1,1,1,0,1] correct 1 -> rank 1; q1 same row, correct 1 -> 1; q2 [0,0,1,1,0] correct 1 -> 1
    # q3 [1,1,2,1,1] correct 1 -> rank 2; q4 [2,2,2,0,2] correct 2 -> 1
    for block in (1, 2, 5):
        np.testing.assert_array_equal(retrieval_ranks(a, v, block), [1, 1, 1, 2, 1])
    assert summarize_ranks(retrieval_ranks(a, v, 2)) == retrieval_metrics(a @ v.T)


# -- the evaluation loop ------------------------------------------------------------------------
def test_evaluate_reference_json_matches_direct_metrics(files, pipe, direct):
    data = cl.read_dataset_json(files["json"])
    seen = []
    result = ev.evaluate(
        pipe, data, batch_size=2, workers=2, progress=lambda it, total: (seen.append(total), it)[1]
    )
    assert seen == [len(CLIP_LABELS)]
    assert result.ok and result.num_evaluated == len(CLIP_LABELS) and not result.failures
    assert result.task == "multi-label" and result.mode == "av"
    np.testing.assert_allclose(result.scores, direct["probs"], atol=1e-5)
    np.testing.assert_array_equal(result.targets, direct["targets"])
    want = mean_average_precision(direct["probs"], direct["targets"])
    assert result.classification["mAP"] == pytest.approx(want.map, abs=1e-6)
    assert result.classification["mAUC"] == pytest.approx(
        mean_auc(direct["probs"], direct["targets"]).auc, abs=1e-6
    )
    sim = direct["ea"].astype(np.float64) @ direct["ev"].astype(np.float64).T
    assert result.retrieval["audio_to_visual"] == pytest.approx(retrieval_metrics(sim))
    assert result.retrieval["visual_to_audio"] == pytest.approx(retrieval_metrics(sim.T))
    d = json.loads(json.dumps(result.to_dict()))
    assert d["num_failed"] == 0 and d["classification"]["mAP"] == pytest.approx(want.map, abs=1e-6)


def test_bad_items_are_skipped_and_reported(files, pipe, direct, tmp_path):
    root = files["json"].parent
    entries = json.loads(files["json"].read_text())["data"]
    for e in entries:  # absolute paths, so the new JSON can live elsewhere
        e["wav"] = str(root / e["wav"])
        e["video_path"] = str(root / e["video_path"])
    broken_jpg = tmp_path / "frames"
    for i in range(NUM_FRAMES):
        (broken_jpg / f"frame_{i}").mkdir(parents=True)
        (broken_jpg / f"frame_{i}" / "clip_x.jpg").write_bytes(b"not a jpeg")
    bad = [
        {
            "video_id": "clip_nowav",
            "wav": str(tmp_path / "gone.wav"),
            "video_path": str(root / "frames"),
            "labels": "/m/dog",
        },
        {
            "video_id": "clip_x",
            "wav": entries[0]["wav"],
            "video_path": str(broken_jpg),
            "labels": "/m/cat",
        },
        {
            "video_id": "clip_a",
            "wav": entries[0]["wav"],
            "video_path": str(root / "frames"),
            "labels": "/m/unknown",
        },
        {"labels": "/m/dog"},
    ]
    data_path = tmp_path / "mixed.json"
    data_path.write_text(json.dumps({"data": entries[:2] + bad + entries[2:]}))
    failures = []
    result = ev.evaluate(
        pipe, cl.read_dataset_json(data_path), batch_size=3, on_failure=failures.append
    )
    assert not result.ok
    assert [f.id for f in result.failures] == ["clip_nowav", "clip_x", "clip_a", "#5"]
    assert {f.id for f in failures} == {f.id for f in result.failures}
    reasons = " | ".join(f.reason for f in result.failures)
    assert "gone.wav" in reasons and "clip_x.jpg" in reasons and "unknown label" in reasons
    assert result.ids == list(CLIP_LABELS)
    want = mean_average_precision(direct["probs"], direct["targets"])
    assert result.classification["mAP"] == pytest.approx(want.map, abs=1e-6)
    assert result.to_dict()["num_failed"] == 4


def test_all_labels_unknown_is_a_user_mistake(files, pipe, tmp_path):
    other = tmp_path / "other.csv"
    other.write_text("index,mid,display_name\n" + "".join(f"{i},/m/x{i},X{i}\n" for i in range(4)))
    with pytest.raises(DatasetError, match="none of the"):
        ev.evaluate(pipe, cl.read_dataset_json(files["json"]), label_set=read_label_csv(other))
    wrong_size = tmp_path / "three.csv"
    wrong_size.write_text("index,mid,display_name\n0,/m/a,A\n1,/m/b,B\n2,/m/c,C\n")
    with pytest.raises(CavmaeError, match="3 classes but the model has 4"):
        ev.model_label_set(pipe, wrong_size)


def test_modes_retrieval_only_and_block_path(files, pipe, direct):
    data = cl.read_dataset_json(files["json"])
    audio_only = ev.evaluate(pipe, data, mode="audio", retrieval=False)
    assert audio_only.retrieval is None and audio_only.mode == "audio"
    audio, _ = reference_inputs(files["json"])
    want = mean_average_precision(pipe.classify_batch(audio, None, "audio"), direct["targets"])
    assert audio_only.classification["mAP"] == pytest.approx(want.map, abs=1e-6)

    ret = ev.evaluate(pipe, data, classification=False, block=2)
    assert ret.classification is None and ret.scores is None
    sim = direct["ea"].astype(np.float64) @ direct["ev"].astype(np.float64).T
    assert ret.retrieval["audio_to_visual"] == pytest.approx(retrieval_metrics(sim))
    assert ret.retrieval["visual_to_audio"] == pytest.approx(retrieval_metrics(sim.T))
    np.testing.assert_array_equal(
        ret.ranks["audio_to_visual"], (sim > np.diag(sim)[:, None]).sum(1) + 1
    )

    mean = ev.evaluate(pipe, data, classification=False, retrieval_frame="mean")
    _, frames = reference_inputs(files["json"])
    ev_mean = pipe.embed_frames(frames, "mean").astype(np.float64)
    sim = direct["ea"].astype(np.float64) @ ev_mean.T
    assert mean.retrieval["audio_to_visual"] == pytest.approx(retrieval_metrics(sim))
    with pytest.raises(CavmaeError, match="nothing to evaluate"):
        ev.evaluate(pipe, data, classification=False, retrieval=False)


def test_single_label_and_pretrain_decisions(files, pipe, tmp_path):
    from cavmae.runtime import Pipeline

    single_labels = dict(
        zip(CLIP_LABELS, ["/m/dog", "/m/cat", "/m/speech", "/m/dog", "/m/music"], strict=True)
    )
    data_path = tmp_path / "single.json"
    entries = json.loads(files["json"].read_text())["data"]
    root = files["json"].parent
    for e in entries:
        e["labels"] = single_labels[e["video_id"]]
        e["wav"], e["video_path"] = str(root / e["wav"]), str(root / e["video_path"])
    data_path.write_text(json.dumps({"data": entries}))
    single = Pipeline(pipe.engine)
    single.manifest = pipe.manifest.replace(task="single-label")
    result = ev.evaluate(single, cl.read_dataset_json(data_path), retrieval=False)
    audio, frames = reference_inputs(data_path)
    probs = pipe.classify_batch(audio, frames)
    truth = multi_hot(list(single_labels.values())).argmax(1)
    assert result.classification["accuracy"] == pytest.approx(accuracy(probs, truth))
    assert "mAP" not in result.classification

    pretrain = Pipeline(pipe.engine)
    pretrain.manifest = pipe.manifest.replace(model_kind="pretrain")
    out = ev.evaluate(pretrain, cl.read_dataset_json(data_path))
    assert out.classification is None and out.retrieval is not None
    assert any("pre-training" in n for n in out.notes)
    with pytest.raises(ModelKindError):
        ev.evaluate(pretrain, cl.read_dataset_json(data_path), classification=True)


def test_video_folder_with_labels_file(files, pipe, tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    paths = [
        make_media(folder / f"v{k}.mp4", duration=1.0, fps=10, tones=(300.0 + 200 * k,))
        for k in range(3)
    ]
    make_text_file(folder / "broken.mp4")
    (folder / "labels.csv").write_text(
        'file,labels\nv0.mp4,Dog;Music\nv1,"Male speech, man speaking"\n'
        f"{folder.name}/v2.mp4,/m/cat\nbroken,Dog\nnot_there.mp4,Cat\n"
    )
    labels_path = tmp_path / "labels.csv"
    labels_path.write_text((folder / "labels.csv").read_text())  # path keys relative to this file
    data = cl.read_video_files(sorted(folder.glob("*.mp4")), labels_path)
    result = ev.evaluate(pipe, data, batch_size=2)
    assert [f.id for f in result.failures] == ["broken"]
    assert result.ids == ["v0", "v1", "v2"]
    clips = [load_clip(p, num_frames=NUM_FRAMES) for p in paths]
    audio = np.stack([c.audio for c in clips])
    frames = np.stack([c.frames for c in clips])
    targets = np.array([[1, 0, 0, 1], [0, 0, 1, 0], [0, 1, 0, 0]])
    np.testing.assert_array_equal(result.targets, targets)
    probs = pipe.classify_batch(audio, frames)
    assert result.classification["mAP"] == pytest.approx(
        mean_average_precision(probs, targets).map, abs=1e-6
    )
    sim = (
        pipe.embed_audio(audio).astype(np.float64) @ pipe.embed_frames(frames).astype(np.float64).T
    )
    assert result.retrieval["visual_to_audio"] == pytest.approx(retrieval_metrics(sim.T))

    # without a labels file: retrieval only, with a note
    unlabelled = ev.evaluate(pipe, cl.read_video_files(paths))
    assert unlabelled.classification is None and unlabelled.ok
    assert any("no labels" in n for n in unlabelled.notes)


def test_a_clip_only_retrieval_cannot_use_is_still_classified(pipe, tmp_path):
    """Audio-mode classification on a folder where one clip has no video: that clip is
    classified, and retrieval runs on the others (its rows named by ``retrieval_ids``)."""
    folder = tmp_path / "videos"
    folder.mkdir()
    paths = [make_media(folder / f"v{k}.mp4", duration=1.0, fps=10, tones=(300.0 + 200 * k,)) for k in range(3)]
    sound = make_media(folder / "sound.mp4", duration=1.0, with_video=False, tones=(900.0,))
    (folder / "labels.csv").write_text("file,labels\nv0.mp4,Dog\nv1.mp4,Cat\nv2.mp4,Music\nsound.mp4,Dog\n")
    data = cl.read_video_files([*paths, sound], folder / "labels.csv")
    result = ev.evaluate(pipe, data, mode="audio", batch_size=3)
    assert result.ok and result.ids == ["v0", "v1", "v2", "sound"]
    assert result.scores.shape[0] == 4 and result.retrieval_ids == ["v0", "v1", "v2"]
    assert [i for i, _ in result.classified_only] == ["sound"] and "no video" in result.classified_only[0][1]
    assert any("left out of retrieval" in n for n in result.notes)
    clips = [load_clip(p, num_frames=NUM_FRAMES) for p in paths]
    audio = np.stack([c.audio for c in clips])
    sim = pipe.embed_audio(audio).astype(np.float64) @ pipe.embed_frames(np.stack([c.frames for c in clips])).astype(np.float64).T
    assert result.retrieval["audio_to_visual"] == pytest.approx(retrieval_metrics(sim))
    every = np.concatenate([audio, load_clip(sound, need_video=False).audio[None]])
    np.testing.assert_allclose(result.scores, pipe.classify_batch(every, None, "audio"), atol=1e-6)
    with np.load(result.save_predictions(tmp_path / "p.npz")) as z:
        assert list(z["retrieval_ids"]) == ["v0", "v1", "v2"] and z["audio_embeddings"].shape[0] == 3
    assert result.to_dict()["classified_only"][0]["id"] == "sound"
    # av classification needs the video too: there the clip fails, as before
    av = ev.evaluate(pipe, data, batch_size=3)
    assert [f.id for f in av.failures] == ["sound"] and av.retrieval_ids is None


def test_save_predictions(files, pipe, tmp_path):
    result = ev.evaluate(pipe, cl.read_dataset_json(files["json"]), batch_size=4)
    path = result.save_predictions(tmp_path / "out" / "pred.npz")
    with np.load(path) as z:
        assert list(z["ids"]) == list(CLIP_LABELS)
        np.testing.assert_array_equal(z["scores"], result.scores)
        np.testing.assert_array_equal(z["targets"], result.targets)
        assert list(z["label_names"]) == [n for _, n in LABEL_ROWS]
        assert z["audio_embeddings"].shape == (len(CLIP_LABELS), TINY.embed_dim)
        assert z["ranks_visual_to_audio"].shape == (len(CLIP_LABELS),)


def test_labels_file_naming_no_video_is_a_user_mistake(tmp_path):
    video = make_text_file(tmp_path / "a.mp4")
    labels = tmp_path / "labels.csv"
    labels.write_text("other.mp4,Dog\n")
    with pytest.raises(DatasetError, match="none of the 1 videos"):
        cl.read_video_files([video], labels)


def test_empty_label_strings_are_unlabelled(files, pipe, tmp_path):
    """``"labels": ""`` on every entry is an unlabelled dataset (classification off with the
    note, retrieval on every clip), not a classification of 0 positive classes; in a labelled
    dataset such an entry is a clip without labels, reported like one without the key."""
    entries = json.loads(files["json"].read_text())["data"]
    root = files["json"].parent
    for e in entries:
        e["wav"], e["video_path"] = str(root / e["wav"]), str(root / e["video_path"])
    empty = [{**e, "labels": ""} for e in entries]
    data_path = tmp_path / "empty.json"
    data_path.write_text(json.dumps({"data": empty}))
    result = ev.evaluate(pipe, cl.read_dataset_json(data_path))
    assert result.classification is None and result.ok and result.retrieval is not None
    assert any(n.startswith("classification off: the dataset has no labels") for n in result.notes)
    assert result.ids == [e["video_id"] for e in entries]
    with pytest.raises(DatasetError, match="classification needs labels"):
        ev.evaluate(pipe, cl.read_dataset_json(data_path), classification=True)

    mixed_path = tmp_path / "mixed-empty.json"
    mixed_path.write_text(json.dumps({"data": [empty[0], *entries[1:]]}))
    mixed = ev.evaluate(pipe, cl.read_dataset_json(mixed_path), retrieval=False)
    assert [(f.id, f.reason) for f in mixed.failures] == [(entries[0]["video_id"], "the dataset entry's 'labels' is empty")]
    assert mixed.classification is not None and mixed.ids == [e["video_id"] for e in entries[1:]]
