"""Token masking for masked-autoencoder pre-training and reconstruction (docs/model.md §5).

Works on numpy *and* torch arrays with the same code, so the PyTorch model, the exported graphs'
index inputs (computed by the runtime, which may lack torch) and the tests share one definition.

The rule: every token gets a noise value; tokens are sorted by noise and the first
``num_kept(L, ratio)`` are kept. Structured audio masking forces whole time columns and/or
frequency rows to be removed by giving them noise above any uniform draw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

MASK_MODES = ("unstructured", "time", "freq", "tf")

#: noise given to tokens that structured masking must remove (uniform noise is < 1)
FORCED_NOISE = 1.1


def num_kept(num_tokens: int, ratio: float) -> int:
    """How many of ``num_tokens`` stay visible at mask ``ratio`` (a Python int, as in the reference)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    return int(num_tokens * (1 - ratio))


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
