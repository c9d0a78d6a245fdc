"""Training runs against bad input: resuming with other labels, missing and corrupt clips,
odd config and state files, refused runs leaving no folder behind."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from test_train import _assert_same_weights, _ft, _pre

from cavmae.cli.main import cli
from cavmae.errors import CavmaeError, DatasetError
from cavmae.train import FinetuneConfig, PretrainConfig, TrainConfigError, finetune, pretrain
from synthetic_av import make_synthetic_dataset


@pytest.fixture
def ds(tmp_path):
    """4 training clips of 2 classes and 2 validation clips, this test's own to damage."""
    return make_synthetic_dataset(tmp_path / "data", num_classes=2, splits={"train": 2, "val": 1}, seconds=1.0)


def _entries(path: Path) -> list[dict]:
    return json.loads(path.read_text())["data"]


def _run(*args: str):
    """``cavmae ARGS`` in this process: (exit code, output lines)."""
    res = CliRunner().invoke(cli, list(args))
    return res.exit_code, res.output.strip().splitlines()


def _small(cfg, **kw):
    """One epoch of 2 steps of 2 clips (the smallest run that trains), then ``kw``."""
    fits = {"wa_start": 1} if isinstance(cfg, FinetuneConfig) else {}  # wa_start <= epochs
    return cfg.replace(**{"epochs": 1, "batch_size": 2, **fits, **kw})


# -- resuming a fine-tuning run with other labels -----------------------------------------------


def test_resume_with_other_labels_is_refused(ds, tmp_path):
    run = tmp_path / "run"
    cfg = _small(_ft(ds, run, max_steps=1))
    assert finetune(cfg).global_step == 1
    header, *rows = ds.label_csv.read_text().splitlines()
    swapped = tmp_path / "swapped.csv"  # the same two classes, the other way round
    swapped.write_text("\n".join([header, "0" + rows[1][1:], "1" + rows[0][1:]]) + "\n")
    with pytest.raises(TrainConfigError, match=r"started with other labels \(the same 2 classes in another "
                                               r"order\).* new output folder"):
        finetune(cfg.replace(label_csv=str(swapped), max_steps=None))
    more = tmp_path / "more.csv"  # a third class: another head size
    more.write_text(ds.label_csv.read_text() + '2,/m/extra,"extra"\n')
    config = tmp_path / "ft.yaml"
    config.write_text(yaml.safe_dump(cfg.replace(label_csv=str(more), max_steps=None).to_dict()))
    code, lines = _run("finetune", "-c", str(config))
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("Error: ") and "other labels (2 classes, now 3)" in lines[0]
    # the same labels in a moved file: the content counts, not the path
    moved = tmp_path / "elsewhere" / "labels.csv"
    moved.parent.mkdir()
    shutil.copy(ds.label_csv, moved)
    done = finetune(cfg.replace(label_csv=str(moved), max_steps=None))
    assert done.completed and done.global_step == 2


def test_resume_with_weights_of_another_model_is_one_line(ds, tmp_path):
    """A state without class names (older runs) and another head size: one line naming the
    mismatch, not PyTorch's load_state_dict error."""
    run = tmp_path / "run"
    cfg = _small(_ft(ds, run, max_steps=1))
    finetune(cfg)
    state = torch.load(run / "state.pt", weights_only=True)
    del state["cavmae"]["labels"]
    torch.save(state, run / "state.pt")
    more = tmp_path / "more.csv"
    more.write_text(ds.label_csv.read_text() + '2,/m/extra,"extra"\n')
    with pytest.raises(TrainConfigError, match=r"holds another model than this run builds \(mlp_head\.1\.weight "
                                               r"is \[2, \d+\] there, \[3, \d+\] here"):
        finetune(cfg.replace(label_csv=str(more), max_steps=None))


# -- missing files: found before the run starts ------------------------------------------------


