"""Frame preprocessing: RGB uint8 image -> normalized ``[3, S, S]`` float32 (docs/model.md §1).

numpy + OpenCV only (no torch), so training, the runtime and the tests share this one
implementation. Every constant comes from :class:`~cavmae.config.PreprocessConfig`.

The reference pipeline: resize so the shorter side is ``image_size`` (torchvision
``Resize(size)`` on a PIL image, i.e. PIL's antialiased bilinear filter), centre crop
``image_size`` x ``image_size`` (torchvision ``CenterCrop``), scale to [0, 1], normalize with the
ImageNet mean/std.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from cavmae.config import DEFAULT_PREPROCESS, PreprocessConfig
from cavmae.errors import MediaError

__all__ = ["load_image", "preprocess_frame", "preprocess_frames", "resized_size"]


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """``(height, width)`` after resizing the shorter side to ``size``, keeping the aspect.

    Same rounding as torchvision ``Resize(int)``: the longer side is truncated,
    ``int(size * long / short)``.
    """
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def _resize(rgb: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Resize a uint8 ``[H, W, 3]`` image to ``[out_h, out_w, 3]`` uint8.

    The reference resizes with PIL's bilinear filter, which antialiases: when shrinking by a
    factor ``s`` its triangle (tent) kernel is stretched to a support of ``s`` input pixels on
    each side, so every input pixel contributes. OpenCV's ``INTER_LINEAR`` does not stretch the
    kernel (it samples 2x2 neighbours and aliases when shrinking), so for downscaling we use
    ``INTER_AREA``: the exact pixel-area average, i.e. a box kernel ``s`` pixels wide. Box and
    stretched tent are both antialiasing low-pass filters centred on the same point (half-pixel
    centres in both); they agree exactly on flat and linear regions and differ slightly on
    sharp edges (the tent is a little blurrier). ``tests/test_visual.py`` measures the difference
    against a float64 tent-filter implementation of PIL's resize. When enlarging, PIL's tent
    keeps its unit support, which is ordinary bilinear interpolation with half-pixel centres and
    clamped edges: exactly what ``INTER_LINEAR`` computes (up to fixed-point rounding).
    """
    in_h, in_w = rgb.shape[:2]
    if (in_h, in_w) == (out_h, out_w):
        return rgb
    shrinking = out_h <= in_h and out_w <= in_w
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(rgb, (out_w, out_h), interpolation=interpolation)


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {tuple(rgb.shape)}")
    if rgb.dtype != np.uint8:
        raise TypeError(f"expected a uint8 RGB image, got dtype {rgb.dtype}")
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError(f"empty image of shape {tuple(rgb.shape)}")
    return rgb


def resize_center_crop(rgb: np.ndarray, size: int) -> np.ndarray:
    """uint8 RGB ``[H, W, 3]`` -> ``[size, size, 3]`` uint8: shorter side to ``size`` (antialiased),
    then the centre crop. The geometric half of :func:`preprocess_frame`, shared with the
    dataset preparation that writes the reference's 224 x 224 JPEGs."""
    out_h, out_w = resized_size(rgb.shape[0], rgb.shape[1], size)
    resized = _resize(np.ascontiguousarray(rgb), out_h, out_w)
    # torchvision CenterCrop: top = int(round((h - S) / 2)) (Python rounding, half to even).
    top = int(round((out_h - size) / 2.0))
    left = int(round((out_w - size) / 2.0))
    return np.ascontiguousarray(resized[top : top + size, left : left + size])


def preprocess_frame(rgb: np.ndarray, config: PreprocessConfig = DEFAULT_PREPROCESS) -> np.ndarray:
    """One RGB image -> model input.

    Args:
        rgb: ``[H, W, 3]`` uint8 RGB, any size or aspect (small images are enlarged).
        config: preprocessing constants (``image_size``, ``image_mean``, ``image_std``).

    Returns:
        ``[3, S, S]`` float32, C-contiguous, ``S = config.image_size``: resized (shorter side
        ``S``), centre-cropped, scaled to [0, 1] and normalized per channel.
    """
    crop = resize_center_crop(_check_rgb(rgb), config.image_size)
    # (x / 255 - mean) / std == x * scale + shift, computed in float32 on the cropped pixels.
    std = np.asarray(config.image_std, dtype=np.float64)
    scale = (1.0 / (255.0 * std)).astype(np.float32)
    shift = (-np.asarray(config.image_mean, dtype=np.float64) / std).astype(np.float32)
    chw = np.ascontiguousarray(crop.transpose(2, 0, 1), dtype=np.float32)
    chw *= scale[:, None, None]
    chw += shift[:, None, None]
    return chw


def preprocess_frames(
    frames: Sequence[np.ndarray] | np.ndarray, config: PreprocessConfig = DEFAULT_PREPROCESS
) -> np.ndarray:
    """Several RGB uint8 images (list, or ``[F, H, W, 3]`` array) -> ``[F, 3, S, S]`` float32."""
    size = config.image_size
    out = np.empty((len(frames), 3, size, size), dtype=np.float32)
    for i, frame in enumerate(frames):
        out[i] = preprocess_frame(frame, config)
    return out


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file (JPEG, PNG, BMP, WebP ...) as ``[H, W, 3]`` uint8 RGB.

    Grayscale images are expanded to three channels and an alpha channel is dropped; EXIF
    orientation is applied. Raises :class:`MediaError` when the file is missing or unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: no such image file")
    # cv2.imread cannot open some non-ASCII paths on Windows; decoding the bytes works everywhere.
    data = np.fromfile(str(path), dtype=np.uint8)
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if bgr is None:
        raise MediaError(f"{path}: not a readable image (JPEG, PNG, BMP, WebP, TIFF ...)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
