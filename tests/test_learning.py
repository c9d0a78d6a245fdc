"""Proof that the training core learns, on a synthetic audio-visual dataset (CI: < 3 minutes).

8 classes; each fixes a tone (pitch, rhythm) in the audio and a coloured shape in the frames,
and one per-clip variable moves both the pitch and the shape's size (``tests/synthetic_av.py``).
10 training and 4 held-out clips per class, in the reference layout.

1. Pre-train a tiny CAV-MAE briefly: on the held-out pairs, the contrastive accuracy (masked
   inputs, as the reference validates) rises well above chance (1/32), audio->visual retrieval
   finds the right class well above chance (1/8), and the reconstruction loss falls.
2. Fine-tune a classifier from it: held-out accuracy with 10-frame aggregation well above
   chance (1/8).
3. Export the classifier and run the ONNX Runtime pipeline: the same predictions as PyTorch.

The numbers are printed. Set CAVMAE_LEARNING_SEED to try other seeds.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from cavmae.data import AVDataset, collate, read_clips, read_labels
from cavmae.train import FinetuneConfig, PretrainConfig, finetune, predict_clips, pretrain
from synthetic_av import make_synthetic_dataset

SEED = int(os.environ.get("CAVMAE_LEARNING_SEED", "0"))
NUM_CLASSES = 8


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("learning")
    ds = make_synthetic_dataset(root / "data", num_classes=NUM_CLASSES, splits={"train": 10, "val": 4},
                                seconds=10.0, seed=SEED)
    common = dict(
        train_data=str(ds.splits["train"]), val_data=str(ds.splits["val"]), batch_size=16,
        eval_batch_size=32, num_workers=1, progress=False, seed=SEED, lr_decay_start=100,
        save_epoch_checkpoints=False,
    )
    pre_cfg = PretrainConfig(
        output_dir=str(root / "pre"), model="tiny", epochs=16, lr=2e-3, contrast_loss_weight=1.0,
        eval_at_start=True, eval_every=4, noise=False, **common,
    )
    pre = pretrain(pre_cfg)
    ft_cfg = FinetuneConfig(
        output_dir=str(root / "ft"), label_csv=str(ds.label_csv), init_checkpoint=str(pre.final_checkpoint),
        epochs=6, lr=1e-3, head_lr=10, loss="CE", mixup=0.0, freqm=24, timem=48, noise=False,
        wa_start=4, **common,
    )
    ft = finetune(ft_cfg)
    return ds, pre, ft


def _class_retrieval(model, ds) -> float:
    """Audio->visual top-1 retrieval on held-out clips, correct when the class matches."""
    clips = read_clips(ds.splits["val"])
    data = AVDataset(clips, frame="middle")
    batch = collate([data[i] for i in range(len(data))])
    model.eval()
    with torch.no_grad():
        a, v = model.embed(batch["audio"], batch["image"])
    classes = np.array([int(c.video_id.split("_")[1]) for c in clips])
    top = (a @ v.T).argmax(dim=1).numpy()
    return float((classes[top] == classes).mean())


def test_pretraining_learns(runs, capsys):
    ds, pre, _ = runs
    first, last = pre.history[0], pre.history[-1]
    assert first["epoch"] == 0 and last["epoch"] == 16
    class_ret = _class_retrieval(pre.model, ds)
    with capsys.disabled():
        print(
            f"\n[learning seed {SEED}] pre-training, held-out: contrastive acc "
            f"{first['val_c_acc']:.3f} -> {last['val_c_acc']:.3f} (chance {1 / 32:.3f}); "
            f"unmasked v->a R@1 {first['val_retrieval_v2a_r1']:.3f} -> {last['val_retrieval_v2a_r1']:.3f}; "
            f"a->v class retrieval {class_ret:.3f} (chance {1 / NUM_CLASSES:.3f}); "
            f"reconstruction loss {first['val_loss_mae']:.3f} -> {last['val_loss_mae']:.3f}"
        )
    assert last["val_c_acc"] >= 4 / 32
    assert last["val_c_acc"] >= first["val_c_acc"] + 2 / 32
    assert class_ret >= 3 / NUM_CLASSES
    assert last["val_loss_mae"] < 0.8 * first["val_loss_mae"]
    assert last["val_loss_mae_a"] < first["val_loss_mae_a"] and last["val_loss_mae_v"] < first["val_loss_mae_v"]


def test_finetuning_learns(runs, capsys):
    _, _, ft = runs
    acc = ft.final_metrics["acc"]
    per_epoch = [round(r["val_acc"], 3) for r in ft.history]
    with capsys.disabled():
        print(
            f"\n[learning seed {SEED}] fine-tuning, held-out accuracy per epoch (middle frame) "
            f"{per_epoch}; weight-averaged, 10-frame aggregation: acc {acc:.3f}, "
            f"mAP {ft.final_metrics['mAP']:.3f} (chance {1 / NUM_CLASSES:.3f})"
        )
    assert ft.final_metrics["model"] == "wa" and ft.final_metrics["frame_aggregation"]
    assert acc >= 0.75


def test_exported_model_predicts_the_same(runs, tmp_path):
    if importlib.util.find_spec("cavmae.export") is None or importlib.util.find_spec("cavmae.runtime") is None:
        pytest.skip("cavmae.export / cavmae.runtime are not available")
    from cavmae.export import export_model
    from cavmae.runtime import load

    ds, _, ft = runs
    labels = read_labels(ds.label_csv)
    export_model(ft.model, tmp_path / "export", task="single-label", labels=labels, num_frames=10, max_batch=8)
    pipeline = load(tmp_path / "export", engine="ort", device="cpu")
    val = AVDataset(read_clips(ds.splits["val"]), labels, frame="all")
    torch_probs, targets = predict_clips(ft.model, val, mode="multimodal", batch_size=8, activation="softmax")
    items = [val[i] for i in range(len(val))]
    ort_probs = pipeline.classify_batch(np.stack([it["audio"] for it in items]), np.stack([it["frames"] for it in items]))
    np.testing.assert_allclose(ort_probs, torch_probs, atol=1e-4)
    np.testing.assert_array_equal(ort_probs.argmax(1), torch_probs.argmax(1))
    one = pipeline.classify(items[0]["audio"], items[0]["frames"])
    np.testing.assert_allclose(one, torch_probs[0], atol=1e-4)
    # the final metric of the run is what these predictions give
    assert float((torch_probs.argmax(1) == targets.argmax(1)).mean()) == pytest.approx(ft.final_metrics["acc"])
