"""Transformer building blocks of CAV-MAE, named so their parameters give the reference keys.

Shapes: ``B`` batch, ``N`` tokens, ``D`` width.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: modality argument of ``Block.forward``: None (shared norms), "a" (audio) or "v" (visual)
Modality = str | None


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (keys ``qkv.*``, ``proj.*``)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, N, D] -> [B, N, D]``."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, d_head]
        # SDPA's default scale is d_head ** -0.5, the reference's scale.
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Two-layer MLP with exact GELU (keys ``fc1.*``, ``fc2.*``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with three LayerNorm pairs.

    ``norm1/norm2`` serve the joint stream (and every block of ``blocks_a``/``blocks_v``),
    ``norm1_a/norm2_a`` the audio-only stream and ``norm1_v/norm2_v`` the visual-only stream.
    Only the shared block ``blocks_u`` ever switches between them; the others still own all
    three pairs because the released checkpoints hold them.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.norm1_a = nn.LayerNorm(dim, eps=eps)
        self.norm1_v = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.norm2_a = nn.LayerNorm(dim, eps=eps)
        self.norm2_v = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, modality: Modality = None) -> torch.Tensor:
        """``x [B, N, D] -> [B, N, D]`` using the norms of ``modality``."""
        if modality is None:
            n1, n2 = self.norm1, self.norm2
        elif modality == "a":
            n1, n2 = self.norm1_a, self.norm2_a
        elif modality == "v":
            n1, n2 = self.norm1_v, self.norm2_v
        else:
            raise ValueError(f"modality must be None, 'a' or 'v', not {modality!r}")
        x = x + self.attn(n1(x))
        return x + self.mlp(n2(x))

    def forward_shared_prefix(self, prefix: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
        """The block (shared norms) on ``cat(prefix, rest[:, f])`` for every ``f``, with the work
        that depends on ``prefix`` alone done once: ``prefix [B, P, D]``, ``rest [B, F, R, D]``
        -> ``[B * F, P + R, D]``, equal to ``self(cat(prefix expanded F times, rest))`` up to
        float rounding.

        This is the reference's per-frame loop through the joint block, where every frame is
        joined with the same audio tokens. LayerNorm and the qkv projection act on each token
        alone, so the prefix's queries, keys and values are computed once, not ``F`` times. The
        prefix queries' attention over the prefix keys is also shared: softmax over the
        concatenated keys splits into the two key sets, each with its own running maximum and
        sum (the rescaling of flash attention), so only the scores against ``rest`` are
        per-frame. Everything after the attention mixes in the frame and runs per frame.
        """
        b, p, d = prefix.shape
        f, r = rest.shape[1], rest.shape[2]
        h = self.attn.num_heads
        dh = d // h
        # one qkv product over all tokens (one weight use keeps int8 and templates simple)
        qkv = self.attn.qkv(self.norm1(torch.cat((prefix, rest.reshape(b, f * r, d)), dim=1)))
        qp, kp, vp = qkv[:, :p].reshape(b, p, 3, h, dh).permute(2, 0, 3, 1, 4).unbind(0)
        qr, kr, vr = qkv[:, p:].reshape(b, f, r, 3, h, dh).permute(3, 0, 1, 4, 2, 5).unbind(0)
        # prefix queries [B, H, P, dh]: the prefix-key part once, the rest-key part per frame
        qp = qp * dh**-0.5
        s_pp = qp @ kp.transpose(-1, -2)  # [B, H, P, P]
        m_pp = s_pp.amax(-1, keepdim=True)
        e_pp = torch.exp(s_pp - m_pp)
        sum_pp, out_pp = e_pp.sum(-1, keepdim=True).unsqueeze(1), (e_pp @ vp).unsqueeze(1)
        m_pp = m_pp.unsqueeze(1)
        s_pr = qp.unsqueeze(1) @ kr.transpose(-1, -2)  # [B, F, H, P, R]
        m = torch.maximum(m_pp, s_pr.amax(-1, keepdim=True))
        e_pr, scale_pp = torch.exp(s_pr - m), torch.exp(m_pp - m)
        out_p = (scale_pp * out_pp + e_pr @ vr) / (scale_pp * sum_pp + e_pr.sum(-1, keepdim=True))
        # rest queries [B, F, H, R, dh]: ordinary attention over the prefix and their frame's keys
        k_all = torch.cat((kp.unsqueeze(1).expand(b, f, h, p, dh), kr), dim=-2)
        v_all = torch.cat((vp.unsqueeze(1).expand(b, f, h, p, dh), vr), dim=-2)
        out_r = F.scaled_dot_product_attention(qr, k_all, v_all)
        out = torch.cat((out_p, out_r), dim=-2).transpose(2, 3).reshape(b * f, p + r, d)
        x = torch.cat((prefix.unsqueeze(1).expand(b, f, p, d), rest), dim=2).reshape(b * f, p + r, d)
        x = x + self.attn.proj(out)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection (key ``proj.*``): ``[B, C, H, W] -> [B, H*W/p^2, D]``.

    Tokens come out row-major over the patch grid.
    """

    def __init__(self, in_chans: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """MAE-style 1-D sine-cosine embedding: ``positions [M] -> [M, dim]`` (sin half, cos half)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = positions.reshape(-1).astype(np.float64)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, rows: int, cols: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine embedding for a row-major ``rows x cols`` grid: ``[1, rows*cols, dim]``.

    The first half of the channels encodes the column index and the second half the row index,
    the layout of the reference helper (for audio: first half time, second half frequency).
    """
    if dim % 4:
        raise ValueError(f"sin-cos embedding needs a width divisible by 4, got {dim}")
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    emb = np.concatenate([sincos_1d(dim // 2, c), sincos_1d(dim // 2, r)], axis=1)
    return torch.from_numpy(emb).float().unsqueeze(0)


def init_weights(module: nn.Module) -> None:
    """MAE initialization: xavier-uniform linears, unit LayerNorms, xavier patch projections."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbed):
            w = m.proj.weight.data
            # treat the conv as a linear map on flattened patches, as MAE does
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            if m.proj.bias is not None:
                nn.init.zeros_(m.proj.bias)


def normal_init(param: torch.Tensor, std: float = 0.02) -> None:
    """``normal(0, std)`` init of learned tokens (modality embeddings, mask token), untruncated.

    MAE: "timm's trunc_normal_(std=.02) is effectively normal_(std=0.02) as cutoff is too big
    (2.)": timm truncates at +-2 in absolute terms, 100 standard deviations out. A ``meta``
    tensor (a model built for its shapes, its weights loaded after) has no values to draw, and
    drawing there would import torch._dynamo (1-2 s).
    """
    if param.is_meta:
        return
    nn.init.normal_(param, std=std)
