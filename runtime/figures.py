"""Figures of a masked reconstruction and of a sound-source heat map, drawn with numpy + OpenCV.

No plotting library: colour maps come from ``cv2.applyColorMap``, panels are pasted onto a
white canvas. Every image here is ``uint8 [H, W, 3]`` in **BGR** order (what OpenCV writes),
so ``save_png`` stores it as is.

Text is drawn with Pillow's FreeType renderer in DejaVu Sans, bundled in ``cavmae/assets/fonts``
(OpenCV's Hershey fonts are ASCII only and would turn ``café.mp4`` into ``caf?.mp4``). DejaVu
covers Latin, Greek, Cyrillic, Arabic, Hebrew and many symbols; a character it lacks (CJK, for
one) is drawn with the first installed system font that has it (:data:`FALLBACK_FONTS`).

Orientation of spectrograms: the model's arrays are ``[T, F]`` (time frames, mel bins); a
picture of one has time on the x axis and the lowest mel bin at the *bottom*, so the array is
transposed to ``[F, T]`` and flipped upside down (image row 0 = highest mel bin).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

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
#: the line at the end of the clip's audio (the spectrogram's zero padding starts there)
PAD_MARK: Colour = (255, 255, 255)
SPEC_COLORMAP = cv2.COLORMAP_VIRIDIS
HEAT_COLORMAP = cv2.COLORMAP_JET
#: what the colour bars show
SPEC_UNITS = "normalized log-mel"
HEAT_UNITS = "cosine similarity"

#: system fonts tried, in order, for characters DejaVu Sans lacks (CJK and other scripts)
FALLBACK_FONTS: tuple[str, ...] = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial Unicode.ttf",
    "/Library/Fonts/Arial Unicode.ttf",
    "/System/Library/Fonts/Hiragino Sans GB.ttc",
    "C:/Windows/Fonts/msyh.ttc",
    "C:/Windows/Fonts/YuGothR.ttc",
    "C:/Windows/Fonts/malgun.ttf",
    "C:/Windows/Fonts/seguisym.ttf",
)


# ---------------------------------------------------------------------------------------------
# What the figures say about their inputs


@dataclass(frozen=True)
class ReconstructionInfo:
    """Captions of a reconstruction figure.

    ``frame_shift_s`` converts spectrogram rows to seconds for the time axis; ``offset`` is the
    start of the clip in the file (tick labels are file times). ``audio_frames``: how many
    spectrogram rows were computed from the clip's audio (``cavmae.audio.audio_frames``); the
    rows after them are zero padding, and the panels mark where it starts (``None``: no mark).
    ``image_mean``/``image_std`` undo the frame normalization.
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
    audio_frames: int | None = None
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


# -- text ------------------------------------------------------------------------------------
# Sizes are given as the OpenCV-style ``scale`` the layout was designed with; a scale of 1
# is a 30 px font. ``thickness`` 2 selects the bold face.


def _px(scale: float) -> int:
    return max(6, int(round(scale * 30)))


@functools.cache
def _font(size: int, bold: bool) -> ImageFont.FreeTypeFont:
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    with resources.as_file(resources.files("cavmae") / "assets" / "fonts" / name) as path:
        return ImageFont.truetype(str(path), size)


@functools.cache
def _fallbacks(size: int) -> tuple[ImageFont.FreeTypeFont, ...]:
    fonts = []
    for path in FALLBACK_FONTS:
        if Path(path).is_file():
            try:
                fonts.append(ImageFont.truetype(path, size))
            except OSError:  # unreadable or not a font: skip it
                continue
    return tuple(fonts)


@functools.cache
def _has_glyph(font: ImageFont.FreeTypeFont, char: str) -> bool:
    """Whether ``font`` maps ``char`` to a glyph: FreeType draws a missing one as the font's
    .notdef glyph, the same picture as a noncharacter's."""
    if char.isspace():
        return True

    def picture(c: str) -> tuple[tuple[int, int], bytes]:
        mask = font.getmask(c)
        return mask.size, bytes(mask)

    return picture(char) != picture("\uffff")


def _runs(text: str, size: int, bold: bool) -> list[tuple[ImageFont.FreeTypeFont, str]]:
    """``text`` split into runs drawn with one font each: DejaVu where it has the glyph, else
    the first fallback that has it (else DejaVu's .notdef box)."""
    main = _font(size, bold)
    runs: list[tuple[ImageFont.FreeTypeFont, str]] = []
    for char in text:
        font = main
        if not _has_glyph(main, char):
            font = next((f for f in _fallbacks(size) if _has_glyph(f, char)), main)
        if runs and runs[-1][0] is font:
            runs[-1] = (font, runs[-1][1] + char)
        else:
            runs.append((font, char))
    return runs


