"""Which model made an index's embeddings, and whether an index fits a model and settings."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .layout import EmbeddingIndexError, parse_frame

if TYPE_CHECKING:
    from cavmae.manifest import Manifest


def model_identity(manifest: Manifest, ref: str | None = None) -> dict[str, Any]:
    """What an index records about the model that made its embeddings.

    ``sha256`` of the source checkpoint identifies the weights; it comes from the export
    manifest, or is computed (and cached) from the checkpoint file when the manifest has none
    (the PyTorch engine running a checkpoint directly). ``ref`` is how to load the model again
    (a registry name or an absolute path), used by ``cavmae search`` when no model is given.
    """
    source = manifest.source or {}
    sha = source.get("sha256")
    checkpoint = source.get("checkpoint")
    if not sha and checkpoint and Path(checkpoint).is_file():
        from ..loader import checkpoint_sha256

        sha = checkpoint_sha256(Path(checkpoint))
    return {
        "sha256": sha,
        "name": source.get("name"),
        "checkpoint": checkpoint,
        "ref": ref,
        "model_kind": manifest.model_kind,
        "model_config": manifest.model_config.to_dict(),
        "precision": manifest.precision,
    }


def same_model(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """True when two model identities (:func:`model_identity`) have the same weights.

    The checkpoint's sha256 decides when both have one; otherwise name, checkpoint path and
    architecture must all agree. Precision (fp32 / fp16 export of the same weights) is not
    compared: those embeddings are the same up to rounding.
    """
    if a.get("sha256") and b.get("sha256"):
        return a["sha256"] == b["sha256"]
    keys = ("name", "checkpoint", "model_kind", "model_config")
    return all(a.get(k) == b.get(k) for k in keys)


def describe_model(m: dict[str, Any]) -> str:
    """A short human name for a model identity, for error messages."""
    what = m.get("name") or m.get("ref") or m.get("checkpoint") or "an unnamed model"
    sha = m.get("sha256")
    return f"{what} (sha256 {sha[:12]})" if sha else str(what)


def check_compatible(
    meta: dict[str, Any],
    model: dict[str, Any],
    *,
    dim: int | None = None,
    frame: str | int | None = None,
    num_frames: int | None = None,
    where: str | Path = "the index",
) -> None:
    """Raise :class:`EmbeddingIndexError` unless an index's ``meta`` fits these settings."""
    if not same_model(meta["model"], model):
        raise EmbeddingIndexError(
            f"{where} holds embeddings of {describe_model(meta['model'])}, not of"
            f" {describe_model(model)}; use the same --model, or write a new index with -o"
        )
    if dim is not None and int(meta["dim"]) != dim:
        raise EmbeddingIndexError(
            f"{where} has embedding dimension {meta['dim']}, this model {dim}"
        )
    if frame is not None and meta["frame"] != parse_frame(frame):
        raise EmbeddingIndexError(
            f"{where} was built with --frame {meta['frame']}, not {frame};"
            " use the same frame choice"
        )
    if num_frames is not None and int(meta["num_frames"]) != num_frames:
        raise EmbeddingIndexError(
            f"{where} was built from {meta['num_frames']} frames per clip,"
            f" this model export uses {num_frames}"
        )
