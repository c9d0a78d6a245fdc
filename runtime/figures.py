"""Figures of a masked reconstruction and of a sound-source heat map, drawn with numpy + OpenCV.

No plotting library: colour maps come from ``cv2.applyColorMap``, text from ``cv2.putText``,
panels are pasted onto a white canvas. Every image here is ``uint8 [H, W, 3]`` in **BGR**
order (what OpenCV writes), so ``save_png`` stores it as is.

Orientation of spectrograms: the model's arrays are ``[T, F]`` (time frames, mel bins); a
picture of one has time on the x axis and the lowest mel bin at the *bottom*, so the array is
transposed to ``[F, T]`` and flipped upside down (image row 0 = highest mel bin).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from cavmae.config import DEFAULT_PREPROCESS
from cavmae.errors import CavmaeError

if TYPE_CHECKING:
    from .pipeline import Reconstruction

Colour = tuple[int, int, int]

WHITE: Colour = (255, 255, 255)
INK: Colour = (35, 35, 35)
MUTED: Colour = (110, 110, 110)
#: removed (masked) patches are painted in this grey, away from every colour of the maps
MASK_GREY: Colour = (150, 150, 150)
SPEC_COLORMAP = cv2.COLORMAP_VIRIDIS
HEAT_COLORMAP = cv2.COLORMAP_JET
FONT = cv2.FONT_HERSHEY_SIMPLEX


# ---------------------------------------------------------------------------------------------
# What the figures say about their inputs


@dataclass(frozen=True)
class ReconstructionInfo:
    """Captions of a reconstruction figure.

    ``frame_shift_s`` converts spectrogram rows to seconds for the time axis; ``offset`` is the
    start of the clip in the file (tick labels are file times). ``image_mean``/``image_std``
    undo the frame normalization.
    """

    source: str = ""
    model: str = ""
    mask_ratio_a: float | None = None
    mask_ratio_v: float | None = None
    mask_mode: str = "unstructured"
    seed: int = 0
    frame_index: int | None = None
    frame_time: float | None = None
    offset: float = 0.0
    frame_shift_s: float = DEFAULT_PREPROCESS.frame_shift_ms / 1000.0
    image_mean: tuple[float, float, float] = DEFAULT_PREPROCESS.image_mean
    image_std: tuple[float, float, float] = DEFAULT_PREPROCESS.image_std


@dataclass(frozen=True)
class LocalizationInfo:
    """Captions of a localization figure; ``alpha`` is the heat map's weight in the overlay."""

    source: str = ""
    model: str = ""
    frame_index: int | None = None
    frame_time: float | None = None
    alpha: float = 0.5
    image_mean: tuple[float, float, float] = DEFAULT_PREPROCESS.image_mean
    image_std: tuple[float, float, float] = DEFAULT_PREPROCESS.image_std


# ---------------------------------------------------------------------------------------------
# Arrays -> pictures


def spectrogram_range(spec: np.ndarray, low: float = 0.5, high: float = 99.5) -> tuple[float, float]:
    """Colour range of a spectrogram: its ``low``..``high`` percentiles (robust to outliers)."""
    vmin, vmax = (float(v) for v in np.percentile(np.asarray(spec, dtype=np.float64), [low, high]))
    if not vmax > vmin:
        vmax = vmin + 1.0
    return vmin, vmax