def _text_width(text: str, scale: float, thickness: int = 1) -> int:
    size = _px(scale)
    return int(np.ceil(sum(f.getlength(t) for f, t in _runs(text, size, thickness > 1))))


def _text_mask(text: str, scale: float, thickness: int = 1) -> tuple[np.ndarray, int]:
    """The coverage ``uint8 [h, w]`` of ``text`` and the baseline's row in it."""
    size = _px(scale)
    runs = _runs(text, size, thickness > 1)
    ascent = max(f.getmetrics()[0] for f, _ in runs) if runs else size
    descent = max(f.getmetrics()[1] for f, _ in runs) if runs else 0
    pad = 2  # room for glyphs that reach left of their origin
    canvas = Image.new("L", (_text_width(text, scale, thickness) + 2 * pad, ascent + descent), 0)
    draw = ImageDraw.Draw(canvas)
    x = float(pad)
    for font, part in runs:
        draw.text((x, ascent), part, font=font, fill=255, anchor="ls")
        x += font.getlength(part)
    return np.asarray(canvas), ascent


def _blend(img: np.ndarray, mask: np.ndarray, x: int, y: int, colour: Colour) -> None:
    """Paint ``colour`` into ``img`` with coverage ``mask`` placed at column ``x``, row ``y``."""
    h, w = mask.shape
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, img.shape[1]), min(y + h, img.shape[0])
    if x1 <= x0 or y1 <= y0:
        return
    a = mask[y0 - y : y1 - y, x0 - x : x1 - x, None].astype(np.float32) / 255.0
    region = img[y0:y1, x0:x1].astype(np.float32)
    img[y0:y1, x0:x1] = np.round(region * (1 - a) + np.asarray(colour, np.float32) * a).astype(np.uint8)


def _text(img: np.ndarray, text: str, x: int, y: int, scale: float = 0.45, colour: Colour = INK,
          thickness: int = 1, align: str = "left") -> None:
    """Draw ``text`` with its baseline at ``y``; ``align`` left/right/center about ``x``."""
    w = _text_width(text, scale, thickness)
    if align == "right":
        x -= w
    elif align == "center":
        x -= w // 2
    mask, baseline = _text_mask(text, scale, thickness)
    _blend(img, mask, int(x) - 2, int(y) - baseline, colour)


def _vertical_text(img: np.ndarray, text: str, x: int, cy: int, scale: float = 0.4,
                   colour: Colour = MUTED) -> None:
    """Draw ``text`` reading bottom to top, its left edge at column ``x``, centred on row ``cy``."""
    mask, _ = _text_mask(text, scale)
    mask = np.ascontiguousarray(np.rot90(mask))  # counter-clockwise: reads upwards
    _blend(img, mask, int(x), int(cy) - mask.shape[0] // 2, colour)


def _fit(text: str, width: int, scale: float, thickness: int = 1) -> str:
    """``text`` cut with an ellipsis so that it fits ``width`` pixels."""
    while text and _text_width(text, scale, thickness) > width:
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
    colour scale (the bar beside the first: normalized log-mel), time on x, low frequencies at
    the bottom, removed patches grey, with the audio MSE on the removed patches; a ``PAD_MARK``
    line in each at the first padded time frame when ``info.audio_frames`` says the clip's audio
    ends before the spectrogram does; a time axis; then the frame original / masked /
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
    pad_from = info.audio_frames if info.audio_frames is not None and info.audio_frames < t_len else None
    pad_note = ""
    if pad_from is not None:
        pad_note = (f"audio ends at {info.offset + pad_from * info.frame_shift_s:.2f} s (white line);"
                    " zero padding after it")
    titles = [
        ("Audio - original", pad_note),
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
        if pad_from is not None:  # the first time frame of the padding, over the whole height
            row[1 : spec_h + 1, _LEFT + pad_from] = PAD_MARK
        _text(row, f"mel {f_len - 1}", _LEFT - 6, 13, 0.4, MUTED, align="right")
        _text(row, "mel 0", _LEFT - 6, spec_h - 2, 0.4, MUTED, align="right")
        _text(row, "freq", _LEFT - 6, spec_h // 2 + 5, 0.4, MUTED, align="right")
        if k == 0:  # one colour bar: the three share the scale
            bx = _LEFT + spec_w + 10
            _paste(row, colour_bar(spec_h + 2, 14, SPEC_COLORMAP), bx)
            _text(row, f"{vmax:.2f}", bx + 18, 13, 0.4, MUTED)
            _text(row, f"{vmin:.2f}", bx + 18, spec_h - 2, 0.4, MUTED)
            _vertical_text(row, SPEC_UNITS, bx + 20, spec_h // 2 + 1, 0.4)
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
    labelled "cosine similarity" and with the map's raw minimum and maximum; a header with
    source, model and frame time.
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
    _vertical_text(body, HEAT_UNITS, bx + bar_w + 8, side_h // 2, 0.45)
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