def test_missing_files_are_refused_up_front(ds, tmp_path):
    data = _entries(ds.splits["train"])
    data[1]["wav"] = str(tmp_path / "nope.wav")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": data}))
    out = tmp_path / "run"
    code, lines = _run("pretrain", "--train-data", str(bad), "-o", str(out), "--model", "tiny",
                       "--batch-size", "2", "--num-workers", "0", "--no-progress")
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"Error: {bad}: 1 of its 4 clips name missing files ({tmp_path / 'nope.wav'})")
    assert not out.exists()  # refused before anything was made
    # frames: with the reference's fallback a lower frame stands in, frame_0 cannot be missing
    vid = data[2]["video_id"]
    (ds.root / "frames" / "frame_6" / f"{vid}.jpg").unlink()
    cfg = _small(_pre(ds, out, max_steps=1))
    assert pretrain(cfg).global_step == 1
    with pytest.raises(DatasetError, match=rf"1 of its 4 clips name missing files \(.*frame_6/{vid}\.jpg\)"):
        pretrain(cfg.replace(output_dir=str(tmp_path / "strict"), frame_fallback=False))
    (ds.root / "frames" / "frame_0" / f"{vid}.jpg").unlink()
    with pytest.raises(DatasetError, match=rf"name missing files \(.*frame_0/{vid}\.jpg\)"):
        pretrain(cfg.replace(output_dir=str(tmp_path / "other")))
    assert not (tmp_path / "strict").exists() and not (tmp_path / "other").exists()


def test_final_evaluation_frames_are_checked_up_front(ds, tmp_path):
    """The final evaluation reads all frames of each validation clip, without fallback: a
    missing one is found at the start, not after the training."""
    vid = _entries(ds.splits["val"])[0]["video_id"]
    (ds.root / "frames" / "frame_8" / f"{vid}.jpg").unlink()
    cfg = _small(_ft(ds, tmp_path / "run"))
    with pytest.raises(DatasetError, match=rf"val\.json: 1 of its 2 clips name missing files \(.*frame_8/{vid}"):
        finetune(cfg)
    assert not (tmp_path / "run").exists()
    assert finetune(cfg.replace(frame_aggregation=False, max_steps=1)).global_step == 1


@pytest.mark.parametrize("content", ["", '{"data": []}'])
def test_a_refused_dataset_leaves_no_folder(ds, tmp_path, content):
    (tmp_path / "d.json").write_text(content)
    out = tmp_path / "out" / "run"
    code, lines = _run("finetune", "--train-data", str(tmp_path / "d.json"), "--label-csv", str(ds.label_csv),
                       "-o", str(out), "--model", "tiny", "--num-workers", "0", "--no-progress")
    assert code == 2 and len(lines) == 1 and lines[0].startswith("Error: "), lines
    assert not (tmp_path / "out").exists()


def test_a_dataset_smaller_than_a_batch_leaves_no_folder(ds, tmp_path):
    with pytest.raises(TrainConfigError, match="4 samples per epoch, fewer than one batch of 8"):
        pretrain(_small(_pre(ds, tmp_path / "run"), batch_size=8))
    assert not (tmp_path / "run").exists()


# -- clips that fail to load mid-run ----------------------------------------------------------


def test_corrupt_clips_are_replaced_and_recorded(ds, tmp_path, caplog):
    data = _entries(ds.splits["train"])
    Path(data[1]["wav"]).write_text("not audio")  # exists, does not decode
    bad_frame = ds.root / "frames" / "frame_3" / f"{data[2]['video_id']}.jpg"
    for i in range(10):  # every frame: whichever the random draw picks fails
        shutil.copy(data[1]["wav"], Path(str(bad_frame).replace("frame_3", f"frame_{i}")))
    runs = {}
    with caplog.at_level(logging.WARNING, logger="cavmae.train.loop"):
        for workers in (0, 1):  # in this process, and in a worker process
            cfg = _small(_pre(ds, tmp_path / f"w{workers}"), num_workers=workers, epochs=2)
            runs[workers] = pretrain(cfg)
            assert runs[workers].completed and runs[workers].global_step == 4
            skipped = (tmp_path / f"w{workers}" / "skipped.txt").read_text().splitlines()
            assert sorted(line.split(":")[0] for line in skipped) == sorted([data[1]["video_id"], data[2]["video_id"]])
            assert any("not a readable" in line for line in skipped)
    warned = [r.getMessage() for r in caplog.records if "took its place" in r.getMessage()]
    assert len(warned) == 4 and f"skipped clip {data[1]['video_id']}" in " ".join(warned)  # once a clip and run
    # what replaces a clip depends on the key and the bad clips only: not on worker processes
    _assert_same_weights(runs[0].model.state_dict(), runs[1].model.state_dict())


