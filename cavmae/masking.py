"""Token masking for masked-autoencoder pre-training and reconstruction (docs/model.md §5).

Works on numpy *and* torch arrays with the same code, so the PyTorch model, the exported graphs'
index inputs (computed by the runtime, which may lack torch) and the tests share one definition.

The rule: every token gets a noise value; tokens are sorted by noise and the first
``num_kept(L, ratio)`` are kept. Structured audio masking forces whole time columns and/or
frequency rows to be removed by giving them noise above any uniform draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import CavmaeError

MASK_MODES = ("unstructured", "time", "freq", "tf")

#: share of tokens removed in pre-training and reconstruction, audio and visual (the reference's)
DEFAULT_MASK_RATIO = 0.75

#: noise given to tokens that structured masking must remove (uniform noise is < 1)
FORCED_NOISE = 1.1


class MaskRatioError(CavmaeError, ValueError):
    """A mask ratio outside [0, 1), or one that keeps no token of a modality.

    A ``ValueError`` too, as :func:`num_kept` always raised one for a bad ratio; a
    ``CavmaeError`` so every command reports it in one line (a user's ``--mask-ratio`` reaches it)."""


def _kept(num_tokens: int, ratio: float) -> int:
    """The rule itself (the reference's rounding): every count of kept tokens comes from here."""
    return int(num_tokens * (1 - ratio))


def num_kept(num_tokens: int, ratio: float, modality: str = "") -> int:
    """How many of ``num_tokens`` stay visible at mask ``ratio`` (a Python int, as in the reference).

    Raises ``MaskRatioError`` for a ratio outside [0, 1) and for one that keeps no token: the
    graphs and the model would then run on an empty sequence (a zero-size reduction deep in
    ONNX Runtime or PyTorch). ``modality`` ("audio", "visual") names the tokens in the message.
    """
    if not 0.0 <= ratio < 1.0:
        raise MaskRatioError(f"mask ratio must be in [0, 1), got {ratio}")
    kept = _kept(num_tokens, ratio)
    if kept < 1:
        raise _none_kept(num_tokens, ratio, modality, max_mask_ratio(num_tokens), "one")
    return kept


def _none_kept(num_tokens: int, ratio: float, modality: str, limit: float, what: str) -> MaskRatioError:
    tokens = f"{modality} tokens" if modality else "tokens"
    return MaskRatioError(f"mask ratio {ratio:g} keeps none of the {num_tokens} {tokens};"
                          f" the largest ratio that keeps {what} is {limit:g}")


def max_mask_ratio(num_tokens: int, digits: int = 4) -> float:
    """The largest ratio of ``digits`` decimals that keeps at least one of ``num_tokens``
    (0.0 where even no masking keeps none: no tokens at all).

    Found with the rule's own rounding, so the ratio named in :func:`num_kept`'s error is one
    it takes.
    """
    step = 10**-digits
    # the exact bound 1 - 1/L rounded down, plus one step: float rounding of the bound (0.99
    # for 100 tokens is 9899.999... steps) may put it a step too low
    ratio = round((math.floor((1 - 1 / max(num_tokens, 1)) / step) + 1) * step, digits)
    while ratio > 0 and (ratio >= 1 or _kept(num_tokens, ratio) < 1):
        ratio = round(ratio - step, digits)
    return max(ratio, 0.0)


def kept_tokens(
    num_audio_tokens: int, num_visual_tokens: int, ratio_a: float, ratio_v: float
) -> tuple[int, int]:
    """``(audio, visual)`` tokens kept at these mask ratios; ``MaskRatioError`` naming the
    modality when a ratio keeps none. The check every entry point of a pre-training model
    (export, reconstruction, runtime load) runs before any work."""
    if ratio_a == ratio_v and 0.0 <= ratio_a < 1.0:
        # one ratio for both (`--mask-ratio`): name the largest that suits both modalities
        limit = min(max_mask_ratio(num_audio_tokens), max_mask_ratio(num_visual_tokens))
        for n, modality in ((num_audio_tokens, "audio"), (num_visual_tokens, "visual")):
            if _kept(n, ratio_a) < 1:
                raise _none_kept(n, ratio_a, modality, limit, "a token of both modalities")
    return num_kept(num_audio_tokens, ratio_a, "audio"), num_kept(num_visual_tokens, ratio_v, "visual")


@dataclass
class MaskIndices:
    """Index tensors of one masking draw; numpy or torch, like the noise they came from.

    ``ids_keep [B, K]`` kept tokens in noise order, ``ids_restore [B, L]`` the permutation that
    puts ``concat(kept, removed)`` back into token order, ``mask [B, L]`` 1 for removed tokens.
    """

    ids_keep: Any
    ids_restore: Any
    mask: Any


def _argsort(x: Any) -> Any:
    """Stable argsort along axis 1 for numpy or torch."""
    if isinstance(x, np.ndarray):
        return np.argsort(x, axis=1, kind="stable")
    import torch

    return torch.argsort(x, dim=1, stable=True)


def indices_from_noise(noise: Any, keep: int) -> MaskIndices:
    """``noise [B, L]`` (numpy or torch) -> the indices that keep the ``keep`` lowest-noise tokens."""
    ids_shuffle = _argsort(noise)
    ids_restore = _argsort(ids_shuffle)
    # token j is removed when its rank in the shuffle is >= keep
    mask = (ids_restore >= keep) * 1.0
    mask = mask.astype(np.float32) if isinstance(mask, np.ndarray) else mask.float()
    return MaskIndices(ids_keep=ids_shuffle[:, :keep], ids_restore=ids_restore, mask=mask)


def force_structure(
    noise: Any,
    grid: tuple[int, int],
    ratio: float,
    mode: str,
    col_scores: Any,
    row_scores: Any,
) -> Any:
    """Force whole audio time columns / frequency rows out of ``noise [B, F*T]`` (numpy or torch).

    ``grid`` is ``(F freq rows, T time columns)``, tokens frequency-major. ``time`` removes
    ``int(T * ratio)`` columns, ``freq`` ``int(F * ratio)`` rows, ``tf`` ``int(T * ratio * 0.7)``
    columns and ``int(F * ratio * 0.7)`` rows; which ones is decided by the lowest random
    ``col_scores [B, T]`` / ``row_scores [B, F]``. Forced tokens get noise above any uniform draw;
    the rest still compete on their own noise.
    """
    if mode not in MASK_MODES:
        raise ValueError(f"mask mode must be one of {', '.join(MASK_MODES)}, not {mode!r}")
    if mode == "unstructured":
        return noise
    f, t = grid
    n_cols = {"time": int(t * ratio), "tf": int(t * ratio * 0.7)}.get(mode, 0)
    n_rows = {"freq": int(f * ratio), "tf": int(f * ratio * 0.7)}.get(mode, 0)
    col_forced = _argsort(_argsort(col_scores)) < n_cols  # [B, T]
    row_forced = _argsort(_argsort(row_scores)) < n_rows  # [B, F]
    forced = col_forced[:, None, :] | row_forced[:, :, None]  # [B, F, T]
    b = noise.shape[0]
    forced = forced.reshape(b, f * t)
    if isinstance(noise, np.ndarray):
        return np.where(forced, np.float32(FORCED_NOISE), noise)
    return noise.masked_fill(forced, FORCED_NOISE)


def draw_noise(
    rng: np.random.Generator,
    batch: int,
    num_tokens: int,
    grid: tuple[int, int] | None = None,
    ratio: float = 0.0,
    mode: str = "unstructured",
) -> np.ndarray:
    """Numpy masking noise ``[B, L]``; with ``grid`` and a structured ``mode``, audio structure."""
    noise = rng.random((batch, num_tokens), dtype=np.float32)
    if mode == "unstructured":
        return noise
    if grid is None:
        raise ValueError(f"mask mode {mode!r} needs the audio grid")
    return force_structure(
        noise, grid, ratio, mode, rng.random((batch, grid[1])), rng.random((batch, grid[0]))
    )
