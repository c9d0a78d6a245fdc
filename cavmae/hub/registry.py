"""Named released checkpoints, the local cache and mirrors.

Every checkpoint of the reference release (docs/model.md section 7) has a name here carrying its
URL, what it is (pre-trained with a decoder, or a fine-tuned classifier), how many classes it
predicts, what it was fine-tuned for and the classifier modes that gives it, and the label set its
indices refer to (the open_clip ``pretrained.py`` idea: a weight tag carries everything needed to
use it).

Cache layout (``cavmae.hub.cache.cavmae_home()``)::

    $CAVMAE_HOME/                        default $XDG_CACHE_HOME/cavmae or ~/.cache/cavmae
        checkpoints/
            as-full-51.2.pth             one file per registry name: {name}.pth
            vggsound_labels.csv          label CSVs beside them: {label_set}_labels.csv

Label sets that ship with the package (``cavmae/assets``, see ``cavmae.labels``: AudioSet) are
read from there and never downloaded; a cached label CSV is never fetched again. Downloads are
atomic (see ``cavmae.hub.download``), so a file under its final name is complete. Plain stdlib:
this module imports neither torch nor numpy.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from cavmae.errors import CavmaeError, CheckpointError, DownloadError, EngineUnavailableError
from cavmae.labels import packaged_label_file, read_label_csv
from cavmae.modes import finetune_mode_of, reference_modes

from .cache import cavmae_home
from .download import download

Kind = Literal["pretrain", "classifier"]
Task = Literal["multi-label", "single-label"]
LabelSet = Literal["audioset", "vggsound"]

#: Environment variable naming a mirror (read, never written).
ENV_MIRROR = "CAVMAE_MIRROR"

#: Reference modes of the classifiers by what they were fine-tuned for (table in cavmae.modes).
AV_MODES: tuple[str, ...] = reference_modes("multimodal")
AUDIO_MODES: tuple[str, ...] = reference_modes("audioonly")
VISUAL_MODES: tuple[str, ...] = reference_modes("videoonly")

#: file endings taken as a checkpoint path (not a registry name) when no such file exists
CHECKPOINT_SUFFIXES: tuple[str, ...] = (".pth", ".pt", ".safetensors")

LABEL_URLS: dict[str, str] = {
    "audioset": "https://www.dropbox.com/s/z3ko8bv9b7738t1/class_labels_indices.csv?dl=1",
    "vggsound": "https://www.dropbox.com/s/6k0czs8pzz6yj2c/class_labels_indices_vgg.csv?dl=1",
}

LABEL_COUNTS: dict[str, int] = {"audioset": 527, "vggsound": 309}


@dataclass(frozen=True)
class ModelInfo:
    """One released checkpoint.

    ``num_classes``, ``task``, ``label_url`` and ``label_set`` are None for pre-trained models
    (they have a decoder, no head). ``modes`` lists the reference classifier modes the
    checkpoint serves (its fine-tune mode's rows of ``cavmae.modes``); empty for pre-trained
    models. ``norm_pix_loss`` says whether the decoder was
    trained on per-patch normalized targets: only meaningful for pre-trained models (False for
    classifiers). ``sha256`` is None for all of them: the reference publishes no checksums.
    """

    name: str
    url: str
    kind: Kind
    num_classes: int | None
    task: Task | None
    modes: tuple[str, ...]
    label_url: str | None
    label_set: LabelSet | None
    norm_pix_loss: bool
    reported: str
    sha256: str | None
    description: str

    @property
    def file_name(self) -> str:
        """The checkpoint's file name on the original host, the name a mirror must use."""
        return url_file_name(self.url)

    @property
    def label_file_name(self) -> str | None:
        """The label CSV's file name on the original host (and on a mirror)."""
        return None if self.label_url is None else url_file_name(self.label_url)

    @property
    def default_mode(self) -> str | None:
        """The mode to classify with when none is asked for (None for pre-trained models)."""
        return self.modes[0] if self.modes else None

    @property
    def finetune_mode(self) -> str | None:
        """What the classifier was fine-tuned for (``multimodal``, ``audioonly``, ``videoonly``);
        None for pre-trained models."""
        return finetune_mode_of(self.modes) if self.kind == "classifier" else None

    @property
    def config_overrides(self) -> dict[str, Any]:
        """Model config fields the registry knows and the checkpoint's keys cannot tell."""
        return {"norm_pix_loss": self.norm_pix_loss} if self.kind == "pretrain" else {}

    @property
    def labels_packaged(self) -> bool:
        """Whether the label set ships with the package (then it is never downloaded)."""
        return self.label_set is not None and packaged_label_file(self.label_set) is not None


def _pretrain(
    name: str, url: str, reported: str, description: str, *, norm_pix: bool = True
) -> ModelInfo:
    return ModelInfo(
        name=name,
        url=url,
        kind="pretrain",
        num_classes=None,
        task=None,
        modes=(),
        label_url=None,
        label_set=None,
        norm_pix_loss=norm_pix,
        reported=reported,
        sha256=None,
        description=description,
    )


def _classifier(
    name: str,
    url: str,
    label_set: LabelSet,
    modes: tuple[str, ...],
    reported: str,
    description: str,
) -> ModelInfo:
    return ModelInfo(
        name=name,
        url=url,
        kind="classifier",
        num_classes=LABEL_COUNTS[label_set],
        # AudioSet clips carry several labels (sigmoid, mAP); VGGSound one (softmax, accuracy).
        task="multi-label" if label_set == "audioset" else "single-label",
        modes=modes,
        label_url=LABEL_URLS[label_set],
        label_set=label_set,
        norm_pix_loss=False,
        reported=reported,
        sha256=None,
        description=description,
    )


_DB = "https://www.dropbox.com/s"

_MODELS: tuple[ModelInfo, ...] = (
    _pretrain(
        "cav-mae-scale++",
        f"{_DB}/l5t5geufdy3qvnv/audio_model.21.pth?dl=1",
        "recommended",
        "CAV-MAE-Scale++ pre-trained (with decoder); the recommended starting point",
    ),
    _pretrain(
        "cav-mae-scale+",
        f"{_DB}/xu8bfie6hz86oev/audio_model.25.pth?dl=1",
        "paper",
        "CAV-MAE-Scale+ pre-trained (with decoder), as in the paper",
    ),
    _pretrain(
        "cav-mae-base",
        f"{_DB}/wxrjgr86gdhc5k8/cav-mae-base.pth?dl=1",
        "paper",
        "CAV-MAE base pre-trained (with decoder), as in the paper",
    ),
    _pretrain(
        "cav-mae-base-nonorm",
        f"{_DB}/arrg7cb3e4hhjwu/cav-mae-base-nonorm.pth?dl=1",
        "inpainting",
        "CAV-MAE base pre-trained without norm_pix_loss: predicts pixels, for reconstruction",
        norm_pix=False,
    ),
    _classifier(
        "as-full-51.2",
        f"{_DB}/hejj49zdgyyfsuh/as-full-51.2.pth?dl=1",
        "audioset",
        AV_MODES,
        "51.2 mAP",
        "audio-visual classifier fine-tuned on full AudioSet (2M), 527 classes",
    ),
    _classifier(
        "as-20k-42.0",
        f"{_DB}/9x6y642so3zve5y/as-20k-42.0.pth?dl=1",
        "audioset",
        AV_MODES,
        "42.0 mAP",
        "audio-visual classifier fine-tuned on AudioSet-20K, 527 classes",
    ),
    _classifier(
        "vgg-65.5",
        f"{_DB}/f4wrbxv2unewss9/vgg_65.5.pth?dl=1",
        "vggsound",
        AV_MODES,
        "65.5 acc",
        "audio-visual classifier fine-tuned on VGGSound, 309 classes",
    ),
    _classifier(
        "vgg-66.0",
        f"{_DB}/q66s3mu526mj2x6/vgg_66.0.pth?dl=1",
        "vggsound",
        AV_MODES,
        "65.9 acc",
        "audio-visual classifier on VGGSound with extra VGGSound pre-training, 309 classes",
    ),
    _classifier(
        "as-46.6-audio",
        f"{_DB}/itfw7p0ueq7z9og/as_46.6.pth?dl=1",
        "audioset",
        AUDIO_MODES,
        "46.6 mAP",
        "audio-only classifier fine-tuned on full AudioSet (2M), 527 classes",
    ),
    _classifier(
        "as-37.7-audio",
        f"{_DB}/pariabyh1iyayda/as_37.7.pth?dl=1",
        "audioset",
        AUDIO_MODES,
        "37.7 mAP",
        "audio-only classifier fine-tuned on AudioSet-20K, 527 classes",
    ),
    _classifier(
        "as-20.0-visual",
        f"{_DB}/9ngkq9ygwqecxz5/as_20.0.pth?dl=1",
        "audioset",
        VISUAL_MODES,
        "20.0 mAP",
        "visual-only classifier fine-tuned on AudioSet, 527 classes",
    ),
    _classifier(
        "vgg-59.8-audio",
        f"{_DB}/l4rj0sgpnt08bp2/vgg_59.8.pth?dl=1",
        "vggsound",
        AUDIO_MODES,
        "59.8 acc",
        "audio-only classifier fine-tuned on VGGSound, 309 classes",
    ),
)

#: Name -> info, in the order of the table in docs/model.md section 7.
MODELS: dict[str, ModelInfo] = {m.name: m for m in _MODELS}

DEFAULT_MODEL = "as-full-51.2"


def list_models() -> list[ModelInfo]:
    """Every registered checkpoint, pre-trained ones first (docs/model.md's order)."""
    return list(MODELS.values())


def get_model_info(name: str) -> ModelInfo:
    """The registry entry called ``name``; ``CavmaeError`` naming close matches otherwise."""
    try:
        return MODELS[name]
    except KeyError:
        pass
    close = difflib.get_close_matches(name, list(MODELS), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise CavmaeError(
        f"unknown model {name!r}; {hint}known models: {', '.join(MODELS)} "
        "(or pass a checkpoint file path)"
    )


# --- cache locations -------------------------------------------------------------------------


def checkpoint_dir() -> Path:
    """Where downloaded checkpoints and label CSVs live."""
    return cavmae_home() / "checkpoints"


def checkpoint_path(name: str) -> Path:
    """Where the checkpoint ``name`` lives in the cache (whether or not it is there)."""
    return checkpoint_dir() / f"{get_model_info(name).name}.pth"


def label_path(name: str) -> Path | None:
    """Where the label CSV of model ``name`` lives (whether or not it is there yet): the file
    shipped with the package when its label set ships, else its place in the cache; None for
    pre-trained models."""
    info = get_model_info(name)
    if info.label_set is None:
        return None
    return packaged_label_file(info.label_set) or _cached_label_file(info.label_set)


def _cached_label_file(label_set: str) -> Path:
    return checkpoint_dir() / f"{label_set}_labels.csv"


def cache_file_names() -> set[str]:
    """The names of every file downloads put in :func:`checkpoint_dir`: each released model's
    checkpoint and each label set's CSV (``.part`` added while one downloads)."""
    return {checkpoint_path(name).name for name in MODELS} | {
        _cached_label_file(m.label_set).name for m in MODELS.values() if m.label_set is not None
    }


def local_labels(name: str) -> Path | None:
    """The label CSV of model ``name`` if it is here without any download (shipped with the
    package, or cached), else None. Never touches the network."""
    path = label_path(name)
    return path if path is not None and _nonempty_file(path) else None


def cached_path(name: str) -> Path | None:
    """The cached checkpoint of ``name`` if it is present, else None.

    Present means complete: downloads only ever rename a finished, verified ``.part`` file to the
    final name, so a file under the final name is whole. An empty file (created by hand) is not
    counted.
    """
    path = checkpoint_path(name)
    return path if _nonempty_file(path) else None


def _nonempty_file(path: Path) -> bool:
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:
        return False


# --- mirrors ---------------------------------------------------------------------------------


def url_file_name(url: str) -> str:
    """The last component of the URL's path, percent-decoded; the query string is ignored."""
    name = PurePosixPath(unquote(urlsplit(url).path)).name
    if not name:
        raise CavmaeError(f"URL {url!r} has no file name in its path")
    return name


def resolve_url(url: str, mirror: str | None = None) -> str:
    """The URL to fetch ``url`` from, honouring a mirror.

    The mirror comes from ``mirror`` or else ``$CAVMAE_MIRROR`` (an empty value means none).
    A mirror is a flat directory served over HTTP(S) (or a ``file://`` URL, or a plain local
    directory path) holding the files under their **original file names**, i.e. the last path
    component of each official URL, without the query string::

        {mirror}/audio_model.21.pth            cav-mae-scale++
        {mirror}/audio_model.25.pth            cav-mae-scale+
        {mirror}/cav-mae-base.pth, cav-mae-base-nonorm.pth, as-full-51.2.pth, as-20k-42.0.pth
        {mirror}/vgg_65.5.pth, vgg_66.0.pth, as_46.6.pth, as_37.7.pth, as_20.0.pth, vgg_59.8.pth
        {mirror}/class_labels_indices_vgg.csv  VGGSound labels (AudioSet's ship with cavmae)

    so ``https://host/dir/`` + ``as-full-51.2.pth`` -> ``https://host/dir/as-full-51.2.pth``.
    Without a mirror the URL is returned unchanged.
    """
    mirror = mirror if mirror is not None else os.environ.get(ENV_MIRROR)
    if not mirror:
        return url
    if "://" not in mirror:
        # A local directory: urllib reads file:// URLs, so no server is needed.
        mirror = Path(mirror).expanduser().resolve().as_uri()
    return f"{mirror.rstrip('/')}/{url_file_name(url)}"


def _active_mirror(mirror: str | None) -> str | None:
    return mirror if mirror is not None else (os.environ.get(ENV_MIRROR) or None)


def mirror_files(info: ModelInfo) -> tuple[str, ...]:
    """The files a mirror must serve for ``info``: the checkpoint, and its label CSV unless the
    label set ships with the package."""
    labels = () if info.labels_packaged or info.label_file_name is None else (info.label_file_name,)
    return (info.file_name, *labels)


def _network_hint(info: ModelInfo, mirror: str | None) -> str:
    """What to tell the user when fetching a file of ``info`` failed."""
    files = mirror_files(info)
    names = " and ".join(files)
    serve = f"{names} under {'those exact names' if len(files) > 1 else 'that exact name'}"
    local = "a checkpoint file you already have needs no download: pass it as -m FILE.pth"
    mirror = _active_mirror(mirror)
    if mirror:
        return f"check that the mirror {mirror} (from --mirror / {ENV_MIRROR}) serves {serve}; {local}"
    return (
        f"if the host cannot be reached from here, serve {serve} from a reachable server or "
        f"directory and pass --mirror URL or set {ENV_MIRROR} (a mirror serves the label CSV "
        f"too); {local}"
    )


# --- verification ----------------------------------------------------------------------------

Verifier = Callable[[Path], None]


def _default_checkpoint_verifier(info: ModelInfo) -> Verifier:
    """A verifier that loads the file with the core's checkpoint reader (needs torch).

    Imported here, when a download is about to start, never at module import: the runtime must
    import where torch is absent, and only fetching a checkpoint needs torch.
    """
    try:
        from cavmae.checkpoint import verify_checkpoint_file
    except ImportError as e:
        raise EngineUnavailableError(
            f"verifying the downloaded checkpoint {info.name} needs PyTorch, which could not be "
            f"imported ({e}); install torch (pip install torch), or pass your own verify callable"
        ) from e

    def verify(path: Path) -> None:
        verify_checkpoint_file(path, kind=info.kind, num_classes=info.num_classes)

    return verify


def verify_cached(name: str) -> None:
    """Check the cached checkpoint of ``name`` the way a download is checked (needs torch);
    raises ``CavmaeError`` saying what is wrong with it."""
    _default_checkpoint_verifier(get_model_info(name))(checkpoint_path(name))


def verify_label_csv(path: Path, num_classes: int) -> None:
    """Raise ``CavmaeError`` unless ``path`` is a label CSV with ``num_classes`` rows
    (read by :func:`cavmae.labels.read_label_csv`, the one reader of the format)."""
    read_label_csv(path, num_classes)


# --- fetching --------------------------------------------------------------------------------


def ensure_labels(name: str, mirror: str | None = None, progress: bool = True) -> Path | None:
    """The label CSV of model ``name``; None for pre-trained models.

    A label set that ships with the package is returned from there and a cached one from the
    cache, both without any network access; only a missing one is downloaded. Raises
    ``DownloadError`` when the download fails or the CSV does not have the model's number of
    classes.
    """
    info = get_model_info(name)
    here = local_labels(name)
    if here is not None:
        return here
    path = label_path(name)
    if path is None or info.label_url is None or info.num_classes is None:
        return None
    num_classes = info.num_classes

    def verify(part: Path) -> None:
        verify_label_csv(part, num_classes)

    url = resolve_url(info.label_url, mirror)
    return download(
        url,
        path,
        verify=verify,
        progress=progress,
        hint=_network_hint(info, mirror),
    )


def _pinned(sha256: str | None) -> str | None:
    """A pinned hash in lower case, or None; a malformed one is a user mistake."""
    if not sha256:
        return None
    value = sha256.strip().lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise CavmaeError(f"a sha256 is 64 hex digits, not {sha256!r}")
    return value


def ensure_model(
    name: str,
    mirror: str | None = None,
    progress: bool = True,
    verify: Verifier | None = None,
    sha256: str | None = None,
) -> Path:
    """The cached checkpoint of ``name``, downloaded when missing.

    Only the checkpoint: its label CSV is fetched by ``ensure_labels`` when something needs the
    class names (``cavmae download`` does both).

    ``sha256`` pins the file's hash (the registry has none: the reference publishes none); a
    download that does not match is deleted and fails.

    ``verify(path)`` must raise on a bad file; it runs on the finished download before the file
    gets its final name, so a file that fails is deleted rather than cached. With ``verify=None``
    the checkpoint is loaded by ``cavmae.checkpoint.verify_checkpoint_file`` (needs torch;
    ``EngineUnavailableError`` before any download if torch is missing). An already cached file
    is returned as is: it was verified when it was downloaded.

    Raises ``CavmaeError`` for an unknown name and ``DownloadError`` when fetching or
    verification fails.
    """
    info = get_model_info(name)
    path = checkpoint_path(name)
    if not _nonempty_file(path):
        # Resolve the verifier first so a missing torch fails before a long download.
        check = verify if verify is not None else _default_checkpoint_verifier(info)
        url = resolve_url(info.url, mirror)
        download(
            url,
            path,
            sha256=_pinned(sha256 or info.sha256),
            verify=check,
            progress=progress,
            hint=_network_hint(info, mirror),
        )
    if not _nonempty_file(path):  # pragma: no cover - download() guarantees it
        raise DownloadError(f"checkpoint {name} is missing at {path} after download")
    return path


def checkpoint_file(
    model: str | Path, *, mirror: str | None = None, progress: bool = True
) -> tuple[Path, ModelInfo | None]:
    """The file behind ``model``: an existing checkpoint file as given, or the cached file of a
    registry name (downloaded first when missing) with its registry entry.

    Raises ``CheckpointError`` for a missing file and ``CavmaeError`` (naming close matches)
    for an unknown name.
    """
    path = Path(model)
    if path.is_file():
        return path, None
    name = str(model)
    if name in MODELS:
        return ensure_model(name, mirror=mirror, progress=progress), MODELS[name]
    if path.suffix in CHECKPOINT_SUFFIXES or "/" in name or path.is_dir():
        hint = ""
        if path.suffix in CHECKPOINT_SUFFIXES and path.stem in MODELS:
            hint = f" (a released checkpoint is loaded by its name: {path.stem!r})"
        raise CheckpointError(f"checkpoint not found: {path}{hint}")
    get_model_info(name)  # raises, naming close matches
    raise AssertionError("unreachable")