def test_an_unrecoverable_error_keeps_the_progress(ds, tmp_path):
    """Every clip failing (a disk gone) stops the run in one line, after saving where it stood;
    the run then continues exactly as if nothing had happened."""
    wavs = [Path(e["wav"]) for e in _entries(ds.splits["train"])]
    good = {p: p.read_bytes() for p in wavs}
    cfg = _small(_pre(ds, tmp_path / "run"), batch_size=1)
    reference = pretrain(cfg.replace(output_dir=str(tmp_path / "reference")))

    def break_disk(rec: dict) -> None:
        if rec["step"] == 2:
            for p in wavs:
                p.write_text("gone")

    with pytest.raises(DatasetError) as e:
        pretrain(cfg, on_step=break_disk)
    message = str(e.value)
    assert "\n" not in message and message.startswith("4 clips in a row failed to load")
    assert "the run is saved at epoch 1, step 2" in message and "run the same command again" in message
    assert torch.load(tmp_path / "run" / "state.pt", weights_only=True)["training"]["global_step"] == 2
    for p, b in good.items():
        p.write_bytes(b)
    resumed = pretrain(cfg)
    assert resumed.completed and resumed.global_step == 4
    _assert_same_weights(resumed.model.state_dict(), reference.model.state_dict())
    # from a worker process the message is the same one line (no DataLoader traceback in it)
    for p in wavs:
        p.write_text("gone")
    code, lines = _run("pretrain", "--train-data", str(ds.splits["train"]), "-o", str(tmp_path / "w"),
                       "--model", "tiny", "--batch-size", "2", "--num-workers", "1", "--no-progress")
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("Error: 4 clips in a row failed to load") and "saved at epoch 1, step 0" in lines[0]


def test_a_validation_failure_keeps_the_epoch(ds, tmp_path):
    val_wav = Path(_entries(ds.splits["val"])[0]["wav"])
    good = val_wav.read_bytes()
    val_wav.write_text("not audio")
    cfg = _small(_ft(ds, tmp_path / "run", frame_aggregation=False))
    with pytest.raises(CavmaeError, match="not a readable.*the run is saved at epoch 1, step 2"):
        finetune(cfg)
    training = torch.load(tmp_path / "run" / "state.pt", weights_only=True)["training"]
    assert (training["epoch"], training["step_in_epoch"], training["global_step"]) == (1, 2, 2)
    val_wav.write_bytes(good)
    done = finetune(cfg)  # validates the trained epoch, and ends
    assert done.completed and done.global_step == 2 and "val_acc" in done.history[-1]


# -- config and state files -------------------------------------------------------------------


def test_config_file_must_be_a_mapping(tmp_path):
    for text in ("[]", "[1, 2]", "just text", "3"):
        (tmp_path / "c.yaml").write_text(text)
        with pytest.raises(TrainConfigError, match="must be a mapping"):
            PretrainConfig.from_file(tmp_path / "c.yaml")
    (tmp_path / "c.yaml").write_text("# nothing set yet\n")  # an empty config
    assert PretrainConfig.from_file(tmp_path / "c.yaml", epochs=3).epochs == 3


def test_damaged_state_says_what_it_is(ds, tmp_path):
    run = tmp_path / "run"
    cfg = _small(_pre(ds, run, max_steps=1))
    pretrain(cfg)
    state = run / "state.pt"
    cases = {b"junk": "not a whole training state", b"": "it is empty"}
    buffer = tmp_path / "other.pt"
    torch.save({"some": torch.zeros(1)}, buffer)
    cases[buffer.read_bytes()] = "a PyTorch file, but not a cavmae training state"
    for content, what in cases.items():
        state.write_bytes(content)
        with pytest.raises(TrainConfigError) as e:
            pretrain(cfg.replace(max_steps=None))
        assert f"damaged and cannot be resumed from ({what}" in str(e.value)
        assert "--overwrite" in str(e.value) and "174812789" not in str(e.value)
