"""Typed errors. Each message says what went wrong and what to do about it.

The CLI turns any ``CavmaeError`` into a one-line message and exit code 2 (a user mistake);
anything else is a bug and gets exit code 1.
"""

from __future__ import annotations


class CavmaeError(Exception):
    """Base class of every error this toolkit raises on purpose."""


class MediaError(CavmaeError):
    """A media file cannot be used: missing, not media, corrupt, or lacking a stream."""


class MissingStreamError(MediaError):
    """The file has no audio stream or no video stream, and the task needs it."""


class CheckpointError(CavmaeError):
    """A checkpoint file cannot be read or does not match the model it should build."""


class ExportError(CavmaeError):
    """Export failed, or an exported graph did not validate against PyTorch."""


class EngineUnavailableError(CavmaeError):
    """The requested inference engine (TensorRT, CUDA, PyTorch) is not usable here."""


class ModelKindError(CavmaeError):
    """The model cannot do the asked task (e.g. reconstruction with a classifier)."""


class DownloadError(CavmaeError):
    """A download failed or its file did not verify."""


class DatasetError(CavmaeError):
    """A dataset description is malformed or points at missing files."""
