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

#: the columns of a reference label CSV (the reference loader reads them with csv.DictReader)
LABEL_CSV_COLUMNS: tuple[str, ...] = ("index", "mid", "display_name")

#: label sets shipped in ``cavmae/assets``: registry label-set name -> file name
PACKAGED_LABEL_FILES: dict[str, str] = {"audioset": "audioset_class_labels_indices.csv"}


@dataclass(frozen=True)
class LabelSet:
    """Names and ids of ``C`` classes, in model output order."""

    names: tuple[str, ...]
    ids: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.names)

    def to_meta(self) -> dict[str, list[str]]:
        """The JSON form kept in the metadata of a checkpoint this project writes."""
        return {"names": list(self.names), "ids": list(self.ids)}

    @classmethod
    def from_meta(cls, obj: object) -> LabelSet | None:
        """The label set of :meth:`to_meta`'s form; None for anything else (a file written
        before checkpoints carried names, or metadata of another shape)."""
        if not isinstance(obj, dict):
            return None
        names, ids = obj.get("names"), obj.get("ids")
        if not (isinstance(names, list) and isinstance(ids, list) and names and len(names) == len(ids)):
            return None
        if not all(isinstance(x, str) for x in [*names, *ids]):
            return None
        return cls(names=tuple(names), ids=tuple(ids))


def read_label_csv(path: str | Path, num_classes: int | None = None) -> LabelSet:
    """Read a reference label CSV (the one reader of the format, for every caller).

    Rows must run ``index`` 0..C-1 in order, since predictions are looked up by that index;
    with ``num_classes``, C must be that. Raises ``CavmaeError`` naming what is wrong (an HTML
    page a host returned instead of the file fails on its header).
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = tuple(reader.fieldnames or ())
            rows = list(reader)
    except OSError as e:
        raise CavmaeError(f"cannot read label file {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise CavmaeError(f"cannot read label file {path}: {e}") from None
    missing = [c for c in LABEL_CSV_COLUMNS if c not in header]
    if missing or not rows:
        what = f"it lacks column(s) {missing} (header {list(header)})" if missing else "no rows"
        raise CavmaeError(
            f"{path} is not a label CSV: {what}; expected the columns {','.join(LABEL_CSV_COLUMNS)}"
        )
    for n, row in enumerate(rows, start=2):
        if any(row.get(c) is None for c in LABEL_CSV_COLUMNS):
            raise CavmaeError(f"{path}, line {n}: each row needs {','.join(LABEL_CSV_COLUMNS)}")
    if num_classes is not None and len(rows) != num_classes:
        raise CavmaeError(f"label CSV {path} has {len(rows)} rows, expected {num_classes}")
    try:
        order = [int(r["index"]) for r in rows]
    except (TypeError, ValueError):
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


#: what a classifier's probabilities are: sigmoid per class (multi-label) or softmax (single-label)
TASKS = ("multi-label", "single-label")


def default_task(num_classes: int) -> str:
    """VGGSound (309 classes) is single-label; AudioSet and anything else multi-label."""
    return "single-label" if num_classes == VGGSOUND_NUM_CLASSES else "multi-label"
