"""Training loops: configs, schedule, run directory, checkpoints, resumption, modes, CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from cavmae.checkpoint import load_checkpoint, read_state_dict
from cavmae.cli.main import cli
from cavmae.train import (
    FinetuneConfig,
    MultiStepWarmup,
    PretrainConfig,
    TrainConfigError,
    average_checkpoints,
    finetune,
    pretrain,
)
from synthetic_av import make_synthetic_dataset

_CLI = [sys.executable, "-c", "from cavmae.cli.main import main; main()"]
CAVMAE_BIN = shutil.which("cavmae", path=str(Path(sys.executable).parent)) or "cavmae"


def _cavmae(*args: str) -> subprocess.CompletedProcess:
    """The real console script, without progress bars."""
    env = {**os.environ, "CAVMAE_NO_PROGRESS": "1"}
    return subprocess.run([CAVMAE_BIN, *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("train_data"), num_classes=4, splits={"train": 4, "val": 2}, seconds=1.0
    )


def _pre(ds, out, **kw) -> PretrainConfig:
    base = dict(
        train_data=str(ds.splits["train"]), output_dir=str(out), model="tiny", epochs=3, batch_size=4,
        lr=1e-3, num_workers=0, progress=False, log_every=1, seed=5, mixup=0.5, freqm=8, timem=30,
        device="cpu",  # the bitwise checks hold on the CPU; the GPU test below asks for cuda
    )
    return PretrainConfig(**{**base, **kw})


def _ft(ds, out, init=None, **kw) -> FinetuneConfig:
    base = dict(
        train_data=str(ds.splits["train"]), val_data=str(ds.splits["val"]), label_csv=str(ds.label_csv),
        output_dir=str(out), model="tiny", init_checkpoint=str(init) if init else None, epochs=3,
        batch_size=4, lr=1e-3, head_lr=10, loss="CE", num_workers=0, progress=False, log_every=1, seed=5,
        freqm=8, timem=30, wa_start=2, device="cpu",
    )
    return FinetuneConfig(**{**base, **kw})


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _epochs(run_dir: Path) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    out = []
    for line in lines:
        rec = json.loads(line)
        rec.pop("time_s", None)
        out.append(rec)
    return out


@pytest.fixture(scope="module")
def reference(ds, tmp_path_factory):
    """Uninterrupted pre-training and fine-tuning runs to compare resumed runs with."""
    root = tmp_path_factory.mktemp("reference")
    pre = pretrain(_pre(ds, root / "pre"))
    ft = finetune(_ft(ds, root / "ft", init=root / "pre" / "final.pth"))
    return root, pre, ft


# -- configs -----------------------------------------------------------------------------------


def test_config_files_and_overrides(tmp_path):
    data = {"train_data": "t.json", "output_dir": "run", "epochs": 7, "betas": [0.9, 0.99],
            "model_config": {"num_heads": 2}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "c.json").write_text(json.dumps(data))
    for name in ("c.yaml", "c.json"):
        cfg = FinetuneConfig.from_file(tmp_path / name, lr=3e-4)
        assert (cfg.epochs, cfg.lr, cfg.betas, cfg.model_config) == (7, 3e-4, (0.9, 0.99), {"num_heads": 2})
        assert cfg.mixup == 0.5 and cfg.head_lr == 50.0  # recipe defaults kept
    pre = PretrainConfig.from_dict(data)
    assert pre.norm_pix_loss and pre.contrast_loss_weight == 0.01 and not pre.trainable_pos_embed
    assert PretrainConfig.from_dict(pre.to_dict()) == pre


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"bogus": 1}, "unknown"),
        ({"epochs": 0}, "epochs"),
        ({"mask_mode": "diagonal"}, "mask_mode"),
        ({"precision": "fp8"}, "precision"),
        ({"model": "huge"}, "model"),
        ({"mixup": 2.0}, "mixup"),
        ({"lr_decay": -1.0}, "lr_decay"),
        ({"warmup_steps": -5}, "warmup_steps"),
        ({"eval_every": 0}, "eval_every"),
        ({"num_workers": -1}, "num_workers"),
        ({"betas": [2.0, 0.99]}, "betas"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"mask_ratio_v": 0.0}, "mask_ratio_v"),
    ],
)
def test_config_errors(changes, message):
    with pytest.raises(TrainConfigError, match=message):
        PretrainConfig.from_dict({"train_data": "t", "output_dir": "o", **changes}).validate()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"lr": "nan"}, "lr must be a finite number, got nan"),
        ({"lr": "-inf"}, "lr must be a finite number, got -inf"),
        ({"weight_decay": "inf"}, "weight_decay must be a finite number, got inf"),
        ({"lr_decay": "nan"}, "lr_decay must be a finite number"),
        ({"betas": ["nan", 0.9]}, "betas must be finite numbers"),
        ({"mixup_alpha": "inf"}, "mixup_alpha must be a finite number"),
        ({"mask_ratio_a": "nan"}, "mask_ratio_a must be a finite number"),
        ({"contrast_loss_weight": "nan"}, "contrast_loss_weight must be a finite number"),
        ({"mae_loss_weight": -1}, "mae_loss_weight must be >= 0"),
        ({"model_config": {"embed_dim": 7}}, "model_config.embed_dim must be a multiple of 4"),
        ({"model_config": {"embed_dim": 12, "num_heads": 5}}, "embed_dim 12 must be divisible by num_heads 5"),
        ({"model_config": {"decoder_num_heads": 3}}, "decoder_embed_dim 32 must be divisible by decoder_num_heads 3"),
        ({"model_config": {"num_heads": 0}}, "model_config.num_heads must be >= 1"),
        ({"model_config": {"mlp_ratio": "nan"}}, "model_config.mlp_ratio must be a finite number"),
        ({"model_config": {"patch_size": 200}}, "num_mel_bins 128 is smaller than one patch"),
        ({"model_config": {"embed_dim": 1e9}}, "model_config.embed_dim must be <= 8192"),  # not terabytes
        ({"model_config": {"embed_dim": True}}, "model_config.embed_dim: expected an integer, got True"),
        ({"init_checkpoint": "x.pth", "model_config": {"mlp_ratio": 1e300}}, "mlp_ratio must be <= 64"),
        # with a checkpoint to start from, the overrides' own ranges are checked at once
        ({"init_checkpoint": "x.pth", "model_config": {"layer_norm_eps": "inf"}}, "layer_norm_eps"),
    ],
)
def test_config_numbers_that_cannot_train(changes, message):
    """NaN and infinities fail every comparison, so each range check would let them through;
    a model config the model cannot be built from is refused before anything starts."""
    with pytest.raises(TrainConfigError, match=f"^invalid pretrain config: .*{message}"):
        PretrainConfig.from_dict({"train_data": "t", "output_dir": "o", "model": "tiny", **changes}).validate()
    with pytest.raises(TrainConfigError, match="head_lr must be a finite number"):
        FinetuneConfig(train_data="t", output_dir="o", label_csv="l", head_lr=float("nan")).validate()
    # one line per field: the NaN is not reported again by the field's own range check
    with pytest.raises(TrainConfigError) as e:
        PretrainConfig(train_data="t", output_dir="o", lr_decay=float("nan")).validate()
    assert str(e.value).count("lr_decay") == 1


def test_cli_bad_numbers_are_one_line(ds, tmp_path):
    common = ["--train-data", str(ds.splits["train"]), "--model", "tiny", "--num-workers", "0",
              "--no-progress"]
    for args in (["finetune", "--label-csv", str(ds.label_csv), "--lr", "nan"],
                 ["pretrain", "--model-config", '{"embed_dim": 7}']):
        out = tmp_path / args[0]
        res = CliRunner().invoke(cli, [*args, *common, "-o", str(out)])
        assert res.exit_code == 2, res.output
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"Error: invalid {args[0]} config: "), res.output
        assert not out.exists()  # refused before the run directory was made


def test_cross_entropy_refuses_multi_label_data(ds, tmp_path):
    data = json.loads(Path(ds.splits["train"]).read_text())
    mids = [row.split(",")[1] for row in Path(ds.label_csv).read_text().splitlines()[1:3]]
    data["data"][0]["labels"] = ",".join(mids)  # two classes on one clip
    (tmp_path / "multi.json").write_text(json.dumps(data))
    with pytest.raises(TrainConfigError, match="loss CE trains single-label data.*--loss BCE"):
        finetune(_ft(ds, tmp_path / "run", train_data=str(tmp_path / "multi.json"), epochs=1, wa_start=1))


def test_finetune_config_errors():
    with pytest.raises(TrainConfigError, match="label_csv"):
        FinetuneConfig(train_data="t", output_dir="o").validate()
    with pytest.raises(TrainConfigError, match="wa_start"):
        FinetuneConfig(train_data="t", output_dir="o", label_csv="l", epochs=3, wa_start=5).validate()
    with pytest.raises(TrainConfigError, match="mode"):
        FinetuneConfig(train_data="t", output_dir="o", label_csv="l", mode="both").validate()
    with pytest.raises(TrainConfigError, match="head_lr"):
        FinetuneConfig(train_data="t", output_dir="o", label_csv="l", head_lr=-1).validate()


def test_schedule_matches_multisteplr():
    for start, step in ((2, 1), (10, 5), (5, 1)):
        p = torch.nn.Parameter(torch.zeros(1))
        ref_opt = torch.optim.Adam([p], lr=1.0)
        ref = torch.optim.lr_scheduler.MultiStepLR(ref_opt, list(range(start, 1000, step)), gamma=0.5)
        opt = torch.optim.Adam([{"params": [p], "lr": 1.0}, {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 10.0}])
        ours = MultiStepWarmup(opt, start, step, 0.5, warmup_steps=0)
        for epoch in range(1, 30):
            ours.apply(epoch, 1000)
            assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"])
            assert opt.param_groups[1]["lr"] == pytest.approx(10 * ref_opt.param_groups[0]["lr"])
            ref_opt.step()
            ref.step()
    warm = MultiStepWarmup(torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=2.0), 2, 1, 0.5, 4)
    assert [warm.factor(1, s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_learned_tokens_get_an_untruncated_normal_init():
    """MAE's init of learned tokens is normal(std=0.02): timm's trunc_normal_ cuts at +-2 in
    absolute terms, so the name says normal, and values beyond two std occur."""
    from cavmae.layers import normal_init

    torch.manual_seed(0)
    p = torch.empty(100_000)
    normal_init(p)
    assert float(p.std()) == pytest.approx(0.02, rel=0.02)
    assert float(p.abs().max()) > 2 * 0.02  # an init truncated at two std has none


# -- run directory and checkpoints -------------------------------------------------------------


def test_pretrain_run_directory(ds, reference):
    root, result, _ = reference
    run = root / "pre"
    assert result.completed and result.epoch == 3 and result.global_step == 12
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "metrics.jsonl", "state.pt", "result.json", "final.pth",
            "model.1.pth", "model.2.pth", "model.3.pth"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    records = _epochs(run)
    steps = [r for r in records if r["event"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 13))
    for key in ("loss", "loss_mae", "loss_mae_a", "loss_mae_v", "loss_c", "c_acc", "lr"):
        assert key in steps[0]
    assert [r["epoch"] for r in records if r["event"] == "epoch"] == [1, 2, 3]
    # reference loader: a module.-prefixed plain state dict that DataParallel accepts
    raw = torch.load(run / "final.pth", map_location="cpu", weights_only=True)
    assert all(k.startswith("module.") for k in raw)
    model = load_checkpoint(run / "final.pth")
    _assert_same_weights(model.state_dict(), result.model.state_dict())
    # the training state is a checkpoint too
    _assert_same_weights(load_checkpoint(run / "state.pt").state_dict(), model.state_dict())
    # frozen position embeddings (pre-training default) did not move
    assert torch.equal(model.pos_embed_a, load_checkpoint(run / "model.1.pth").pos_embed_a)
    # epoch checkpoints differ from each other
    assert not torch.equal(read_state_dict(run / "model.1.pth")[0]["norm.weight"], model.norm.weight)


def test_finetune_run_directory_and_weight_average(ds, reference):
    root, _, result = reference
    run = root / "ft"
    assert result.completed
    assert result.averaged_checkpoint == run / "wa.pth"
    wa = average_checkpoints([run / "model.2.pth", run / "model.3.pth"])
    manual = {k: (read_state_dict(run / "model.2.pth")[0][k] + read_state_dict(run / "model.3.pth")[0][k]) / 2
              for k in wa}
    for k in wa:
        torch.testing.assert_close(wa[k], manual[k])
    _assert_same_weights(load_checkpoint(run / "wa.pth").state_dict(), result.model.state_dict())
    fm = result.final_metrics
    assert fm["model"] == "wa" and fm["frame_aggregation"] and fm["num_clips"] == 8
    assert 0.0 <= fm["acc"] <= 1.0 and 0.0 <= fm["mAP"] <= 1.0
    records = _epochs(run)
    epochs = [r for r in records if r["event"] == "epoch"]
    assert {"train_loss", "val_loss", "val_mAP", "val_acc", "lr"} <= epochs[0].keys()
    assert records[-1]["event"] == "final"
    # fine-tuning trains the position embeddings by default; the head got head_lr x lr
    first = load_checkpoint(run / "model.1.pth")
    pre = load_checkpoint(root / "pre" / "final.pth")
    assert not torch.equal(first.pos_embed_a, pre.pos_embed_a)
    assert epochs[0]["lr"] == pytest.approx(1e-3)
    summary = json.loads((run / "result.json").read_text())
    assert summary["final_metrics"]["acc"] == pytest.approx(fm["acc"])


def test_finetuned_checkpoints_carry_the_class_names(ds, reference):
    """Every file a fine-tuning run writes names its classes (from the label CSV), mode and task, read without
    torch; what pre-training writes names none; the reference recipe still loads them."""
    from cavmae.checkpoint_keys import peek_metadata
    from cavmae.labels import LabelSet, read_label_csv

    root, _, _ = reference
    expected = read_label_csv(ds.label_csv)
    from cavmae.checkpoint_keys import TrainedHead, embedded_head

    for name in ("model.1.pth", "model.3.pth", "wa.pth", "final.pth", "state.pt"):
        meta = peek_metadata(root / "ft" / name)
        assert meta is not None and LabelSet.from_meta(meta.get("labels")) == expected, name
        # the run's mode and loss (CE: single-label) travel too: classify serves them, no flags
        assert embedded_head(root / "ft" / name) == TrainedHead(expected, "multimodal", "single-label"), name
    assert "labels" not in (peek_metadata(root / "pre" / "final.pth") or {"labels": None})
    raw = torch.load(root / "ft" / "wa.pth", map_location="cpu", weights_only=True)
    assert all(k.startswith("module.") for k in raw)


# -- resumption --------------------------------------------------------------------------------


def test_resume_after_stop_gives_the_same_run(ds, reference, tmp_path):
    root, pre_ref, ft_ref = reference
    # stop mid-epoch 2, resume (with a data-loader worker this time: nothing depends on it)
    cfg = _pre(ds, tmp_path / "pre", max_steps=6)
    first = pretrain(cfg)
    assert not first.completed and first.global_step == 6
    resumed = pretrain(cfg.replace(max_steps=None, num_workers=1))
    assert resumed.completed and resumed.global_step == 12
    _assert_same_weights(resumed.model.state_dict(), pre_ref.model.state_dict())
    assert _epochs(tmp_path / "pre") == _epochs(root / "pre")

    # fine-tuning stopped at an epoch boundary, then twice more
    cfg = _ft(ds, tmp_path / "ft", init=root / "pre" / "final.pth")
    for stop in (4, 5, None):
        out = finetune(cfg.replace(max_steps=stop))
    assert out.completed
    _assert_same_weights(out.model.state_dict(), ft_ref.model.state_dict())
    assert out.final_metrics == ft_ref.final_metrics
    assert _epochs(tmp_path / "ft") == _epochs(root / "ft")


def test_resume_after_sigkill(ds, reference, tmp_path):
    root, pre_ref, _ = reference
    cfg = _pre(ds, tmp_path / "killed", save_every_steps=1)
    (tmp_path / "pre.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    proc = subprocess.Popen([*_CLI, "pretrain", "-c", str(tmp_path / "pre.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = tmp_path / "killed" / "state.pt"
    deadline = time.time() + 300
    try:
        while not state.exists():
            if proc.poll() is not None:
                pytest.fail(f"training process ended early: {proc.stderr.read().decode()[-2000:]}")
            assert time.time() < deadline, "no state.pt written"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    training = torch.load(state, weights_only=True)["training"]
    assert not training["finished"] and training["global_step"] < 12
    resumed = pretrain(PretrainConfig.from_file(tmp_path / "pre.yaml"))
    assert resumed.completed and resumed.global_step == 12
    _assert_same_weights(resumed.model.state_dict(), pre_ref.model.state_dict())
    assert _epochs(tmp_path / "killed") == _epochs(root / "pre")


def test_resume_checks(ds, reference, tmp_path):
    cfg = _pre(ds, tmp_path / "run", max_steps=1, epochs=1)
    pretrain(cfg)
    with pytest.raises(TrainConfigError, match="lr"):
        pretrain(cfg.replace(lr=5e-4, max_steps=None))
    with pytest.raises(TrainConfigError, match="resume"):
        pretrain(cfg.replace(resume=False))
    with pytest.raises(TrainConfigError, match="pretrain run"):
        finetune(_ft(ds, tmp_path / "run", epochs=1, wa_start=1))
    # a finished run is not trained again
    done = pretrain(cfg.replace(max_steps=None))
    again = pretrain(cfg.replace(max_steps=None))
    assert again.completed and again.global_step == done.global_step == 4
    _assert_same_weights(again.model.state_dict(), done.model.state_dict())
    state = tmp_path / "run" / "state.pt"
    for damage in (b"garbage\n", state.read_bytes()[:1000]):  # overwritten, truncated
        state.write_bytes(damage)
        with pytest.raises(TrainConfigError, match=r"damaged.*--overwrite"):
            pretrain(cfg.replace(max_steps=None))


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_run_without_state_is_not_overwritten(ds, tmp_path):
    """A run directory whose state.pt is gone cannot be resumed; starting afresh over it would
    truncate its metrics, replace its checkpoints and leave later epochs' files mixed in. It is
    refused until the user chooses overwrite, which deletes only the run's own files."""
    run = tmp_path / "run"
    cfg = _pre(ds, run, epochs=2, log_every=100)
    pretrain(cfg)
    (run / "state.pt").unlink()
    (run / "notes.txt").write_text("mine")  # not the run's: never refused over, never deleted
    (run / "init.pth").write_bytes(b"also mine")
    before = _files(run)
    with pytest.raises(TrainConfigError, match=r"earlier run .* no state\.pt .*--overwrite"):
        pretrain(cfg.replace(epochs=1))
    res = CliRunner().invoke(cli, ["pretrain", "--train-data", str(ds.splits["train"]), "-o", str(run),
                                   "--model", "tiny", "--epochs", "1", "--batch-size", "4",
                                   "--num-workers", "0", "--no-progress"])
    assert res.exit_code == 2 and res.output.startswith("Error: ") and len(res.output.splitlines()) == 1, res.output
    assert _files(run) == before
    # a folder holding only other files is no earlier run
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    assert pretrain(cfg.replace(output_dir=str(tmp_path / "other"), epochs=1, max_steps=1)).global_step == 1
    # overwrite: a fresh run of 1 epoch, nothing of the 2-epoch run left, the user's files kept
    done = pretrain(cfg.replace(epochs=1, overwrite=True))
    assert done.completed and done.global_step == 4
    names = {p.name for p in run.iterdir()}
    assert "model.2.pth" not in names and {"model.1.pth", "state.pt", "final.pth"} <= names
    assert (run / "notes.txt").read_text() == "mine" and (run / "init.pth").read_bytes() == b"also mine"
    assert [r["epoch"] for r in _epochs(run) if r["event"] == "epoch"] == [1]
    # a run stopped in its first epoch, before any save, has nothing to lose: it starts again
    first = tmp_path / "first"
    first.mkdir()
    (first / "config.json").write_text("{}")
    (first / "metrics.jsonl").write_text('{"event": "step", "step": 1}\n')
    assert pretrain(cfg.replace(output_dir=str(first), epochs=1, max_steps=1)).global_step == 1