def spectrogram_to_image(
    spec: np.ndarray,
    vmin: float | None = None,
    vmax: float | None = None,
    removed: np.ndarray | None = None,
    colormap: int = SPEC_COLORMAP,
) -> np.ndarray:
    """``spec [T, F]`` -> ``uint8 [F, T, 3]`` BGR: time on x, low frequencies at the bottom.

    Values are mapped linearly from ``vmin..vmax`` (default: :func:`spectrogram_range`) onto
    the colour map and clipped. ``removed [T, F]`` (bool) marks pixels painted ``MASK_GREY``.
    """
    spec = np.asarray(spec, dtype=np.float32)
    if spec.ndim != 2:
        raise ValueError(f"expected a spectrogram [T, F], got shape {list(spec.shape)}")
    if vmin is None or vmax is None:
        lo, hi = spectrogram_range(spec)
        vmin = lo if vmin is None else vmin
        vmax = hi if vmax is None else vmax
    scaled = np.clip((spec - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    gray = np.round(_time_x_low_bottom(scaled) * 255).astype(np.uint8)
    image = cv2.applyColorMap(gray, colormap)
    if removed is not None:
        image[_time_x_low_bottom(np.asarray(removed, dtype=bool))] = MASK_GREY
    return image


def _time_x_low_bottom(a: np.ndarray) -> np.ndarray:
    """``[T, F] -> [F, T]`` with row 0 = the highest frequency bin."""
    return np.ascontiguousarray(a.T[::-1])


def frame_to_image(
    frame: np.ndarray,
    mean: Sequence[float] = DEFAULT_PREPROCESS.image_mean,
    std: Sequence[float] = DEFAULT_PREPROCESS.image_std,
    removed: np.ndarray | None = None,
) -> np.ndarray:
    """Normalized RGB ``frame [3, H, W]`` -> ``uint8 [H, W, 3]`` BGR.

    Undoes ``(x - mean) / std``, clips to ``[0, 1]``, scales to 0..255. ``removed [H, W]``
    (bool) marks pixels painted ``MASK_GREY``.
    """
    frame = np.asarray(frame, dtype=np.float32)
    if frame.ndim != 3 or frame.shape[0] != 3:
        raise ValueError(f"expected a frame [3, H, W], got shape {list(frame.shape)}")
    m = np.asarray(mean, dtype=np.float32)[:, None, None]
    s = np.asarray(std, dtype=np.float32)[:, None, None]
    rgb = np.clip(frame * s + m, 0.0, 1.0)
    image = np.ascontiguousarray(np.round(rgb * 255).astype(np.uint8).transpose(1, 2, 0)[..., ::-1])
    if removed is not None:
        image[np.asarray(removed, dtype=bool)] = MASK_GREY
    return image


def patch_mask_to_pixels(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Token mask ``[gh * gw]`` (1 = removed, row-major over the patch grid) -> bool ``shape``.

    ``shape`` is the ``(H, W)`` the patches tile; the patch side follows from the token count
    (square patches). For audio use ``(F, T)``, the layout the model patchifies, and transpose.
    """
    h, w = shape
    n = int(np.asarray(mask).size)
    side = int(round(np.sqrt(h * w / max(n, 1))))
    if side < 1 or h % side or w % side or (h // side) * (w // side) != n:
        raise ValueError(f"{n} square patches do not tile an image of {h}x{w}")
    grid = np.asarray(mask).reshape(h // side, w // side) > 0.5
    return np.kron(grid, np.ones((side, side), dtype=bool))


def upsample_heatmap(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a patch-grid map ``[gh, gw]`` to ``size = (H, W)`` (half-pixel
    centres, like ``F.interpolate(mode="bilinear", align_corners=False)``)."""
    h, w = size
    return cv2.resize(np.asarray(heat, dtype=np.float32), (w, h), interpolation=cv2.INTER_LINEAR)


def heatmap_overlay(
    image: np.ndarray, heat: np.ndarray, alpha: float = 0.5, colormap: int = HEAT_COLORMAP,
    vmin: float | None = None, vmax: float | None = None,
) -> np.ndarray:
    """Blend ``heat [H, W]`` (coloured over ``vmin..vmax``, default its min..max) onto the BGR
    ``image [H, W, 3]`` with weight ``alpha``."""
    heat = np.asarray(heat, dtype=np.float32)
    lo = float(heat.min()) if vmin is None else vmin
    hi = float(heat.max()) if vmax is None else vmax
    scaled = np.clip((heat - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    colour = cv2.applyColorMap(np.round(scaled * 255).astype(np.uint8), colormap)
    return cv2.addWeighted(colour, float(alpha), image, 1.0 - float(alpha), 0.0)


def colour_bar(height: int, width: int, colormap: int) -> np.ndarray:
    """A vertical colour bar ``[height, width, 3]``: the top is the map's highest value."""
    ramp = np.linspace(255, 0, height).round().astype(np.uint8)[:, None].repeat(width, 1)
    bar = cv2.applyColorMap(ramp, colormap)
    cv2.rectangle(bar, (0, 0), (width - 1, height - 1), INK, 1)
    return bar


# ---------------------------------------------------------------------------------------------
# Layout helpers


def _ascii(text: str) -> str:
    """Hershey fonts draw ASCII only."""
    return text.encode("ascii", "replace").decode("ascii")


def _text(img: np.ndarray, text: str, x: int, y: int, scale: float = 0.45, colour: Colour = INK,
          thickness: int = 1, align: str = "left") -> None:
    """Draw ``text`` with its baseline at ``y``; ``align`` left/right/center about ``x``."""
    text = _ascii(text)
    (w, _), _ = cv2.getTextSize(text, FONT, scale, thickness)
    if align == "right":
        x -= w
    elif align == "center":
        x -= w // 2
    cv2.putText(img, text, (int(x), int(y)), FONT, scale, colour, thickness, cv2.LINE_AA)


def _fit(text: str, width: int, scale: float, thickness: int = 1) -> str:
    """``text`` cut with an ellipsis so that it fits ``width`` pixels."""
    text = _ascii(text)
    while text and cv2.getTextSize(text, FONT, scale, thickness)[0][0] > width:
        text = text[:-4] + "..." if len(text) > 4 else ""
    return text


def _strip(height: int, width: int) -> np.ndarray:
    return np.full((height, width, 3), 255, dtype=np.uint8)


def _paste(canvas: np.ndarray, image: np.ndarray, x: int, y: int = 0) -> None:
    h, w = image.shape[:2]
    canvas[y : y + h, x : x + w] = image


def _frame_caption(index: int | None, time: float | None) -> str:
    parts = []
    if index is not None:
        parts.append(f"frame {index}")
    if time is not None:
        parts.append(f"t = {time:.2f} s")
    return ", ".join(parts) if parts else "frame"


def _ratio(r: float | None) -> str:
    return "?" if r is None else f"{r:g}"


# ---------------------------------------------------------------------------------------------
# Figures

_SPEC_ZOOM = 2  # each mel bin is drawn this many pixels high
_LEFT = 64  # left margin: frequency labels
_RIGHT = 76  # right margin: colour bar and its labels
_GAP = 8


def reconstruction_figure(rec: Reconstruction, info: ReconstructionInfo | None = None) -> np.ndarray:
    """A figure of one masked reconstruction: ``uint8 [H, W, 3]`` BGR.

    From top to bottom: a header (source, model, mask ratios and mode, seed); the spectrogram
    original / masked / reconstructed (predicted patches pasted into the removed places) on one
    colour scale, time on x, low frequencies at the bottom, removed patches grey, with the
    audio MSE on the removed patches; a time axis; then the frame original / masked /
    reconstructed side by side with the visual MSE.
    """
    info = info or ReconstructionInfo()
    t_len, f_len = rec.audio.shape
    removed_a = patch_mask_to_pixels(rec.mask_a, (f_len, t_len)).T  # [T, F]
    removed_v = patch_mask_to_pixels(rec.mask_v, rec.image.shape[1:])
    n_a, n_v = int(np.asarray(rec.mask_a).sum()), int(np.asarray(rec.mask_v).sum())
    vmin, vmax = spectrogram_range(rec.audio)

    spec_w, spec_h = t_len, f_len * _SPEC_ZOOM
    width = _LEFT + spec_w + _RIGHT
    rows: list[np.ndarray] = []

    # header
    head = _strip(62, width)
    _text(head, _fit(f"Masked reconstruction - {info.source}", width - 2 * _GAP, 0.62, 2), _GAP, 24, 0.62, thickness=2)
    line = (f"model {info.model}   mask ratio: audio {_ratio(info.mask_ratio_a)}, visual"
            f" {_ratio(info.mask_ratio_v)}   audio mask mode: {info.mask_mode}   seed {info.seed}")
    _text(head, _fit(line, width - 2 * _GAP, 0.45), _GAP, 50, 0.45, MUTED)
    rows.append(head)

    # spectrograms
    titles = [
        ("Audio - original", ""),
        ("Audio - masked", f"{n_a} of {rec.mask_a.size} patches removed (grey)"),
        ("Audio - reconstructed", f"MSE on removed patches: {rec.mse_a:.4f}"),
    ]
    specs = [(rec.audio, None), (rec.audio_masked, removed_a), (rec.audio_pasted, None)]
    for k, ((title, note), (spec, removed)) in enumerate(zip(titles, specs, strict=True)):
        strip = _strip(24, width)
        _text(strip, title, _LEFT, 18, 0.5, thickness=1)
        if note:
            _text(strip, note, _LEFT + spec_w, 18, 0.45, MUTED, align="right")
        rows.append(strip)
        img = spectrogram_to_image(spec, vmin, vmax, removed)
        img = cv2.resize(img, (spec_w, spec_h), interpolation=cv2.INTER_NEAREST)
        row = _strip(spec_h + 2, width)  # a 1-pixel frame around the data, not over it
        _paste(row, img, _LEFT, 1)
        cv2.rectangle(row, (_LEFT - 1, 0), (_LEFT + spec_w, spec_h + 1), INK, 1)
        _text(row, f"mel {f_len - 1}", _LEFT - 6, 13, 0.4, MUTED, align="right")
        _text(row, "mel 0", _LEFT - 6, spec_h - 2, 0.4, MUTED, align="right")
        _text(row, "freq", _LEFT - 6, spec_h // 2 + 5, 0.4, MUTED, align="right")
        if k == 0:  # one colour bar: the three share the scale
            bx = _LEFT + spec_w + 10
            _paste(row, colour_bar(spec_h + 2, 14, SPEC_COLORMAP), bx)
            _text(row, f"{vmax:.2f}", bx + 18, 13, 0.4, MUTED)
            _text(row, f"{vmin:.2f}", bx + 18, spec_h - 2, 0.4, MUTED)
        rows.append(row)

    # time axis (ticks every second, labelled with file time)
    axis = _strip(30, width)
    seconds = t_len * info.frame_shift_s
    for s in range(int(np.floor(seconds)) + 1):
        x = _LEFT + int(round(s / info.frame_shift_s))
        if x > _LEFT + spec_w:
            break
        cv2.line(axis, (x, 0), (x, 5), INK, 1)
        _text(axis, f"{info.offset + s:g}", x, 18, 0.4, MUTED, align="center")
    _text(axis, "time (s)", _LEFT + spec_w, 18 + 10, 0.4, MUTED, align="right")
    rows.append(axis)

    # frames
    side = (spec_w - 2 * _GAP) // 3
    frame_titles = [
        f"Frame - original ({_frame_caption(info.frame_index, info.frame_time)})",
        f"masked: {n_v} of {rec.mask_v.size} patches removed",
        f"reconstructed: MSE {rec.mse_v:.4f}",
    ]
    strip = _strip(28, width)
    frames = [
        frame_to_image(rec.image, info.image_mean, info.image_std),
        frame_to_image(rec.image_masked, info.image_mean, info.image_std, removed_v),
        frame_to_image(rec.image_pasted, info.image_mean, info.image_std),
    ]
    row = _strip(side, width)
    for k, (title, img) in enumerate(zip(frame_titles, frames, strict=True)):
        x = _LEFT + k * (side + _GAP)
        _text(strip, _fit(title, side, 0.45), x, 20, 0.45)
        _paste(row, cv2.resize(img, (side, side), interpolation=cv2.INTER_LINEAR), x)
    rows += [_strip(8, width), strip, row]

    foot = _strip(30, width)
    _text(foot, "MSE: mean squared error over the removed patches, in normalized input units;"
          " reconstructed = input with the predicted patches pasted into the removed places.",
          _LEFT, 20, 0.4, MUTED)
    rows.append(foot)
    return np.vstack(rows)


def localization_figure(frame: np.ndarray, heat: np.ndarray, info: LocalizationInfo | None = None,
                        zoom: int = 2) -> np.ndarray:
    """A figure of a sound-source map: ``uint8 [H, W, 3]`` BGR.

    Left the frame, right the frame with ``heat [gh, gw]`` (bilinearly upsampled to the frame
    size, coloured from its min to its max) blended over it and its peak circled; a colour bar
    labelled with the map's raw minimum and maximum; a header with source, model and frame time.
    Panels are drawn ``zoom`` times the frame size.
    """
    info = info or LocalizationInfo()
    heat = np.asarray(heat, dtype=np.float32)
    base = frame_to_image(frame, info.image_mean, info.image_std)
    h, w = base.shape[:2]
    up = upsample_heatmap(heat, (h, w))
    overlay = heatmap_overlay(base, up, info.alpha)
    side_h, side_w = h * zoom, w * zoom
    left = cv2.resize(base, (side_w, side_h), interpolation=cv2.INTER_CUBIC)
    right = cv2.resize(overlay, (side_w, side_h), interpolation=cv2.INTER_CUBIC)
    gh, gw = heat.shape
    py, px = np.unravel_index(int(np.argmax(heat)), heat.shape)
    centre = (int((px + 0.5) * side_w / gw), int((py + 0.5) * side_h / gh))
    cv2.circle(right, centre, max(6, side_w // (2 * gw)), WHITE, 2, cv2.LINE_AA)

    bar_w, label_w = 16, 64
    width = _GAP + side_w + _GAP + side_w + _GAP + bar_w + label_w
    head = _strip(62, width)
    _text(head, _fit(f"Sound-source localization - {info.source}", width - 2 * _GAP, 0.62, 2),
          _GAP, 24, 0.62, thickness=2)
    line = (f"model {info.model}   {_frame_caption(info.frame_index, info.frame_time)}   cosine(audio"
            f" embedding, visual patch), {gh}x{gw} map upsampled bilinearly")
    _text(head, _fit(line, width - 2 * _GAP, 0.45), _GAP, 50, 0.45, MUTED)

    titles = _strip(26, width)
    _text(titles, "frame", _GAP, 18, 0.5)
    _text(titles, "heat map (circle: peak)", 2 * _GAP + side_w, 18, 0.5)
    body = _strip(side_h, width)
    _paste(body, left, _GAP)
    _paste(body, right, 2 * _GAP + side_w)
    bx = 3 * _GAP + 2 * side_w
    _paste(body, colour_bar(side_h, bar_w, HEAT_COLORMAP), bx)
    _text(body, f"{float(heat.max()):.3f}", bx + bar_w + 5, 12, 0.42, INK)
    _text(body, "max", bx + bar_w + 5, 28, 0.38, MUTED)
    _text(body, "min", bx + bar_w + 5, side_h - 20, 0.38, MUTED)
    _text(body, f"{float(heat.min()):.3f}", bx + bar_w + 5, side_h - 4, 0.42, INK)
    foot = _strip(28, width)
    _text(foot, f"colours span the map's own range (min..max cosine); overlay weight {info.alpha:g}",
          _GAP, 19, 0.4, MUTED)
    return np.vstack([head, titles, body, foot])


# ---------------------------------------------------------------------------------------------
# Writing


def check_png_path(path: str | Path) -> Path:
    """``path`` as a ``Path`` if it can name a PNG figure (ends in ``.png``, is not a folder).

    Raises:
        CavmaeError: it cannot; commands call this before any slow work.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise CavmaeError(f"the figure is a PNG: give an output path ending in .png, not {path.name!r}")
    if path.is_dir():
        raise CavmaeError(f"{path} is a folder; give a file name ending in .png")
    return path


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write ``image`` (``uint8 [H, W, 3]`` BGR or ``[H, W]``) to ``path`` as PNG, atomically:
    it appears complete under its name or not at all. Missing parent folders are created.

    Raises:
        CavmaeError: ``path`` does not end in ``.png``, or it cannot be written.
    """
    path = check_png_path(path)
    ok, data = cv2.imencode(".png", np.ascontiguousarray(image))
    if not ok:
        raise CavmaeError(f"cannot encode the figure as PNG (shape {list(np.shape(image))})")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # a plain open (not mkstemp) so the file gets the usual permissions, not 0600
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(data.tobytes())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as e:
        raise CavmaeError(f"cannot write {path}: {e.strerror or e}") from None
    return path
