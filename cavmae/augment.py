"""Training-time augmentation, as the reference recipe applies it (docs/model.md §9).

numpy only, and every random draw comes from an explicit :class:`numpy.random.Generator`, so an
augmented sample is a pure function of its inputs and the generator's seed. The training loop
seeds one generator per sample from ``(run seed, epoch, position in the epoch)``; that makes a
resumed or re-sharded run see exactly the samples an uninterrupted one sees.

The reference order inside one training sample:

1. mixup (with probability ``mixup``): ``lambda ~ Beta(10, 10)``; the *waveforms* are mixed
   (each mean-subtracted, the partner zero-padded or cut to the first one's length, the mix
   mean-subtracted again) and so are the two normalized images and the two label vectors;
2. log-mel fbank of the (mixed) waveform, padded or cut to ``target_length`` frames;
3. SpecAugment: one frequency band of width ``U[0, freqm)`` and one time band of width
   ``U[0, timem)`` are set to zero (torchaudio ``FrequencyMasking`` / ``TimeMasking``);
4. normalization ``(x - fbank_mean) / fbank_std``;
5. noise: ``x + U[0,1)^{T x F} * U[0,1) / 10``, then a circular time roll by
   ``randint(-roll_frames, roll_frames)`` frames (the reference rolls by up to
   ``target_length`` frames; ``roll_frames`` sets the bound);
6. label smoothing of the (mixed) targets.

The reference masks *before* normalizing, so masked cells hold the normalized value of a zero
log-mel, ``-fbank_mean / fbank_std`` (about 1.133), not 0. :func:`spec_augment` works on the
normalized input and takes that fill value, which gives the reference's result exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "AugmentConfig",
    "add_noise",
    "mask_band",
    "mix",
    "mix_waveforms",
    "mixup_lambda",
    "smooth_labels",
    "spec_augment",
    "time_roll",
]


@dataclass(frozen=True)
class AugmentConfig:
    """Knobs of the training-time augmentation. All off by default (evaluation).

    Attributes:
        mixup: probability that a sample is mixed with a random partner (reference 0.5).
        mixup_alpha: ``lambda ~ Beta(alpha, alpha)`` (reference 10).
        freqm: maximum width of the SpecAugment frequency band, in mel bins (reference 48).
        timem: maximum width of the SpecAugment time band, in frames (reference 192).
        noise: add uniform noise and roll the spectrogram in time (reference: on).
        roll_frames: bound of the random time roll; ``None`` = the target length (reference).
        label_smooth: label smoothing ``eps``: ``y (1 - eps) + eps / C`` (reference 0.1).
    """

    mixup: float = 0.0
    mixup_alpha: float = 10.0
    freqm: int = 0
    timem: int = 0
    noise: bool = False
    roll_frames: int | None = None
    label_smooth: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.mixup <= 1.0:
            raise ValueError(f"mixup is a probability in [0, 1], got {self.mixup}")
        if self.mixup_alpha <= 0:
            raise ValueError(f"mixup_alpha must be > 0, got {self.mixup_alpha}")
        if self.freqm < 0 or self.timem < 0:
            raise ValueError(f"freqm and timem must be >= 0, got {self.freqm}, {self.timem}")
        if self.roll_frames is not None and self.roll_frames < 0:
            raise ValueError(f"roll_frames must be >= 0, got {self.roll_frames}")
        if not 0.0 <= self.label_smooth < 1.0:
            raise ValueError(f"label_smooth must be in [0, 1), got {self.label_smooth}")

    @property
    def active(self) -> bool:
        return bool(
            self.mixup > 0 or self.freqm or self.timem or self.noise or self.label_smooth > 0
        )


def mixup_lambda(rng: np.random.Generator, alpha: float = 10.0) -> float:
    """``lambda ~ Beta(alpha, alpha)``: the weight of the first sample."""
    return float(rng.beta(alpha, alpha))


def mix_waveforms(first: np.ndarray, second: np.ndarray, lam: float) -> np.ndarray:
    """Mix two mono waveforms as the reference does: ``[n1]``, ``[n2]`` -> ``[n1]`` float32.

    Each is mean-subtracted; ``second`` is zero-padded or cut to ``len(first)``; the mix
    ``lam * first + (1 - lam) * second`` is mean-subtracted again.
    """
    a = np.asarray(first, dtype=np.float64)
    b = np.asarray(second, dtype=np.float64)
    if a.ndim != 1 or b.ndim != 1:
        raise ValueError(f"expected mono waveforms [n], got shapes {a.shape} and {b.shape}")
    a = a - a.mean()
    b = b - b.mean()
    if b.shape[0] < a.shape[0]:
        b = np.pad(b, (0, a.shape[0] - b.shape[0]))
    else:
        b = b[: a.shape[0]]
    mixed = lam * a + (1.0 - lam) * b
    return (mixed - mixed.mean()).astype(np.float32)


def mix(first: np.ndarray, second: np.ndarray, lam: float) -> np.ndarray:
    """``lam * first + (1 - lam) * second`` in float32 (images ``[3,H,W]``, targets ``[C]``)."""
    return (lam * np.asarray(first, np.float32) + (1.0 - lam) * np.asarray(second, np.float32)).astype(
        np.float32
    )


def smooth_labels(targets: np.ndarray, eps: float) -> np.ndarray:
    """Label smoothing: ``targets * (1 - eps) + eps / C`` for ``targets [..., C]``.

    (The reference sets positives to ``1 - eps`` without adding ``eps / C``; the difference is
    ``eps / C``, 2e-4 for AudioSet.)
    """
    t = np.asarray(targets, dtype=np.float32)
    if eps == 0.0:
        return t
    return (t * (1.0 - eps) + eps / t.shape[-1]).astype(np.float32)


def mask_band(
    x: np.ndarray, rng: np.random.Generator, max_width: int, axis: int, fill: float
) -> np.ndarray:
    """Set one random band of ``x`` along ``axis`` to ``fill`` (in place; returns ``x``).

    torchaudio's rule (``mask_along_axis``, ``iid_masks=False``): ``width = U * max_width``,
    ``start = U * (size - width)``, both truncated, band ``[start, start + int(width))``.
    """
    if max_width <= 0:
        return x
    size = x.shape[axis]
    width = rng.random() * max_width
    start = int(rng.random() * (size - width))
    stop = start + int(width)
    index: list[slice] = [slice(None)] * x.ndim
    index[axis] = slice(start, stop)
    x[tuple(index)] = fill
    return x


def spec_augment(
    fbank: np.ndarray,
    rng: np.random.Generator,
    freqm: int,
    timem: int,
    fill: float = 0.0,
) -> np.ndarray:
    """SpecAugment on ``fbank [T, F]``: one frequency band (``< freqm`` bins), then one time band
    (``< timem`` frames), set to ``fill``. Returns a new array.

    For the normalized model input pass ``fill = -fbank_mean / fbank_std`` (what a zero
    log-mel becomes), which reproduces the reference's mask-then-normalize order.
    """
    out = np.array(fbank, dtype=np.float32, copy=True)
    if freqm:
        mask_band(out, rng, freqm, axis=1, fill=fill)
    if timem:
        mask_band(out, rng, timem, axis=0, fill=fill)
    return out


def add_noise(fbank: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``fbank + U[0,1)^{shape} * U[0,1) / 10`` (the reference's noise), float32."""
    noise = rng.random(fbank.shape, dtype=np.float32)
    scale = np.float32(rng.random() / 10.0)
    return (np.asarray(fbank, np.float32) + noise * scale).astype(np.float32)


def time_roll(fbank: np.ndarray, rng: np.random.Generator, max_shift: int) -> np.ndarray:
    """Roll ``fbank [T, F]`` circularly along time by ``randint(-max_shift, max_shift)``."""
    if max_shift <= 0:
        return np.asarray(fbank)
    shift = int(rng.integers(-max_shift, max_shift))
    return np.roll(fbank, shift, axis=0)
