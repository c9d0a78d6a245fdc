"""CAV-MAE models: the shared encoder, the classifier ``CAVMAEFT`` and the pre-training ``CAVMAE``.

The forward passes are compositions of small stage methods. Each exported graph is one method,
``forward_<graph>`` (``forward_audio_encoder``, ``forward_visual_encoder``, ``forward_audio_embed``,
``forward_visual_embed``, ``forward_{joint,audio,visual}_classifier``, ``forward_masked_encoder``,
``forward_decoder``; the graphs are declared in :mod:`cavmae.graphs`), which the exporter traces
and the torch engine runs as it is, so there is one definition of every computation.

Shapes: ``B`` batch; audio ``[B, 1024, 128]`` (time, frequency); image ``[B, 3, 224, 224]``;
``D`` encoder width (768), ``La = 512`` audio tokens, ``Lv = 196`` visual tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .config import BASE, ModelConfig
from .layers import Block, PatchEmbed, init_weights, normal_init, sincos_2d
from .masking import (
    DEFAULT_MASK_RATIO,
    MASK_MODES,
    MaskIndices,
    force_structure,
    indices_from_noise,
    num_kept,
)
from .modes import REFERENCE_MODES, lookup
from .patches import audio_to_image, masked_mse, patchify, standardize_patches

#: classifier modes (the reference's names; the table in :mod:`cavmae.modes`)
MODES = REFERENCE_MODES

#: temperature of the contrastive loss
CONTRAST_TEMPERATURE = 0.05


def probabilities(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Sigmoid for multi-label, softmax for single-label, over the last axis."""
    if task == "multi-label":
        return torch.sigmoid(logits)
    if task == "single-label":
        return torch.softmax(logits, dim=-1)
    raise ValueError(f"task must be 'multi-label' or 'single-label', not {task!r}")


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``x [B, L, D]``, ``ids [B, K]`` -> ``x`` at those token positions ``[B, K, D]``."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class CAVMAEEncoder(nn.Module):
    """The encoder both released model kinds share (docs/model.md §2-3)."""

    def __init__(self, config: ModelConfig = BASE) -> None:
        super().__init__()
        self.config = config
        d, eps = config.embed_dim, config.layer_norm_eps
        self.patch_embed_a = PatchEmbed(1, d, config.patch_size)
        self.patch_embed_v = PatchEmbed(3, d, config.patch_size)
        self.modality_a = nn.Parameter(torch.zeros(1, 1, d))
        self.modality_v = nn.Parameter(torch.zeros(1, 1, d))
        # Fixed sin-cos at initialization; checkpoints overwrite them (fine-tuned models train
        # theirs). Frozen by default, as in the reference pre-training recipe.
        self.pos_embed_a = nn.Parameter(sincos_2d(d, *config.audio_grid), requires_grad=False)
        self.pos_embed_v = nn.Parameter(sincos_2d(d, *config.visual_grid), requires_grad=False)

        def blocks(n: int) -> nn.ModuleList:
            return nn.ModuleList(
                Block(d, config.num_heads, config.mlp_ratio, eps) for _ in range(n)
            )

        self.blocks_a = blocks(config.depth_modality)
        self.blocks_v = blocks(config.depth_modality)
        self.blocks_u = blocks(config.depth_joint)
        self.norm_a = nn.LayerNorm(d, eps=eps)
        self.norm_v = nn.LayerNorm(d, eps=eps)
        self.norm = nn.LayerNorm(d, eps=eps)

    def _init_encoder(self) -> None:
        init_weights(self)
        normal_init(self.modality_a)
        normal_init(self.modality_v)

    # -- embeddings -------------------------------------------------------------------------
    def tokenize_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """``audio [B, T, F] -> tokens [B, La, D]`` (frequency-major) with position and modality."""
        x = self.patch_embed_a(audio_to_image(audio))
        return x + self.pos_embed_a + self.modality_a

    def tokenize_visual(self, image: torch.Tensor) -> torch.Tensor:
        """``image [B, 3, H, W] -> tokens [B, Lv, D]`` with position and modality."""
        return self.patch_embed_v(image) + self.pos_embed_v + self.modality_v

    # -- building blocks ----------------------------------------------------------------------
    def run_audio_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """``blocks_a`` on audio tokens (all or only the kept ones): ``[B, N, D] -> [B, N, D]``."""
        for blk in self.blocks_a:
            x = blk(x)
        return x

    def run_visual_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """``blocks_v`` on visual tokens: ``[B, N, D] -> [B, N, D]``."""
        for blk in self.blocks_v:
            x = blk(x)
        return x

    def forward_joint(self, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Joint stream: ``a [B, Na, D]``, ``v [B, Nv, D]`` -> ``[B, Na+Nv, D]`` after ``norm``."""
        x = torch.cat((a, v), dim=1)
        for blk in self.blocks_u:
            x = blk(x)
        return self.norm(x)

    def forward_joint_single(self, x: torch.Tensor) -> torch.Tensor:
        """One modality through ``blocks_u`` with the *joint* norms, then ``norm``: ``[B,N,D]``."""
        for blk in self.blocks_u:
            x = blk(x)
        return self.norm(x)

    def forward_audio_stream(self, a: torch.Tensor) -> torch.Tensor:
        """Audio-only stream: ``blocks_u`` with audio norms, then ``norm_a``: ``[B, N, D]``."""
        for blk in self.blocks_u:
            a = blk(a, "a")
        return self.norm_a(a)

    def forward_visual_stream(self, v: torch.Tensor) -> torch.Tensor:
        """Visual-only stream: ``blocks_u`` with visual norms, then ``norm_v``: ``[B, N, D]``."""
        for blk in self.blocks_u:
            v = blk(v, "v")
        return self.norm_v(v)

    # -- stages: one per exported graph (cavmae.graphs), named forward_<graph> ---------------
    def forward_audio_encoder(self, audio: torch.Tensor) -> torch.Tensor:
        """Audio branch: ``audio [B, T, F] -> audio tokens [B, La, D]``."""
        return self.run_audio_blocks(self.tokenize_audio(audio))

    def forward_visual_encoder(self, image: torch.Tensor) -> torch.Tensor:
        """Visual branch: ``image [B, 3, H, W] -> visual tokens [B, Lv, D]``."""
        return self.run_visual_blocks(self.tokenize_visual(image))

    def forward_audio_embed(self, audio_tokens: torch.Tensor) -> torch.Tensor:
        """``audio_tokens [B, La, D] -> audio embedding [B, D]``: audio stream, mean, L2."""
        return F.normalize(self.forward_audio_stream(audio_tokens).mean(1), dim=-1)

    def forward_visual_embed(self, visual_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``visual_tokens [B, Lv, D]`` -> (visual embedding ``[B, D]``, patches ``[B, Lv, D]``).

        The patches are the visual stream's tokens (not normalized), for sound-source
        localization; the embedding is their mean, L2-normalized.
        """
        patches = self.forward_visual_stream(visual_tokens)
        return F.normalize(patches.mean(1), dim=-1), patches

    # -- whole-model conveniences ---------------------------------------------------------
    def forward_feat(
        self, audio: torch.Tensor, image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unmasked audio-only and visual-only stream outputs: ``([B, La, D], [B, Lv, D])``."""
        a = self.forward_audio_stream(self.forward_audio_encoder(audio))
        v = self.forward_visual_stream(self.forward_visual_encoder(image))
        return a, v

    def embed(
        self, audio: torch.Tensor | None, image: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Retrieval embeddings: mean-pooled streams, L2-normalized: ``[B, D]`` each (or None)."""
        ea = ev = None
        if audio is not None:
            ea = self.forward_audio_embed(self.forward_audio_encoder(audio))
        if image is not None:
            ev = self.forward_visual_embed(self.forward_visual_encoder(image))[0]
        return ea, ev


class CAVMAEFT(CAVMAEEncoder):
    """The fine-tuned classifier: encoder + ``mlp_head`` (LayerNorm, Linear) on mean-pooled tokens."""

    def __init__(self, config: ModelConfig = BASE) -> None:
        super().__init__(config)
        d = config.embed_dim
        self.mlp_head = nn.Sequential(
            nn.LayerNorm(d, eps=config.layer_norm_eps), nn.Linear(d, config.num_classes)
        )
        self._init_encoder()

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        """``pooled [B, D] -> logits [B, C]``."""
        return self.mlp_head(pooled)

    def pooled_features(
        self, a: torch.Tensor | None, v: torch.Tensor | None, mode: str = "multimodal"
    ) -> torch.Tensor:
        """Branch outputs (``a [B, La, D]``, ``v [B, Lv, D]``) -> the head's input ``[B, D]``.

        This is everything after the modality branches (the single-modality classifier stages
        use it as is; :meth:`forward_joint_classifier` computes the multimodal row per frame with
        the audio-only work shared). The mode's row in :mod:`cavmae.modes` says which inputs it
        reads and whether it uses the joint stream (see docs/model.md section 4).
        """
        row = lookup(mode)
        if row.audio and row.video:
            return self.forward_joint(_need(a, mode, "audio"), _need(v, mode, "image")).mean(1)
        x = _need(a, mode, "audio") if row.audio else _need(v, mode, "image")
        own = (self.forward_audio_stream if row.audio else self.forward_visual_stream)(x).mean(1)
        if not row.joint:  # audioonly / videoonly: the modality's own stream
            return own
        # missing*only: a model fine-tuned on both modalities gets one; as in the reference, the
        # average of that modality through the joint block and through its own stream
        return (self.forward_joint_single(x).mean(1) + own) / 2

    # -- stages: the classifier heads (cavmae.graphs) ---------------------------------------
    def forward_joint_classifier(
        self, audio_tokens: torch.Tensor, visual_tokens: torch.Tensor, *, task: str, num_frames: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``audio_tokens [B, La, D]``, ``visual_tokens [B, F, Lv, D]`` -> ``logits [B, F, C]``,
        ``probs [B, C]``: the reference's per-frame loop (the same audio with each frame) as one
        batch, probabilities averaged over the frames."""
        # sizes as Python ints so only the batch axis is symbolic in an exported graph
        cfg, f = self.config, num_frames
        la, lv, d = cfg.num_audio_tokens, cfg.num_visual_tokens, cfg.embed_dim
        v = visual_tokens.reshape(-1, f, lv, d)
        if not self.blocks_u:
            a = audio_tokens.unsqueeze(1).expand(-1, f, la, d).reshape(-1, la, d)
            x = self.forward_joint(a, v.reshape(-1, lv, d))
        else:
            # the first joint block sees the same audio with every frame: its audio-only work
            # is done once (Block.forward_shared_prefix), the rest per frame
            first, *others = self.blocks_u
            x = cast(Block, first).forward_shared_prefix(audio_tokens, v)
            for blk in others:
                x = blk(x)
            x = self.norm(x)
        logits = self.head(x.mean(1)).reshape(-1, f, cfg.num_classes)
        return logits, probabilities(logits, task).mean(1)

    def forward_audio_classifier(
        self, audio_tokens: torch.Tensor, *, task: str, mode: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``audio_tokens [B, La, D] -> logits [B, C], probs [B, C]`` in an audio-only ``mode``."""
        logits = self.head(self.pooled_features(audio_tokens, None, mode))
        return logits, probabilities(logits, task)

    def forward_visual_classifier(
        self, visual_tokens: torch.Tensor, *, task: str, mode: str, num_frames: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``visual_tokens [B, F, Lv, D] -> logits [B, F, C], probs [B, C]`` in a visual-only
        ``mode``, probabilities averaged over the frames."""
        cfg = self.config
        v = visual_tokens.reshape(-1, cfg.num_visual_tokens, cfg.embed_dim)
        logits = self.head(self.pooled_features(None, v, mode))
        logits = logits.reshape(-1, num_frames, cfg.num_classes)
        return logits, probabilities(logits, task).mean(1)

    def forward(
        self,
        audio: torch.Tensor | None,
        image: torch.Tensor | None,
        mode: str = "multimodal",
    ) -> torch.Tensor:
        """``audio [B, 1024, 128]``, ``image [B, 3, 224, 224]`` -> logits ``[B, C]``.

        Single-modality modes accept ``None`` for the unused input.
        """
        row = lookup(mode)
        a = self.forward_audio_encoder(_need(audio, mode, "audio")) if row.audio else None
        v = self.forward_visual_encoder(_need(image, mode, "image")) if row.video else None
        return self.head(self.pooled_features(a, v, mode))


def _need(x: torch.Tensor | None, mode: str, what: str) -> torch.Tensor:
    if x is None:
        raise ValueError(f"mode {mode!r} needs the {what} input")
    return x


@dataclass
class PretrainOutput:
    """What one pre-training forward returns (docs/model.md §5)."""

    loss: torch.Tensor
    loss_mae: torch.Tensor
    loss_mae_a: torch.Tensor
    loss_mae_v: torch.Tensor
    loss_c: torch.Tensor
    c_acc: torch.Tensor
    pred_a: torch.Tensor  # [B, La, p*p]
    pred_v: torch.Tensor  # [B, Lv, p*p*3]
    mask_a: torch.Tensor  # [B, La], 1 = removed
    mask_v: torch.Tensor  # [B, Lv]


class CAVMAE(CAVMAEEncoder):
    """The pre-training model: encoder + MAE decoder, trained with reconstruction + contrast."""

    def __init__(self, config: ModelConfig = BASE) -> None:
        super().__init__(config)
        d, dd, eps = config.embed_dim, config.decoder_embed_dim, config.layer_norm_eps
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_modality_a = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_modality_v = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed_a = nn.Parameter(
            sincos_2d(dd, *config.audio_grid), requires_grad=False
        )
        self.decoder_pos_embed_v = nn.Parameter(
            sincos_2d(dd, *config.visual_grid), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            Block(dd, config.decoder_num_heads, config.mlp_ratio, eps)
            for _ in range(config.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(dd, eps=eps)
        self.decoder_pred_a = nn.Linear(dd, config.audio_patch_dim)
        self.decoder_pred_v = nn.Linear(dd, config.visual_patch_dim)
        self._init_encoder()
        for p in (self.mask_token, self.decoder_modality_a, self.decoder_modality_v):
            normal_init(p)

    # -- masking ----------------------------------------------------------------------------
    def draw_mask(
        self,
        batch: int,
        ratio_a: float,
        ratio_v: float,
        mask_mode: str = "unstructured",
        noise_a: torch.Tensor | None = None,
        noise_v: torch.Tensor | None = None,
        device: torch.device | None = None,
    ) -> tuple[MaskIndices, MaskIndices]:
        """Masks for one batch. Given noise is used as it is (``mask_mode`` then does nothing)."""
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask mode must be one of {', '.join(MASK_MODES)}, not {mask_mode!r}")
        cfg = self.config
        if noise_a is None:
            noise_a = torch.rand(batch, cfg.num_audio_tokens, device=device)
            if mask_mode != "unstructured":
                f, t = cfg.audio_grid
                noise_a = force_structure(
                    noise_a, (f, t), ratio_a, mask_mode,
                    torch.rand(batch, t, device=device), torch.rand(batch, f, device=device),
                )
        if noise_v is None:
            noise_v = torch.rand(batch, cfg.num_visual_tokens, device=device)
        _check_noise(noise_a, batch, cfg.num_audio_tokens, "noise_a")
        _check_noise(noise_v, batch, cfg.num_visual_tokens, "noise_v")
        return (
            indices_from_noise(noise_a, num_kept(cfg.num_audio_tokens, ratio_a)),
            indices_from_noise(noise_v, num_kept(cfg.num_visual_tokens, ratio_v)),
        )

    # -- stages: pre-training (cavmae.graphs) ---------------------------------------------------
    def forward_masked_branches(
        self,
        audio: torch.Tensor,
        image: torch.Tensor,
        ids_keep_a: torch.Tensor,
        ids_keep_v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Modality branches on kept tokens only: ``([B, Ka, D], [B, Kv, D])``."""
        a = self.run_audio_blocks(gather_tokens(self.tokenize_audio(audio), ids_keep_a))
        v = self.run_visual_blocks(gather_tokens(self.tokenize_visual(image), ids_keep_v))
        return a, v

    def forward_masked_encoder(
        self,
        audio: torch.Tensor,
        image: torch.Tensor,
        ids_keep_a: torch.Tensor,
        ids_keep_v: torch.Tensor,
    ) -> torch.Tensor:
        """The pre-training encoder on kept tokens only: ``audio [B, T, F]``, ``image
        [B, 3, H, W]``, ``ids_keep_a [B, Ka]``, ``ids_keep_v [B, Kv]`` -> ``[B, Ka+Kv, D]``."""
        return self.forward_joint(*self.forward_masked_branches(audio, image, ids_keep_a, ids_keep_v))

    def forward_decoder(
        self,
        x: torch.Tensor,
        ids_restore_a: torch.Tensor,
        ids_restore_v: torch.Tensor,
        keep_a: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Joint tokens ``x [B, Ka+Kv, D]`` -> ``pred_a [B, La, p*p]``, ``pred_v [B, Lv, p*p*3]``.

        ``keep_a`` (a Python int fixed by the mask ratio) splits ``x`` into its audio and visual
        parts, so no count is read back from a tensor.
        """
        cfg = self.config
        x = self.decoder_embed(x)
        b, _, dd = x.shape
        la, lv = cfg.num_audio_tokens, cfg.num_visual_tokens
        keep_v = x.shape[1] - keep_a

        def restore(kept: torch.Tensor, total: int, ids_restore: torch.Tensor) -> torch.Tensor:
            filled = torch.cat([kept, self.mask_token.expand(b, total - kept.shape[1], dd)], dim=1)
            return gather_tokens(filled, ids_restore)

        a = restore(x[:, :keep_a], la, ids_restore_a)
        v = restore(x[:, keep_a : keep_a + keep_v], lv, ids_restore_v)
        a = a + self.decoder_pos_embed_a + self.decoder_modality_a
        v = v + self.decoder_pos_embed_v + self.decoder_modality_v
        x = torch.cat([a, v], dim=1)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        return self.decoder_pred_a(x[:, :la]), self.decoder_pred_v(x[:, la:])

    # -- losses -----------------------------------------------------------------------------
    def patch_targets(
        self, audio: torch.Tensor, image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction targets ``([B, La, p*p], [B, Lv, p*p*3])``, standardized per patch with
        ``norm_pix_loss``."""
        p = self.config.patch_size
        ta = patchify(audio_to_image(audio), p)
        tv = patchify(image, p)
        if self.config.norm_pix_loss:
            ta, tv = standardize_patches(ta), standardize_patches(tv)
        return ta, tv

    @staticmethod
    def contrastive_loss(
        a: torch.Tensor, v: torch.Tensor, bidirect: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """InfoNCE on pooled embeddings ``a, v [B, D]`` -> (loss, accuracy)."""
        a = F.normalize(a, dim=-1)
        v = F.normalize(v, dim=-1)
        sim = a @ v.T / CONTRAST_TEMPERATURE
        target = torch.arange(sim.shape[0], device=sim.device)

        def one_way(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # column j's softmax over audio clips must pick clip j
            loss = -torch.diagonal(F.log_softmax(s, dim=0)).mean()
            return loss, (s.argmax(dim=0) == target).float().mean()

        loss, acc = one_way(sim)
        if bidirect:
            loss_t, acc_t = one_way(sim.T)
            loss, acc = (loss + loss_t) / 2, (acc + acc_t) / 2
        return loss, acc

    def forward(
        self,
        audio: torch.Tensor,
        image: torch.Tensor,
        mask_ratio_a: float = DEFAULT_MASK_RATIO,
        mask_ratio_v: float = DEFAULT_MASK_RATIO,
        noise_a: torch.Tensor | None = None,
        noise_v: torch.Tensor | None = None,
        mask_mode: str = "unstructured",
        mae_loss_weight: float = 1.0,
        contrast_loss_weight: float = 0.01,
        bidirect_contrast: bool = False,
    ) -> PretrainOutput:
        """One pre-training step's forward: ``audio [B, 1024, 128]``, ``image [B, 3, 224, 224]``.

        ``noise_a [B, La]`` / ``noise_v [B, Lv]`` make the masking reproducible.
        """
        b = audio.shape[0]
        mask_a, mask_v = self.draw_mask(
            b, mask_ratio_a, mask_ratio_v, mask_mode, noise_a, noise_v, device=audio.device
        )
        a, v = self.forward_masked_branches(audio, image, mask_a.ids_keep, mask_v.ids_keep)
        joint = self.forward_joint(a, v)
        pred_a, pred_v = self.forward_decoder(
            joint, mask_a.ids_restore, mask_v.ids_restore, keep_a=a.shape[1]
        )
        target_a, target_v = self.patch_targets(audio, image)
        loss_mae_a = masked_mse(pred_a, target_a, mask_a.mask)
        loss_mae_v = masked_mse(pred_v, target_v, mask_v.mask)
        loss_mae = loss_mae_a + loss_mae_v
        # the contrastive pair uses the modality streams of the *masked* tokens, as in the paper
        ca = self.forward_audio_stream(a).mean(1)
        cv = self.forward_visual_stream(v).mean(1)
        loss_c, c_acc = self.contrastive_loss(ca, cv, bidirect_contrast)
        loss = mae_loss_weight * loss_mae + contrast_loss_weight * loss_c
        return PretrainOutput(
            loss=loss,
            loss_mae=loss_mae,
            loss_mae_a=loss_mae_a,
            loss_mae_v=loss_mae_v,
            loss_c=loss_c,
            c_acc=c_acc,
            pred_a=pred_a,
            pred_v=pred_v,
            mask_a=mask_a.mask,
            mask_v=mask_v.mask,
        )


def _check_noise(noise: torch.Tensor, batch: int, tokens: int, name: str) -> None:
    if tuple(noise.shape) != (batch, tokens):
        raise ValueError(f"{name} must have shape [{batch}, {tokens}], got {list(noise.shape)}")
