"""Device strings: one parser (cavmae.runtime.engines.devices) for the factory and each engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cavmae.errors import CavmaeError
from cavmae.runtime.engines import resolve_engine
from cavmae.runtime.engines.devices import normalize_device, parse_device, split_device


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("cpu", ("cpu", 0)), (" CPU ", ("cpu", 0)), ("cuda", ("cuda", 0)), ("cuda:1", ("cuda", 1)),
     ("CUDA:12", ("cuda", 12))],
)
def test_parse_device(text: str, parsed: tuple[str, int]) -> None:
    assert parse_device(text) == parsed


@pytest.mark.parametrize("text", ["tpu", "cpu:1", "cuda:", "cuda:x", "cuda:-1", "npu", "", "auto"])
def test_parse_device_refuses_with_one_line(text: str) -> None:
    with pytest.raises(CavmaeError, match=r"unknown device .*; use 'cpu', 'cuda' or 'cuda:N'$"):
        parse_device(text)


def test_normalize_device_keeps_auto_and_an_unchosen_index() -> None:
    assert normalize_device(None) == "auto"
    assert normalize_device(" Auto ") == "auto"
    assert normalize_device("CUDA") == "cuda" and split_device("cuda") == ("cuda", None)
    assert normalize_device("cuda:2") == "cuda:2"
    with pytest.raises(CavmaeError, match="use 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        normalize_device("auto:1")
    with pytest.raises(CavmaeError, match="unknown device 'tpu'"):
        resolve_engine("ort", "tpu")


def _engine(name: str) -> Any:
    if name == "ort":
        from cavmae.runtime.engines.ort import OrtEngine

        return OrtEngine
    if name == "trt":
        from cavmae.runtime.engines.trt import TrtEngine

        return TrtEngine
    pytest.importorskip("torch")
    from cavmae.runtime.engines.torch_engine import TorchEngine

    return TorchEngine


@pytest.mark.parametrize("engine", ["ort", "trt", "torch"])
def test_every_engine_refuses_an_unknown_device_before_any_work(engine: str, tmp_path: Path) -> None:
    """The same one-line error from each engine, raised before the export or manifest is read
    (so the manifest here can be a placeholder)."""
    with pytest.raises(CavmaeError, match=r"^unknown device 'tpu'; use 'cpu', 'cuda' or 'cuda:N'$"):
        _engine(engine)(tmp_path, None, "tpu")
