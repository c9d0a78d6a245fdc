"""Patch layout shared by the model's loss (torch) and the runtime's reconstruction (numpy).

A patch of a ``[C, H, W]`` image is flattened as (rows, cols, channels), the reference layout;
patches run row-major over the grid. Audio ``[T, F]`` spectrograms are first turned into a
one-channel ``[F, T]`` image (frequency as height), so audio patch ``p = f * (T/16) + t``.
Works on numpy arrays and torch tensors alike.
"""

from __future__ import annotations

from typing import Any


def _permute(x: Any, axes: tuple[int, ...]) -> Any:
    return x.permute(*axes) if hasattr(x, "permute") else x.transpose(axes)


def patchify(images: Any, patch: int) -> Any:
    """``[B, C, H, W] -> [B, (H/p)*(W/p), p*p*C]``."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    x = _permute(x, (0, 2, 4, 3, 5, 1))  # b, gh, gw, p, q, c
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: Any, patch: int, grid: tuple[int, int], channels: int) -> Any:
    """Inverse of :func:`patchify`: ``[B, gh*gw, p*p*C] -> [B, C, gh*p, gw*p]``."""
    b = patches.shape[0]
    gh, gw = grid
    x = patches.reshape(b, gh, gw, patch, patch, channels)
    x = _permute(x, (0, 5, 1, 3, 2, 4))  # b, c, gh, p, gw, q
    return x.reshape(b, channels, gh * patch, gw * patch)


def audio_to_image(audio: Any) -> Any:
    """``[B, T, F] -> [B, 1, F, T]``: frequency becomes the height, time the width."""
    b, t, f = audio.shape
    return _permute(audio.reshape(b, 1, t, f), (0, 1, 3, 2))


def image_to_audio(image: Any) -> Any:
    """Inverse of :func:`audio_to_image`: ``[B, 1, F, T] -> [B, T, F]``."""
    b, _, f, t = image.shape
    return _permute(image, (0, 1, 3, 2)).reshape(b, t, f)
