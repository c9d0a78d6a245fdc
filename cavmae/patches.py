"""Patch layout shared by the model's loss (torch) and the runtime's reconstruction (numpy).

A patch of a ``[C, H, W]`` image is flattened as (rows, cols, channels), the reference layout;
patches run row-major over the grid. Audio ``[T, F]`` spectrograms are first turned into a
one-channel ``[F, T]`` image (frequency as height), so audio patch ``p = f * (T/16) + t``.
Works on numpy arrays and torch tensors alike, as does the patch math of the masked-autoencoder
loss: ``norm_pix_loss`` standardisation and the MSE over removed patches, so the model's training
loss (torch) and the runtime's reconstruction error (numpy) are one definition.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: added to the per-patch variance before the square root (MAE's ``norm_pix_loss``)
NORM_PIX_EPS = 1e-6


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


def _mean_var(patches: Any) -> tuple[Any, Any]:
    """Per-patch mean and unbiased variance over the last axis, kept for broadcasting."""
    if isinstance(patches, np.ndarray):
        return patches.mean(-1, keepdims=True), patches.var(-1, ddof=1, keepdims=True)
    # torch: var is unbiased by default, as the reference (MAE) computes it
    return patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)


def standardize_patches(patches: Any) -> Any:
    """``norm_pix_loss`` targets: each patch ``[..., P]`` minus its mean, over its standard
    deviation (unbiased variance + :data:`NORM_PIX_EPS`)."""
    mean, var = _mean_var(patches)
    return (patches - mean) / (var + NORM_PIX_EPS) ** 0.5


def unstandardize_patches(pred: Any, patches: Any) -> Any:
    """Inverse of :func:`standardize_patches` for a prediction ``pred`` of ``patches``: scale
    and shift it back with the statistics of the real patches (``[..., P]`` both)."""
    mean, var = _mean_var(patches)
    return pred * (var + NORM_PIX_EPS) ** 0.5 + mean


def masked_mse(pred: Any, target: Any, mask: Any) -> Any:
    """Mean squared error per patch (``[B, L, P] -> [B, L]``), averaged over the removed patches
    (``mask [B, L] == 1``) only; a 0-d array or tensor."""
    per_patch = ((pred - target) ** 2).mean(-1)
    return (per_patch * mask).sum() / mask.sum()