def test_interrupt_while_saving_the_state(ds, tmp_path, monkeypatch):
    """Ctrl-C while state.pt is written: the CLI says "Interrupted." (exit 130), never an
    internal error, and state.pt stays whole: the earlier one when the save is abandoned, the
    new one when the save is finished first and the interrupt delivered after it."""
    import signal as signal_mod

    run = tmp_path / "run"
    cfg = _pre(ds, run, epochs=1, max_steps=1, log_every=100)
    pretrain(cfg)
    state = run / "state.pt"
    saved = state.read_bytes()
    real_save = torch.save

    def abandoned(obj, f, *args, **kwargs):  # Ctrl-C lands mid-write, as a second one would
        if Path(f).name.startswith(".state.pt."):
            Path(f).write_bytes(b"half a state")
            raise KeyboardInterrupt
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", abandoned)
    (tmp_path / "pre.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    res = CliRunner().invoke(cli, ["pretrain", "-c", str(tmp_path / "pre.yaml"), "--max-steps", "2"])
    assert res.exit_code == 130 and "Interrupted." in res.output, res.output
    assert "Internal error" not in res.output
    assert state.read_bytes() == saved and not [p for p in run.iterdir() if p.name.endswith(".tmp")]

    def interrupted(obj, f, *args, **kwargs):  # a real SIGINT arrives during the save
        if Path(f).name.startswith(".state.pt."):
            signal_mod.raise_signal(signal_mod.SIGINT)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", interrupted)
    previous = signal_mod.signal(signal_mod.SIGINT, signal_mod.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            pretrain(cfg.replace(max_steps=2))
    finally:
        signal_mod.signal(signal_mod.SIGINT, previous)
    assert torch.load(state, weights_only=True)["training"]["global_step"] == 2  # finished first


# -- modes ----------------------------------------------------------------------------------------


def test_linear_probe_audio_only(ds, reference, tmp_path):
    root, _, _ = reference
    init = root / "pre" / "final.pth"
    result = finetune(_ft(ds, tmp_path / "probe", init=init, mode="audioonly", freeze_backbone=True,
                          epochs=1, wa=False, loss="BCE", weight_csv=str(ds.weight_csv)))
    before = load_checkpoint(init, kind="classifier", num_classes=4).state_dict()
    after = result.model.state_dict()
    for k, v in before.items():
        if k.startswith("mlp_head."):
            assert not torch.equal(v, after[k]), k
        else:
            assert torch.equal(v, after[k]), k
    assert result.final_metrics["model"] == "best"
    assert result.final_metrics["frame_aggregation"] is False


def test_videoonly_from_scratch(ds, tmp_path):
    result = finetune(_ft(ds, tmp_path / "v", mode="videoonly", epochs=1, wa=False, val_data=None,
                          mixup=0.0))
    assert result.completed and result.final_metrics == {"model": "final"}
    assert (tmp_path / "v" / "final.pth").exists()


def test_train_on_video_files(tmp_path):
    from media_factory import make_media

    rows = ["video,labels"]
    for i, tone in enumerate((300.0, 500.0, 800.0, 1200.0)):
        make_media(tmp_path / f"v{i}.mp4", duration=1.0, fps=10, tones=(tone,))
        rows.append(f"v{i}.mp4,/m/c{i % 2}")
    (tmp_path / "videos.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "labels.csv").write_text("index,mid,display_name\n0,/m/c0,a\n1,/m/c1,b\n")
    common = dict(train_data=str(tmp_path / "videos.csv"), val_data=str(tmp_path / "videos.csv"), model="tiny",
                  epochs=1, batch_size=2, num_workers=0, progress=False)
    pre = pretrain(PretrainConfig(output_dir=str(tmp_path / "pre"), **common))
    ft = finetune(FinetuneConfig(output_dir=str(tmp_path / "ft"), label_csv=str(tmp_path / "labels.csv"),
                                 init_checkpoint=str(pre.final_checkpoint), loss="CE", **common))
    assert pre.completed and ft.completed and ft.final_metrics["num_clips"] == 4


# -- CLI ------------------------------------------------------------------------------------------


def test_cli_help_and_print_config(tmp_path):
    runner = CliRunner()
    for name in ("pretrain", "finetune", "prepare"):
        res = runner.invoke(cli, [name, "--help"])
        assert res.exit_code == 0, res.output
        assert "Example" in res.output
    (tmp_path / "c.yaml").write_text("train_data: a.json\nepochs: 4\nmodel_config: {num_heads: 2}\n")
    res = runner.invoke(cli, ["finetune", "-c", str(tmp_path / "c.yaml"), "--epochs", "9", "--no-noise",
                              "--betas", "0.9", "0.98", "--print-config"])
    assert res.exit_code == 0, res.output
    shown = json.loads(res.output)
    assert (shown["epochs"], shown["noise"], shown["betas"], shown["model_config"]) == (9, False, [0.9, 0.98], {"num_heads": 2})


def test_cli_errors_are_one_line(ds, tmp_path):
    res = CliRunner().invoke(cli, ["finetune", "--train-data", str(ds.splits["train"]), "-o", str(tmp_path)])
    assert res.exit_code == 2
    assert "label_csv is required" in res.output and "Traceback" not in res.output


def test_cli_pretrain_runs(ds, tmp_path):
    res = CliRunner().invoke(cli, [
        "pretrain", "--train-data", str(ds.splits["train"]), "--val-data", str(ds.splits["val"]),
        "-o", str(tmp_path / "run"), "--model", "tiny", "--epochs", "1", "--batch-size", "8",
        "--num-workers", "0", "--no-progress",
    ])
    assert res.exit_code == 0, res.output
    assert "epoch   1" in res.output and "val_c_acc" in res.output and "final:" in res.output


# -- GPU --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_gpu(ds, tmp_path, precision):
    pre = pretrain(_pre(ds, tmp_path / "pre", epochs=1, precision=precision, device="cuda"))
    st = torch.load(tmp_path / "pre" / "state.pt", weights_only=True)["training"]
    assert bool(st["scaler"]) == (precision == "fp16")
    assert next(pre.model.parameters()).is_cuda
    ft = finetune(_ft(ds, tmp_path / "ft", init=tmp_path / "pre" / "final.pth", epochs=2,
                      precision=precision, device="cuda"))
    assert ft.completed and 0.0 <= ft.final_metrics["acc"] <= 1.0
    # resuming on the GPU continues where it stopped
    cfg = _pre(ds, tmp_path / "again", epochs=1, precision=precision, device="cuda", max_steps=2)
    pretrain(cfg)
    again = pretrain(cfg.replace(max_steps=None))
    assert again.global_step == 4


# -- CLI: continuing runs, typed config files, required options ----------------------------------


def test_cli_max_steps_and_more_epochs_continue_exactly(ds, reference, tmp_path):
    """A stopped run says which change continues it; a finished run given more epochs trains on
    to them and ends bitwise as an uninterrupted run of that many epochs."""
    root, pre_ref, _ = reference
    config = tmp_path / "pre.yaml"
    config.write_text(yaml.safe_dump(_pre(ds, tmp_path / "run", epochs=2).to_dict()))
    r = _cavmae("pretrain", "-c", str(config), "--max-steps", "3")
    assert r.returncode == 0, r.stderr
    assert "stopped at step 3" in r.stdout and "larger --max-steps" in r.stdout
    assert "run the same command again" not in r.stdout
    r = _cavmae("pretrain", "-c", str(config), "--max-steps", "5")
    assert r.returncode == 0 and "stopped at step 5" in r.stdout, r.stderr
    r = _cavmae("pretrain", "-c", str(config))
    assert r.returncode == 0 and "done: 2 epochs, 8 steps" in r.stdout, r.stderr
    r = _cavmae("pretrain", "-c", str(config), "--epochs", "3")
    assert r.returncode == 0 and "done: 3 epochs, 12 steps" in r.stdout, r.stderr
    _assert_same_weights(read_state_dict(tmp_path / "run" / "final.pth")[0],
                         read_state_dict(root / "pre" / "final.pth")[0])
    assert _epochs(tmp_path / "run") == _epochs(root / "pre")
    # fewer epochs than the run has trained: one line saying what to give
    r = _cavmae("pretrain", "-c", str(config), "--epochs", "2")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and "epochs >= 3" in lines[0]


def test_cli_max_steps_from_a_config_file_names_the_file(ds, tmp_path):
    config = tmp_path / "pre.yaml"
    config.write_text(yaml.safe_dump(_pre(ds, tmp_path / "run", epochs=1, max_steps=1).to_dict()))
    r = _cavmae("pretrain", "-c", str(config))
    assert r.returncode == 0, r.stderr
    assert f"raise max_steps in {config}" in r.stdout and "finish all 1 epochs" in r.stdout


def test_cli_config_file_values_are_typed(tmp_path):
    # YAML 1.1 reads 1e-4 and 5e-7 as strings (a float needs a dot)
    config = tmp_path / "c.yaml"
    config.write_text("train_data: t.json\noutput_dir: run\nlr: 1e-4\nweight_decay: 5e-7\n"
                      "epochs: '4'\nbetas: ['0.9', 0.99]\nmodel_config: {num_heads: '2'}\n")
    assert yaml.safe_load(config.read_text())["lr"] == "1e-4"
    r = _cavmae("pretrain", "-c", str(config), "--print-config")
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["lr"] == 1e-4 and isinstance(shown["lr"], float) and shown["weight_decay"] == 5e-7
    assert shown["epochs"] == 4 and shown["betas"] == [0.9, 0.99] and shown["model_config"] == {"num_heads": 2}
    config.write_text("train_data: t.json\noutput_dir: run\nlr: fast\nmodel_config: {num_heads: two}\n")
    r = _cavmae("pretrain", "-c", str(config))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), r.stderr
    assert "lr: expected a number, got 'fast'" in lines[0]
    assert "model_config.num_heads: expected an integer, got 'two'" in lines[0]


def test_config_types_in_python():
    cfg = FinetuneConfig(train_data="t", output_dir="o", label_csv="l", lr="2e-5", wa_end="3")
    assert cfg.lr == 2e-5 and cfg.wa_end == 3
    with pytest.raises(TrainConfigError, match="epochs: expected an integer, got 2.5"):
        cfg.replace(epochs=2.5)
    with pytest.raises(TrainConfigError, match=r"betas: expected a list of 2 numbers"):
        PretrainConfig.from_dict({"betas": [0.9]})
    with pytest.raises(TrainConfigError, match="unknown model_config keys: bogus"):
        PretrainConfig.from_dict({"model_config": {"bogus": 1}})


def test_cli_finetune_help_marks_required_options():
    r = _cavmae("finetune", "--help")
    assert r.returncode == 0, r.stderr
    entries = {}
    for line in r.stdout.splitlines():
        if line.strip().startswith("--"):
            name = line.split()[0]
            entries[name] = line
        elif entries:
            entries[name] += " " + line.strip()
    assert "[required]" in entries["--label-csv"] and "None" not in entries["--label-csv"]
    assert "[required]" in entries["--train-data"] and "[required]" not in entries["--val-data"]
    r = _cavmae("pretrain", "--help")
    assert "[required]" not in " ".join(line for line in r.stdout.splitlines() if "--label-csv" in line)
