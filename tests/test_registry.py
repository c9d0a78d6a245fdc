"""The model registry: entries, cache layout, mirrors (no network)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cavmae.errors import CavmaeError
from cavmae.hub import registry
from cavmae.hub.cache import cavmae_home
from cavmae.hub.registry import (
    DEFAULT_MODEL,
    cached_path,
    checkpoint_path,
    get_model_info,
    label_path,
    list_models,
    resolve_url,
    verify_label_csv,
)

# docs/model.md section 7, copied by hand: the registry must match it exactly.
RELEASE_URLS = {
    "cav-mae-scale++": "https://www.dropbox.com/s/l5t5geufdy3qvnv/audio_model.21.pth?dl=1",
    "cav-mae-scale+": "https://www.dropbox.com/s/xu8bfie6hz86oev/audio_model.25.pth?dl=1",
    "cav-mae-base": "https://www.dropbox.com/s/wxrjgr86gdhc5k8/cav-mae-base.pth?dl=1",
    "cav-mae-base-nonorm": "https://www.dropbox.com/s/arrg7cb3e4hhjwu/cav-mae-base-nonorm.pth?dl=1",
    "as-full-51.2": "https://www.dropbox.com/s/hejj49zdgyyfsuh/as-full-51.2.pth?dl=1",
    "as-20k-42.0": "https://www.dropbox.com/s/9x6y642so3zve5y/as-20k-42.0.pth?dl=1",
    "vgg-65.5": "https://www.dropbox.com/s/f4wrbxv2unewss9/vgg_65.5.pth?dl=1",
    "vgg-66.0": "https://www.dropbox.com/s/q66s3mu526mj2x6/vgg_66.0.pth?dl=1",
    "as-46.6-audio": "https://www.dropbox.com/s/itfw7p0ueq7z9og/as_46.6.pth?dl=1",
    "as-37.7-audio": "https://www.dropbox.com/s/pariabyh1iyayda/as_37.7.pth?dl=1",
    "as-20.0-visual": "https://www.dropbox.com/s/9ngkq9ygwqecxz5/as_20.0.pth?dl=1",
    "vgg-59.8-audio": "https://www.dropbox.com/s/l4rj0sgpnt08bp2/vgg_59.8.pth?dl=1",
}
AS_LABELS = "https://www.dropbox.com/s/z3ko8bv9b7738t1/class_labels_indices.csv?dl=1"
VGG_LABELS = "https://www.dropbox.com/s/6k0czs8pzz6yj2c/class_labels_indices_vgg.csv?dl=1"
AV = ("multimodal", "missingaudioonly", "missingvideoonly")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CAVMAE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CAVMAE_MIRROR", raising=False)


def test_registry_matches_release_table() -> None:
    models = list_models()
    assert [m.name for m in models] == list(RELEASE_URLS)
    for m in models:
        assert m.url == RELEASE_URLS[m.name]
        assert m.sha256 is None
        assert m.description and m.reported


@pytest.mark.parametrize(
    ("name", "kind", "classes", "task", "modes", "label_url", "reported"),
    [
        ("cav-mae-scale++", "pretrain", None, None, (), None, "recommended"),
        ("cav-mae-base-nonorm", "pretrain", None, None, (), None, "inpainting"),
        ("as-full-51.2", "classifier", 527, "multi-label", AV, AS_LABELS, "51.2 mAP"),
        ("as-20k-42.0", "classifier", 527, "multi-label", AV, AS_LABELS, "42.0 mAP"),
        ("vgg-65.5", "classifier", 309, "single-label", AV, VGG_LABELS, "65.5 acc"),
        ("vgg-66.0", "classifier", 309, "single-label", AV, VGG_LABELS, "65.9 acc"),
        ("as-46.6-audio", "classifier", 527, "multi-label", ("audioonly",), AS_LABELS, "46.6 mAP"),
        ("as-37.7-audio", "classifier", 527, "multi-label", ("audioonly",), AS_LABELS, "37.7 mAP"),
        ("as-20.0-visual", "classifier", 527, "multi-label", ("videoonly",), AS_LABELS, "20.0 mAP"),
        (
            "vgg-59.8-audio",
            "classifier",
            309,
            "single-label",
            ("audioonly",),
            VGG_LABELS,
            "59.8 acc",
        ),
    ],
)
def test_entries(name, kind, classes, task, modes, label_url, reported) -> None:
    m = get_model_info(name)
    assert (m.kind, m.num_classes, m.task, m.modes, m.label_url, m.reported) == (
        kind,
        classes,
        task,
        modes,
        label_url,
        reported,
    )
    assert m.label_set == {AS_LABELS: "audioset", VGG_LABELS: "vggsound", None: None}[label_url]
    # the weight tag carries what it was fine-tuned for, as its modes say
    assert m.finetune_mode == (None if kind == "pretrain" else modes[0] if len(modes) == 1 else "multimodal")
    assert m.labels_packaged == (m.label_set == "audioset")


def test_norm_pix_loss_only_nonorm_differs() -> None:
    pretrain = {m.name: m.norm_pix_loss for m in list_models() if m.kind == "pretrain"}
    assert pretrain == {
        "cav-mae-scale++": True,
        "cav-mae-scale+": True,
        "cav-mae-base": True,
        "cav-mae-base-nonorm": False,
    }


def test_default_model() -> None:
    assert DEFAULT_MODEL == "as-full-51.2"
    info = get_model_info(DEFAULT_MODEL)
    assert info.kind == "classifier" and info.default_mode == "multimodal"


def test_unknown_name_suggests_close_ones() -> None:
    with pytest.raises(CavmaeError, match="did you mean as-full-51.2"):
        get_model_info("as-full-51")
    with pytest.raises(CavmaeError, match="known models: cav-mae-scale\\+\\+"):
        get_model_info("zzz")


def test_home_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CAVMAE_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cavmae_home() == tmp_path / "h"
    monkeypatch.delenv("CAVMAE_HOME")
    assert cavmae_home() == tmp_path / "xdg" / "cavmae"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert cavmae_home() == tmp_path / "user" / ".cache" / "cavmae"


def test_cache_layout_and_cached_path(tmp_path: Path) -> None:
    ckpt = tmp_path / "home" / "checkpoints"
    assert checkpoint_path("vgg-65.5") == ckpt / "vgg-65.5.pth"
    assert label_path("vgg-65.5") == ckpt / "vggsound_labels.csv"
    # AudioSet's label CSV ships with the package: that file, never a download
    shipped = Path(registry.__file__).parents[1] / "assets" / "audioset_class_labels_indices.csv"
    assert label_path("as-20.0-visual") == shipped and shipped.is_file()
    assert registry.local_labels("as-20.0-visual") == shipped
    assert registry.local_labels("vgg-65.5") is None
    assert label_path("cav-mae-base") is None
    assert cached_path("vgg-65.5") is None
    ckpt.mkdir(parents=True)
    (ckpt / "vgg-65.5.pth").write_bytes(b"")
    assert cached_path("vgg-65.5") is None  # empty is not complete
    (ckpt / "vgg-65.5.pth.part").write_bytes(b"abc")
    assert cached_path("vgg-65.5") is None  # a .part file is not the checkpoint
    (ckpt / "vgg-65.5.pth").write_bytes(b"abc")
    assert cached_path("vgg-65.5") == ckpt / "vgg-65.5.pth"


def test_resolve_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    url = RELEASE_URLS["cav-mae-scale++"]
    assert resolve_url(url) == url
    assert (
        resolve_url(url, "https://m.example/ckpt/") == "https://m.example/ckpt/audio_model.21.pth"
    )
    assert resolve_url(AS_LABELS, "http://h:8000") == "http://h:8000/class_labels_indices.csv"
    monkeypatch.setenv("CAVMAE_MIRROR", "http://env/m")
    assert resolve_url(url) == "http://env/m/audio_model.21.pth"
    assert resolve_url(url, "http://arg") == "http://arg/audio_model.21.pth"  # argument wins
    assert resolve_url(url, "") == url  # an empty mirror switches the environment's off
    assert resolve_url(url, str(tmp_path)) == (tmp_path / "audio_model.21.pth").as_uri()
    assert get_model_info("vgg-66.0").file_name == "vgg_66.0.pth"
    assert get_model_info("vgg-66.0").label_file_name == "class_labels_indices_vgg.csv"


def test_mirror_file_names_are_distinct() -> None:
    names = [m.file_name for m in list_models()] + [
        "class_labels_indices.csv",
        "class_labels_indices_vgg.csv",
    ]
    assert len(set(names)) == len(names)


def test_ensure_model_from_local_directory_mirror(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "vgg_59.8.pth").write_bytes(b"weights")
    rows = ["index,mid,display_name"] + [f"{i},/m/v{i},name {i}" for i in range(309)]
    (mirror / "class_labels_indices_vgg.csv").write_text("\n".join(rows) + "\n")
    path = registry.ensure_model(
        "vgg-59.8-audio", mirror=str(mirror), progress=False, verify=lambda p: None
    )
    assert path.read_bytes() == b"weights"
    assert (
        registry.ensure_labels("vgg-59.8-audio", mirror=str(mirror))
        == tmp_path / "home" / "checkpoints" / "vggsound_labels.csv"
    )


def test_verify_label_csv(tmp_path: Path) -> None:
    good = tmp_path / "good.csv"
    good.write_text('index,mid,display_name\n0,/m/a,"A, b"\n1,/m/b,B\n')
    verify_label_csv(good, 2)
    with pytest.raises(CavmaeError, match="3"):
        verify_label_csv(good, 3)
    bad = tmp_path / "bad.csv"
    bad.write_text("id,name\n0,a\n")
    with pytest.raises(CavmaeError, match="lacks column"):
        verify_label_csv(bad, 1)
    html = tmp_path / "page.csv"  # what a host returns instead of the file, sometimes
    html.write_text("<html><body>sign in</body></html>\n")
    with pytest.raises(CavmaeError):
        verify_label_csv(html, 1)


def test_imports_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import cavmae.hub.registry, cavmae.hub.download, cavmae.hub.cache\n"
        "assert not any(m.startswith(('cavmae.runtime', 'cavmae.export', 'cavmae.cli'))"
        " for m in sys.modules), 'the core hub imports no outer layer'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
