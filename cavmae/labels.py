"""Class label sets: the reference label CSV format (``index,mid,display_name``).

Plain stdlib, usable by the runtime without torch or numpy. The AudioSet label set ships with
the package (never downloaded); others (VGGSound) come from the registry's label CSVs
(``cavmae.hub.registry``) or a user's file.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import CavmaeError

AUDIOSET_NUM_CLASSES = 527
VGGSOUND_NUM_CLASSES = 309

#: label sets shipped in ``cavmae/assets``: registry label-set name -> file name
PACKAGED_LABEL_FILES: dict[str, str] = {"audioset": "audioset_class_labels_indices.csv"}


@dataclass(frozen=True)
class LabelSet:
    """Names and ids of ``C`` classes, in model output order."""

    names: tuple[str, ...]
    ids: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.names)


def read_label_csv(path: str | Path) -> LabelSet:
    """Read a reference label CSV; rows must run ``index`` 0..C-1 in order."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise CavmaeError(f"cannot read label file {path}: {e.strerror}") from None
    if not rows or not {"index", "mid", "display_name"} <= set(rows[0]):
        raise CavmaeError(
            f"{path} is not a label CSV: expected the columns index,mid,display_name"
        )
    try:
        order = [int(r["index"]) for r in rows]
    except ValueError:
        raise CavmaeError(f"{path}: the index column must hold integers") from None
    if order != list(range(len(rows))):
        raise CavmaeError(f"{path}: the index column must run 0..{len(rows) - 1} in order")
    return LabelSet(names=tuple(r["display_name"] for r in rows), ids=tuple(r["mid"] for r in rows))


def packaged_label_file(label_set: str) -> Path | None:
    """The label CSV of ``label_set`` shipped with the package, or None when none ships."""
    name = PACKAGED_LABEL_FILES.get(label_set)
    if name is None:
        return None
    # The package is installed as files (wheel or editable), so the resource is a real path.
    return Path(str(resources.files("cavmae") / "assets" / name))


def audioset_labels() -> LabelSet:
    """The 527 AudioSet classes, bundled with the package."""
    path = packaged_label_file("audioset")
    assert path is not None
    return read_label_csv(path)


def default_labels(num_classes: int) -> LabelSet | None:
    """The bundled label set for a class count, when one is known (AudioSet's 527)."""
    return audioset_labels() if num_classes == AUDIOSET_NUM_CLASSES else None


def default_task(num_classes: int) -> str:
    """VGGSound (309 classes) is single-label; AudioSet and anything else multi-label."""
    return "single-label" if num_classes == VGGSOUND_NUM_CLASSES else "multi-label"
