"""L2 normalisation: the one helper behind embeddings, the index and retrieval."""

from __future__ import annotations

import numpy as np

from cavmae.vectors import l2_normalize


def test_l2_normalize_rows_dtype_and_zero() -> None:
    x = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32)
    out = l2_normalize(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])  # a zero row stays zero, no NaN
    np.testing.assert_allclose(l2_normalize(x.astype(np.float64), axis=0)[:, 0], [1.0, 0.0])
    ints = l2_normalize(np.array([[0, 2]]))
    assert ints.dtype == np.float64 and ints.tolist() == [[0.0, 1.0]]
    vec = l2_normalize(np.array([1.0, 1.0, 1.0, 1.0]))
    np.testing.assert_allclose(vec, 0.5)
