"""Typed errors. Each message says what went wrong and what to do about it.

The CLI turns any ``CavmaeError`` into a one-line message and exit code 2 (a user mistake);
anything else is a bug and gets exit code 1.
"""

from __future__ import annotations


def skipped_message(path: object, reason: str) -> str:
    """``skipped PATH: REASON``, naming the path once (media errors already start with it)."""
    return f"skipped {reason}" if str(path) in reason else f"skipped {path}: {reason}"


class CavmaeError(Exception):
    """Base class of every error this toolkit raises on purpose."""


class MediaError(CavmaeError):
    """A media file cannot be used: missing, not media, corrupt, or lacking a stream."""


class MissingStreamError(MediaError):
    """The file has no audio stream or no video stream, and the task needs it.

    ``path`` and ``stream`` (``"audio"`` or ``"video"``) say which; the hint after the ``;`` is the
    caller's: the decoder knows no command-line flags, so a command that knows its own flags
    replaces the hint with :meth:`with_hint`.
    """

    def __init__(self, message: str, *, path: str | None = None, stream: str | None = None) -> None:
        super().__init__(message)
        self.path, self.stream = path, stream

    @classmethod
    def of(cls, path: str, stream: str, hint: str = "") -> MissingStreamError:
        """``PATH: has no STREAM stream[; hint]``."""
        return cls(f"{path}: has no {stream} stream" + (f"; {hint}" if hint else ""), path=path,
                   stream=stream)

    def __reduce__(self):  # keep path and stream across processes (prepare's workers)
        return (type(self), (str(self),), {"path": self.path, "stream": self.stream})

    def with_hint(self, hint: str) -> MissingStreamError:
        """The same error with another hint (unchanged when it carries no path and stream)."""
        if self.path is None or self.stream is None:
            return self
        return MissingStreamError.of(self.path, self.stream, hint)


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
