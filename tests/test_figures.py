"""Figures drawn with numpy + OpenCV: orientation, un-normalization, layout sizes, text in any
script, the padding mark, colour-bar captions, PNG writing."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from cavmae.config import DEFAULT_PREPROCESS
from cavmae.errors import CavmaeError
from cavmae.patches import audio_to_image, image_to_audio, patchify, unpatchify
from cavmae.runtime.figures import (
    MASK_GREY,
    PAD_MARK,
    LocalizationInfo,
    ReconstructionInfo,
    frame_to_image,
    heatmap_overlay,
    localization_figure,
    patch_mask_to_pixels,
    reconstruction_figure,
    save_png,
    spectrogram_to_image,
    upsample_heatmap,
)
from cavmae.runtime.pipeline import Reconstruction

MEAN = np.array(DEFAULT_PREPROCESS.image_mean, dtype=np.float32)[:, None, None]
STD = np.array(DEFAULT_PREPROCESS.image_std, dtype=np.float32)[:, None, None]


def _normalize(rgb01: np.ndarray) -> np.ndarray:
    """``[3, H, W]`` RGB in 0..1 -> model input units."""
    return ((rgb01 - MEAN) / STD).astype(np.float32)


def _brightness(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float64).sum(-1)


def test_spectrogram_low_frequencies_early_frames_are_bottom_left():
    t_len, f_len = 1024, 128
    spec = np.full((t_len, f_len), -2.0, dtype=np.float32)
    spec[:100, :16] = 3.0  # energy only in the low mel bins of the first second
    img = spectrogram_to_image(spec)
    assert img.shape == (f_len, t_len, 3) and img.dtype == np.uint8
    b = _brightness(img)
    bottom_left = b[-16:, :100].mean()
    assert bottom_left > 2 * b[:16, :100].mean()  # not top-left (frequency not flipped)
    assert bottom_left > 2 * b[-16:, -100:].mean()  # not bottom-right (time not reversed)
    assert bottom_left > 2 * b[:-16, 100:].mean()
    # exact placement: row F-1-bin, column t
    assert b[f_len - 1, 0] == b.max() and b[f_len - 16, 99] == b.max()
    assert b[f_len - 17, 99] < b.max() and b[f_len - 1, 100] < b.max()


def test_spectrogram_rising_tone_rises_and_colour_range_is_shared():
    spec = np.zeros((64, 32), dtype=np.float32)
    for t in range(64):
        spec[t, t // 2] = 1.0
    img = spectrogram_to_image(spec, vmin=0.0, vmax=1.0)
    peak_rows = _brightness(img).argmax(0)  # per column, the row of the tone
    assert peak_rows[0] == 31 and peak_rows[-1] == 0  # starts at the bottom, ends at the top
    assert np.all(np.diff(peak_rows) <= 0)
    # values beyond the range clip to the map's ends
    clipped = spectrogram_to_image(spec * 5 - 1, vmin=0.0, vmax=1.0)
    low = cv2.applyColorMap(np.zeros((1, 1), np.uint8), cv2.COLORMAP_VIRIDIS)[0, 0]
    np.testing.assert_array_equal(clipped[0, 0], low)


def test_removed_patches_are_grey_where_the_model_removes_them():
    rng = np.random.default_rng(0)
    t_len, f_len, p = 256, 64, 16
    grid = (f_len // p, t_len // p)
    mask = (rng.random(grid[0] * grid[1]) < 0.5).astype(np.float32)
    # the pipeline's way of zeroing removed patches ([T, F] <-> patches over [F, T])
    audio = np.ones((1, t_len, f_len), np.float32)
    target = patchify(audio_to_image(audio), p)
    zeroed = image_to_audio(unpatchify(target * (1 - mask[None, :, None]), p, grid, 1))[0]
    removed = patch_mask_to_pixels(mask, (f_len, t_len)).T
    np.testing.assert_array_equal(removed, zeroed == 0)
    img = spectrogram_to_image(rng.normal(size=(t_len, f_len)), removed=removed)
    grey = np.all(img == MASK_GREY, axis=-1)
    np.testing.assert_array_equal(grey, removed.T[::-1])
    with pytest.raises(ValueError, match="do not tile"):
        patch_mask_to_pixels(mask[:-1], (f_len, t_len))


def test_frame_unnormalization_round_trip_gives_bgr():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(3, 32, 48), dtype=np.uint8)
    img = frame_to_image(_normalize(rgb.astype(np.float32) / 255))
    assert img.shape == (32, 48, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(img, rgb.transpose(1, 2, 0)[..., ::-1])
    # out-of-range values clip instead of wrapping
    assert frame_to_image(np.full((3, 4, 4), 100.0, np.float32)).min() == 255
    assert frame_to_image(np.full((3, 4, 4), -100.0, np.float32)).max() == 0
    removed = np.zeros((32, 48), bool)
    removed[:16, :16] = True
    grey = frame_to_image(_normalize(rgb / 255.0), removed=removed)
    assert np.all(grey[:16, :16] == MASK_GREY) and np.array_equal(grey[16:], img[16:])


def test_heatmap_upsampling_and_overlay_colours():
    heat = np.zeros((14, 14), np.float32)
    heat[0, 0] = 1.0
    up = upsample_heatmap(heat, (224, 224))
    assert up.shape == (224, 224)
    assert np.unravel_index(up.argmax(), up.shape) < (16, 16) and up[200, 200] == 0
    np.testing.assert_allclose(upsample_heatmap(np.full((14, 14), 0.3), (224, 224)), 0.3, atol=1e-6)
    grey = np.full((224, 224, 3), 128, np.uint8)
    over = heatmap_overlay(grey, up, alpha=0.5).astype(int)
    assert over[2, 2, 2] > over[2, 2, 0]  # hot: red (BGR) over blue
    assert over[200, 200, 0] > over[200, 200, 2]  # cold: blue over red


def _hand_made_reconstruction(t_len=1024, f_len=128, size=224) -> Reconstruction:
    rng = np.random.default_rng(2)
    spec = rng.normal(size=(t_len, f_len)).astype(np.float32)
    image = rng.normal(size=(3, size, size)).astype(np.float32)
    la, lv = (t_len // 16) * (f_len // 16), (size // 16) ** 2
    mask_a = (rng.random(la) < 0.75).astype(np.float32)
    mask_v = (rng.random(lv) < 0.75).astype(np.float32)
    return Reconstruction(
        audio=spec, audio_masked=spec, audio_pred=spec, audio_pasted=spec,
        image=image, image_masked=image, image_pred=image, image_pasted=image,
        mask_a=mask_a, mask_v=mask_v, mse_a=0.5, mse_v=0.25,
    )


def test_reconstruction_figure_size_and_content():
    rec = _hand_made_reconstruction()
    info = ReconstructionInfo(source="clip.mp4", model="tiny", mask_ratio_a=0.75, mask_ratio_v=0.75,
                              mask_mode="time", seed=3, frame_index=5, frame_time=4.88)
    fig = reconstruction_figure(rec, info)
    assert fig.dtype == np.uint8 and fig.shape == (1340, 1164, 3)
    assert np.all(fig[0, :] == 255)  # white canvas
    # the original spectrogram, drawn twice as high, sits under the header and its title, whole
    spec = cv2.resize(spectrogram_to_image(rec.audio), (1024, 256), interpolation=cv2.INTER_NEAREST)
    top = 62 + 24 + 1
    np.testing.assert_array_equal(fig[top : top + 256, 64 : 64 + 1024], spec)
    # grey (removed) pixels appear in the figure: the masked panels
    assert np.all(fig == MASK_GREY, axis=-1).sum() > 0.5 * rec.mask_a.sum() * 16 * 16
    # smaller inputs lay out too (the width follows the spectrogram's length)
    small = reconstruction_figure(_hand_made_reconstruction(256, 64, 112))
    assert small.shape[1] == 64 + 256 + 76


def test_localization_figure_size():
    rng = np.random.default_rng(3)
    frame = rng.normal(size=(3, 224, 224)).astype(np.float32)
    heat = rng.uniform(-0.2, 0.5, size=(14, 14)).astype(np.float32)
    fig = localization_figure(frame, heat, LocalizationInfo(source="clip.mp4", model="m", frame_index=5,
                                                            frame_time=4.88))
    assert fig.dtype == np.uint8 and fig.shape == (62 + 26 + 448 + 28, 8 + 448 + 8 + 448 + 8 + 16 + 64, 3)
    # the left panel is the frame itself, enlarged
    left = cv2.resize(frame_to_image(frame), (448, 448), interpolation=cv2.INTER_CUBIC)
    np.testing.assert_array_equal(fig[88 : 88 + 448, 8 : 8 + 448], left)


def test_save_png_writes_a_readable_file_atomically(tmp_path):
    img = np.random.default_rng(4).integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
    out = save_png(img, tmp_path / "sub" / "fig.png")
    assert out.is_file()
    np.testing.assert_array_equal(cv2.imread(str(out), cv2.IMREAD_UNCHANGED), img)
    assert [p.name for p in out.parent.iterdir()] == ["fig.png"]  # no temporary left behind
    save_png(img[:, :30], out)  # overwrite
    assert cv2.imread(str(out)).shape == (40, 30, 3)
    with pytest.raises(CavmaeError, match=r"ending in \.png"):
        save_png(img, tmp_path / "fig.jpg")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(CavmaeError, match="folder"):
        save_png(img, tmp_path / "dir.png")


def _header(fig: np.ndarray) -> np.ndarray:
    return fig[:40]


def test_non_ascii_file_names_are_drawn_not_replaced_by_question_marks():
    rec = _hand_made_reconstruction(256, 64, 112)
    drawn = {name: _header(reconstruction_figure(rec, ReconstructionInfo(source=name)))
             for name in ("café_Привет_Ωμέγα.mp4", "caf?_??????_?????.mp4", "cafe_Privet_Omega.mp4")}
    assert not np.array_equal(drawn["café_Привет_Ωμέγα.mp4"], drawn["caf?_??????_?????.mp4"])
    assert not np.array_equal(drawn["café_Привет_Ωμέγα.mp4"], drawn["cafe_Privet_Omega.mp4"])
    # each letter is its own glyph: 'é' is not 'e' and not '?', 'П' is not '?'
    from cavmae.runtime.figures import _text_mask

    glyphs = {c: _text_mask(c, 0.62, 2)[0] for c in "éeП?"}
    for a, b in (("é", "e"), ("é", "?"), ("П", "?")):
        assert glyphs[a].shape != glyphs[b].shape or not np.array_equal(glyphs[a], glyphs[b]), (a, b)
    loc = [localization_figure(np.zeros((3, 224, 224), np.float32), np.eye(2, dtype=np.float32),
                               LocalizationInfo(source=name)) for name in ("Ёлка.mp4", "????.mp4")]
    assert not np.array_equal(_header(loc[0]), _header(loc[1]))


def test_spectrograms_mark_where_the_padding_starts():
    rec = _hand_made_reconstruction()
    top = 62 + 24 + 1  # header, title strip, frame line
    panel_step = 24 + 256 + 2
    plain = reconstruction_figure(rec, ReconstructionInfo())
    marked = reconstruction_figure(rec, ReconstructionInfo(audio_frames=700))
    assert marked.shape == plain.shape
    for k in range(3):  # all three spectrogram panels, over their whole height
        rows = slice(top + k * panel_step, top + k * panel_step + 256)
        assert np.all(marked[rows, 64 + 700] == PAD_MARK), k
        assert not np.all(plain[rows, 64 + 700] == PAD_MARK), k
        # nothing else in the panel changed
        np.testing.assert_array_equal(np.delete(marked[rows, 64 : 64 + 1024], 700, axis=1),
                                      np.delete(plain[rows, 64 : 64 + 1024], 700, axis=1))
    # the note says when the audio ends (file time: offset + rows x 10 ms)
    assert not np.array_equal(marked[62 : 62 + 24], plain[62 : 62 + 24])
    full = reconstruction_figure(rec, ReconstructionInfo(audio_frames=1024))  # no padding: no mark
    np.testing.assert_array_equal(full, plain)


def test_colour_bars_say_what_they_show():
    from cavmae.runtime.figures import HEAT_UNITS, SPEC_UNITS

    assert (SPEC_UNITS, HEAT_UNITS) == ("normalized log-mel", "cosine similarity")
    rec = _hand_made_reconstruction()
    fig = reconstruction_figure(rec)
    top, bar_x = 62 + 24 + 1, 64 + 1024 + 10
    # beside the bar, between the max and min labels, the caption runs upwards
    caption = fig[top + 40 : top + 216, bar_x + 18 : bar_x + 40]
    assert (caption.astype(int).sum(-1) < 600).sum() > 150
    ink_rows = np.where((caption.astype(int).sum(-1) < 600).any(1))[0]
    assert ink_rows.max() - ink_rows.min() > 100  # a word written along the bar, not a number
    heat = np.random.default_rng(0).uniform(-0.2, 0.5, (14, 14)).astype(np.float32)
    loc = localization_figure(np.zeros((3, 224, 224), np.float32), heat)
    label = loc[88 + 60 : 88 + 388, 8 + 448 + 8 + 448 + 8 + 16 : ]
    dark = label.astype(int).sum(-1) < 600
    assert dark.sum() > 150 and np.ptp(np.where(dark.any(1))[0]) > 100
