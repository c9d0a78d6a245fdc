"""Patch math of the masked-autoencoder loss: one definition for numpy and torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cavmae.patches import NORM_PIX_EPS, masked_mse, standardize_patches, unstandardize_patches


@pytest.fixture
def arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    target = rng.standard_normal((2, 6, 12)).astype(np.float32) * 3 + 1
    pred = rng.standard_normal((2, 6, 12)).astype(np.float32)
    mask = (rng.random((2, 6)) < 0.5).astype(np.float32)
    mask[:, 0] = 1  # at least one removed patch per row
    return target, pred, mask


def test_standardize_is_mae_norm_pix(arrays) -> None:
    target, _, _ = arrays
    # MAE's norm_pix_loss, written out: unbiased variance, eps inside the root
    mean = target.mean(-1, keepdims=True)
    var = target.var(-1, ddof=1, keepdims=True)
    want = (target - mean) / np.sqrt(var + NORM_PIX_EPS)
    np.testing.assert_allclose(standardize_patches(target), want, rtol=1e-6, atol=1e-6)
    got = standardize_patches(torch.from_numpy(target))
    assert isinstance(got, torch.Tensor)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_numpy_and_torch_agree(arrays) -> None:
    target, pred, mask = arrays
    t, p, m = torch.from_numpy(target), torch.from_numpy(pred), torch.from_numpy(mask)
    np.testing.assert_allclose(
        unstandardize_patches(pred, target), unstandardize_patches(p, t).numpy(), atol=1e-5
    )
    np.testing.assert_allclose(
        unstandardize_patches(standardize_patches(target), target), target, atol=1e-4
    )
    loss_np, loss_t = masked_mse(pred, target, mask), masked_mse(p, t, m)
    assert isinstance(loss_t, torch.Tensor) and loss_t.ndim == 0
    assert float(loss_np) == pytest.approx(float(loss_t), rel=1e-6)
    # only removed patches count
    per_patch = ((pred - target) ** 2).mean(-1)
    assert float(loss_np) == pytest.approx(float(per_patch[mask == 1].mean()), rel=1e-6)
