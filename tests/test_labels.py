"""The label CSV format has one reader (cavmae.labels.read_label_csv) used by the registry's
download check, the training data and the runtime alike."""

from __future__ import annotations

from pathlib import Path

import pytest

from cavmae.data import read_labels
from cavmae.errors import CavmaeError, DatasetError
from cavmae.hub.registry import verify_label_csv
from cavmae.labels import read_label_csv

GOOD = 'index,mid,display_name\n0,/m/a,"A, b"\n1,/m/b,B\n'


def test_reads_names_and_ids_in_index_order(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(GOOD)
    labels = read_label_csv(path, num_classes=2)
    assert labels.names == ("A, b", "B") and labels.ids == ("/m/a", "/m/b")
    with pytest.raises(CavmaeError, match="has 2 rows, expected 3"):
        read_label_csv(path, num_classes=3)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"id,name\n0,a\n", r"not a label CSV: it lacks column\(s\) \['index', 'mid', 'display_name'\]"),
        (b"<html><body>sign in</body></html>\n", "not a label CSV"),
        (b"index,mid,display_name\n", "not a label CSV: no rows"),
        (b"index,mid,display_name\n0,/m/a\n", "line 2: each row needs index,mid,display_name"),
        (b"\x80\x02\x8a\nPK\x03\x04 not text", "cannot read label file"),  # a checkpoint given as labels
    ],
)
def test_every_caller_gets_the_same_one_line_error(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "labels.csv"
    path.write_bytes(content)
    errors = []
    for read in (read_label_csv, lambda p: verify_label_csv(p, 1), read_labels):
        with pytest.raises(CavmaeError, match=message) as info:
            read(path)
        errors.append(str(info.value))
    assert len(set(errors)) == 1 and "\n" not in errors[0]
    assert isinstance(info.value, DatasetError)  # the training reader keeps its error type
