"""Training-time augmentation: mixup, SpecAugment, noise and roll, label smoothing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cavmae.augment import (
    AugmentConfig,
    add_noise,
    mask_band,
    mix,
    mix_waveforms,
    mixup_lambda,
    smooth_labels,
    spec_augment,
    time_roll,
)


def test_mixup_lambda_is_beta_10_10():
    rng = np.random.default_rng(0)
    lam = np.array([mixup_lambda(rng) for _ in range(4000)])
    assert ((lam > 0) & (lam < 1)).all()
    # Beta(10, 10): mean 0.5, std sqrt(1 / (4 * 21)) = 0.109
    assert lam.mean() == pytest.approx(0.5, abs=0.01)
    assert lam.std() == pytest.approx(0.109, abs=0.01)
    assert mixup_lambda(np.random.default_rng(7)) == mixup_lambda(np.random.default_rng(7))


def test_mix_waveforms_pads_cuts_and_centres():
    a = np.ones(100, np.float32) + np.sin(np.arange(100))
    short = np.full(40, 3.0, np.float32)
    long = np.arange(300, dtype=np.float32)
    for other in (short, long):
        out = mix_waveforms(a, other, 0.7)
        assert out.shape == (100,) and out.dtype == np.float32
        assert abs(out.mean()) < 1e-5
    # lam = 1: the first waveform, mean-subtracted
    np.testing.assert_allclose(mix_waveforms(a, long, 1.0), a - a.mean(), atol=1e-6)
    # the partner is padded with zeros after its own mean removal
    b = np.array([1.0, 3.0], np.float32)  # mean 2 -> [-1, 1, 0, 0]
    out = mix_waveforms(np.zeros(4, np.float32), b, 0.0)
    np.testing.assert_allclose(out, [-1, 1, 0, 0], atol=1e-6)
    with pytest.raises(ValueError):
        mix_waveforms(np.zeros((2, 4)), b, 0.5)


def test_mix_and_smooth_labels():
    y1 = np.array([1, 0, 0, 0], np.float32)
    y2 = np.array([0, 0, 1, 0], np.float32)
    np.testing.assert_allclose(mix(y1, y2, 0.25), [0.25, 0, 0.75, 0])
    np.testing.assert_allclose(smooth_labels(y1, 0.1), [0.925, 0.025, 0.025, 0.025])
    assert smooth_labels(y1, 0.0) is not None and smooth_labels(y1, 0.0)[0] == 1.0
    assert smooth_labels(mix(y1, y2, 0.4), 0.1).sum() == pytest.approx(1.0)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    freqm=st.integers(0, 128),
    timem=st.integers(0, 1024),
)
def test_spec_augment_masks_one_band_each(seed, freqm, timem):
    x = np.random.default_rng(1).standard_normal((1024, 128)).astype(np.float32) + 5.0
    fill = -1.5
    out = spec_augment(x, np.random.default_rng(seed), freqm, timem, fill)
    assert out.shape == x.shape and out is not x
    masked = out == fill
    cols = np.flatnonzero(masked.all(axis=0))  # whole frequency bins
    rows = np.flatnonzero(masked.all(axis=1))  # whole time frames
    assert len(cols) <= max(freqm - 1, 0)
    assert len(rows) <= max(timem - 1, 0)
    for band in (cols, rows):
        if len(band):
            assert (np.diff(band) == 1).all()  # contiguous
    # everything else untouched
    outside = ~(np.isin(np.arange(128), cols)[None, :] | np.isin(np.arange(1024), rows)[:, None])
    np.testing.assert_array_equal(out[outside], x[outside])
    # deterministic given the generator
    np.testing.assert_array_equal(out, spec_augment(x, np.random.default_rng(seed), freqm, timem, fill))


def test_mask_band_follows_torchaudio_rule():
    # width = u1 * max_width, start = int(u2 * (size - width)); band [start, start + int(width))
    rng = np.random.default_rng(3)
    u1, u2 = np.random.default_rng(3).random(2)
    x = np.zeros((10, 50), np.float32)
    mask_band(x, rng, 20, axis=1, fill=1.0)
    width = u1 * 20
    start = int(u2 * (50 - width))
    expected = np.zeros(50)
    expected[start : start + int(width)] = 1
    np.testing.assert_array_equal(x[0], expected)


def test_noise_and_roll():
    x = np.random.default_rng(0).standard_normal((1024, 128)).astype(np.float32)
    noisy = add_noise(x, np.random.default_rng(1))
    d = noisy - x
    assert d.dtype == np.float32 and (d >= -1e-6).all() and (d < 0.1).all() and d.max() > 0
    rolled = time_roll(x, np.random.default_rng(2), 10)
    shifts = [s for s in range(-10, 10) if np.array_equal(np.roll(x, s, axis=0), rolled)]
    assert len(shifts) == 1
    all_shifts = set()
    for s in range(200):
        r = time_roll(x, np.random.default_rng(s), 3)
        all_shifts |= {k for k in range(-3, 3) if np.array_equal(np.roll(x, k, axis=0), r)}
    assert all_shifts == {-3, -2, -1, 0, 1, 2}  # randint(-max, max): the upper bound excluded
    np.testing.assert_array_equal(time_roll(x, np.random.default_rng(2), 0), x)


def test_augment_config_validation():
    assert not AugmentConfig().active
    assert AugmentConfig(noise=True).active
    for bad in ({"mixup": 1.5}, {"freqm": -1}, {"label_smooth": 1.0}, {"mixup_alpha": 0}, {"roll_frames": -2}):
        with pytest.raises(ValueError):
            AugmentConfig(**bad)
