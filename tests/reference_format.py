"""Helpers that write checkpoints exactly as the released ones are stored, and an independent
float64 re-implementation of the CAV-MAE forward computed straight from a state dict.

The re-implementation is written from docs/model.md §2-5 with explicit attention arithmetic, so
that parity tests compare the model classes against something other than themselves.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

State = dict[str, torch.Tensor]


def save_reference_checkpoint(model: torch.nn.Module, path: Path) -> Path:
    """A plain ``module.``-prefixed state dict, no metadata: the released checkpoints' format."""
    torch.save({"module." + k: v.detach().clone() for k, v in model.state_dict().items()}, path)
    return path


def _ln(x: torch.Tensor, s: State, name: str, eps: float = 1e-5) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * s[f"{name}.weight"] + s[f"{name}.bias"]


def _lin(x: torch.Tensor, s: State, name: str) -> torch.Tensor:
    return x @ s[f"{name}.weight"].T + s[f"{name}.bias"]


def _block(x: torch.Tensor, s: State, name: str, heads: int, suffix: str = "") -> torch.Tensor:
    b, n, d = x.shape
    h = _ln(x, s, f"{name}.norm1{suffix}")
    qkv = _lin(h, s, f"{name}.attn.qkv").reshape(b, n, 3, heads, d // heads)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [B, H, N, dh]
    att = torch.softmax(q @ k.transpose(-1, -2) * (d // heads) ** -0.5, dim=-1)
    out = (att @ v).transpose(1, 2).reshape(b, n, d)
    x = x + _lin(out, s, f"{name}.attn.proj")
    h = _ln(x, s, f"{name}.norm2{suffix}")
    h = _lin(F.gelu(_lin(h, s, f"{name}.mlp.fc1")), s, f"{name}.mlp.fc2")
    return x + h


def _blocks(x: torch.Tensor, s: State, group: str, heads: int, suffix: str = "") -> torch.Tensor:
    i = 0
    while f"{group}.{i}.norm1.weight" in s:
        x = _block(x, s, f"{group}.{i}", heads, suffix)
        i += 1
    return x


def _patches(img: torch.Tensor, s: State, name: str) -> torch.Tensor:
    w = s[f"{name}.proj.weight"]
    y = F.conv2d(img, w, s[f"{name}.proj.bias"], stride=w.shape[-1])
    return y.flatten(2).transpose(1, 2)


def to64(state: State) -> State:
    return {k.removeprefix("module."): v.double() for k, v in state.items()}


def audio_tokens(s: State, audio: torch.Tensor, heads: int) -> torch.Tensor:
    a = _patches(audio.double().unsqueeze(1).transpose(2, 3), s, "patch_embed_a")
    a = a + s["pos_embed_a"] + s["modality_a"]
    return _blocks(a, s, "blocks_a", heads)


def visual_tokens(s: State, image: torch.Tensor, heads: int) -> torch.Tensor:
    v = _patches(image.double(), s, "patch_embed_v") + s["pos_embed_v"] + s["modality_v"]
    return _blocks(v, s, "blocks_v", heads)


def stream(s: State, x: torch.Tensor, heads: int, which: str) -> torch.Tensor:
    """which: "" joint norms + norm, "_a" audio norms + norm_a, "_v" visual norms + norm_v."""
    x = _blocks(x, s, "blocks_u", heads, which)
    return _ln(x, s, "norm" + which)


def classify(s: State, audio, image, mode: str, heads: int) -> torch.Tensor:
    """Logits of the reference ``CAVMAEFT.forward`` for each mode, float64."""
    if mode == "multimodal":
        x = stream(s, torch.cat([audio_tokens(s, audio, heads), visual_tokens(s, image, heads)], 1), heads, "")
        pooled = x.mean(1)
    elif mode == "audioonly":
        pooled = stream(s, audio_tokens(s, audio, heads), heads, "_a").mean(1)
    elif mode == "videoonly":
        pooled = stream(s, visual_tokens(s, image, heads), heads, "_v").mean(1)
    elif mode == "missingaudioonly":  # only audio given
        a = audio_tokens(s, audio, heads)
        pooled = (stream(s, a, heads, "").mean(1) + stream(s, a, heads, "_a").mean(1)) / 2
    elif mode == "missingvideoonly":  # only image given
        v = visual_tokens(s, image, heads)
        pooled = (stream(s, v, heads, "").mean(1) + stream(s, v, heads, "_v").mean(1)) / 2
    else:
        raise ValueError(mode)
    return _lin(_ln(pooled, s, "mlp_head.0"), s, "mlp_head.1")


def pretrain_losses(s: State, audio, image, noise_a, noise_v, ratio: float, heads: int,
                    dec_heads: int, norm_pix: bool, contrast_weight: float = 0.01) -> dict[str, torch.Tensor]:
    """The reference pre-training forward with given noise, float64: loss terms and predictions."""
    b = audio.shape[0]

    def embed_keep(tokens, noise):
        n_tok = tokens.shape[1]
        keep = int(n_tok * (1 - ratio))
        shuffle = torch.argsort(noise, dim=1)
        restore = torch.argsort(shuffle, dim=1)
        kept = torch.stack([tokens[i, shuffle[i, :keep]] for i in range(b)])
        mask = torch.ones(b, n_tok, dtype=torch.float64)
        mask[:, :keep] = 0
        mask = torch.stack([mask[i, restore[i]] for i in range(b)])
        return kept, mask, restore, keep

    a = _patches(audio.double().unsqueeze(1).transpose(2, 3), s, "patch_embed_a") + s["pos_embed_a"] + s["modality_a"]
    v = _patches(image.double(), s, "patch_embed_v") + s["pos_embed_v"] + s["modality_v"]
    a, mask_a, restore_a, keep_a = embed_keep(a, noise_a)
    v, mask_v, restore_v, keep_v = embed_keep(v, noise_v)
    a = _blocks(a, s, "blocks_a", heads)
    v = _blocks(v, s, "blocks_v", heads)
    x = stream(s, torch.cat([a, v], 1), heads, "")
    ca = stream(s, a, heads, "_a").mean(1)
    cv = stream(s, v, heads, "_v").mean(1)

    x = _lin(x, s, "decoder_embed")
    tok = s["mask_token"]
    parts = []
    for kept, restore, total in ((x[:, :keep_a], restore_a, restore_a.shape[1]), (x[:, keep_a:], restore_v, restore_v.shape[1])):
        full = torch.cat([kept, tok.expand(b, total - kept.shape[1], -1)], 1)
        parts.append(torch.stack([full[i, restore[i]] for i in range(b)]))
    x = torch.cat([parts[0] + s["decoder_pos_embed_a"] + s["decoder_modality_a"],
                   parts[1] + s["decoder_pos_embed_v"] + s["decoder_modality_v"]], 1)
    x = _ln(_blocks(x, s, "decoder_blocks", dec_heads), s, "decoder_norm")
    la = restore_a.shape[1]
    pred_a, pred_v = _lin(x[:, :la], s, "decoder_pred_a"), _lin(x[:, la:], s, "decoder_pred_v")

    def targets(img, p=16):
        n, c, h, w = img.shape
        t = img.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(n, -1, p * p * c)
        if norm_pix:
            t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
        return t

    ta = targets(audio.double().unsqueeze(1).transpose(2, 3))
    tv = targets(image.double())
    la_ = (((pred_a - ta) ** 2).mean(-1) * mask_a).sum() / mask_a.sum()
    lv_ = (((pred_v - tv) ** 2).mean(-1) * mask_v).sum() / mask_v.sum()
    an, vn = F.normalize(ca, dim=-1), F.normalize(cv, dim=-1)
    sim = an @ vn.T / 0.05
    lc = -torch.diag(torch.log_softmax(sim, dim=0)).mean()
    acc = (sim.argmax(0) == torch.arange(b)).double().mean()
    return {"loss_mae_a": la_, "loss_mae_v": lv_, "loss_mae": la_ + lv_, "loss_c": lc, "c_acc": acc,
            "loss": la_ + lv_ + contrast_weight * lc, "pred_a": pred_a, "pred_v": pred_v,
            "mask_a": mask_a, "mask_v": mask_v}
