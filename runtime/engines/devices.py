"""Device strings, parsed in one place for the engine factory and every engine.

Accepted: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (any case, surrounding blanks ignored) and, where
the caller still has to choose, ``"auto"``. No torch, no onnxruntime.
"""

from __future__ import annotations

from cavmae.errors import CavmaeError

__all__ = ["normalize_device", "parse_device", "split_device"]


def split_device(device: str, *, allow_auto: bool = False) -> tuple[str, int | None]:
    """``"cuda:1"`` -> ``("cuda", 1)``, ``"cuda"`` -> ``("cuda", None)``, ``"cpu"`` -> ``("cpu",
    None)``; ``"auto"`` -> ``("auto", None)`` when ``allow_auto``.

    Raises:
        CavmaeError: anything else (``"tpu"``, ``"cpu:1"``, ``"cuda:x"``), naming what works.
    """
    kind, colon, index = device.strip().lower().partition(":")
    kinds = ("auto", "cpu", "cuda") if allow_auto else ("cpu", "cuda")
    if kind not in kinds or (colon and (kind != "cuda" or not index.isdigit())):
        use = "'auto', 'cpu', 'cuda' or 'cuda:N'" if allow_auto else "'cpu', 'cuda' or 'cuda:N'"
        raise CavmaeError(f"unknown device {device!r}; use {use}")
    return kind, int(index) if colon else None


def parse_device(device: str) -> tuple[str, int]:
    """A concrete device as ``(kind, index)``: ``"cpu"`` -> ("cpu", 0); ``"cuda"`` / ``"cuda:1"``
    -> ("cuda", 0) / ("cuda", 1). ``"auto"`` is refused: resolve it first."""
    kind, index = split_device(device)
    return kind, index or 0


def normalize_device(device: str | None) -> str:
    """The canonical spelling of a requested device: None -> ``"auto"``; ``" CUDA:1 "`` ->
    ``"cuda:1"``; ``"cuda"`` stays ``"cuda"`` (no index chosen yet)."""
    if device is None:
        return "auto"
    kind, index = split_device(device, allow_auto=True)
    return kind if index is None else f"{kind}:{index}"
