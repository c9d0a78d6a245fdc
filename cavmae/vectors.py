"""Embedding vectors: L2 normalisation, the one implementation for the runtime and evaluation.

Numpy only. Cosine similarity of normalised vectors is their dot product, which is how the
pipeline's embeddings, the search index and retrieval evaluation compare clips.
"""

from __future__ import annotations

import numpy as np

__all__ = ["L2_EPS", "l2_normalize"]

#: floor of the norm: a zero vector stays zero instead of becoming NaN
L2_EPS = 1e-12


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """``x`` divided by its L2 norm along ``axis`` (floored at :data:`L2_EPS`).

    Keeps the dtype of a floating-point ``x`` (convert first to compute in float64); other
    dtypes come back as float64. Shape ``[..., D] -> [..., D]``.
    """
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, x.dtype.type(L2_EPS))
