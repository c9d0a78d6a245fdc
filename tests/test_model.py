"""The model classes against an independent float64 re-implementation (tests/reference_format.py)."""

from __future__ import annotations

import pytest
import torch

import reference_format as ref
from cavmae.config import BASE, TINY
from cavmae.model import CAVMAE, CAVMAEFT, MODES
from cavmae.patches import audio_to_image, image_to_audio, patchify, unpatchify


@pytest.fixture(scope="module")
def classifier() -> CAVMAEFT:
    torch.manual_seed(0)
    m = CAVMAEFT(TINY).eval()
    # make the three norm pairs and the position embeddings differ, so a mix-up shows
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 1024, 128, generator=g), torch.randn(2, 3, 224, 224, generator=g)


@pytest.mark.parametrize("mode", MODES)
def test_classifier_modes_match_reference_math(classifier, inputs, mode):
    audio, image = inputs
    with torch.no_grad():
        got = classifier(audio, image, mode)
    want = ref.classify(ref.to64(classifier.state_dict()), audio, image, mode, TINY.num_heads)
    assert got.shape == (2, TINY.num_classes)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_single_modality_modes_take_none(classifier, inputs):
    audio, image = inputs
    with torch.no_grad():
        torch.testing.assert_close(classifier(audio, None, "audioonly"), classifier(audio, image, "audioonly"))
        torch.testing.assert_close(classifier(None, image, "missingvideoonly"), classifier(audio, image, "missingvideoonly"))
    with pytest.raises(ValueError, match="needs the audio"):
        classifier(None, image, "multimodal")
    with pytest.raises(ValueError, match="mode must be one of"):
        classifier(audio, image, "stereo")


def test_forward_feat_and_embeddings(classifier, inputs):
    audio, image = inputs
    with torch.no_grad():
        a, v = classifier.forward_feat(audio, image)
        ea, ev = classifier.embed(audio, image)
    s = ref.to64(classifier.state_dict())
    want_a = ref.stream(s, ref.audio_tokens(s, audio, 4), 4, "_a")
    want_v = ref.stream(s, ref.visual_tokens(s, image, 4), 4, "_v")
    assert a.shape == (2, 512, 64) and v.shape == (2, 196, 64)
    torch.testing.assert_close(a.double(), want_a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(v.double(), want_v, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ea.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(ea, torch.nn.functional.normalize(a.mean(1), dim=-1))


def test_audio_tokens_are_frequency_major():
    """Token p = f * 64 + t: a spectrogram bump at (time 16..31, freq 32..47) lands in token 2*64+1."""
    m = CAVMAEFT(TINY).eval()
    audio = torch.zeros(1, 1024, 128)
    audio[0, 16:32, 32:48] = 1.0
    with torch.no_grad():
        tokens = m.patch_embed_a(audio.unsqueeze(1).transpose(2, 3))
        base = m.patch_embed_a(torch.zeros(1, 1, 128, 1024))
    changed = ((tokens - base).abs().sum(-1) > 0).nonzero()[:, 1].tolist()
    assert changed == [2 * 64 + 1]


@pytest.mark.parametrize("norm_pix", [False, True])
def test_pretrain_forward_matches_reference_math(inputs, norm_pix):
    torch.manual_seed(3)
    model = CAVMAE(TINY.replace(norm_pix_loss=norm_pix)).eval()
    audio, image = inputs
    g = torch.Generator().manual_seed(4)
    noise_a, noise_v = torch.rand(2, 512, generator=g), torch.rand(2, 196, generator=g)
    with torch.no_grad():
        out = model(audio, image, noise_a=noise_a, noise_v=noise_v)
        again = model(audio, image, noise_a=noise_a, noise_v=noise_v)
    want = ref.pretrain_losses(ref.to64(model.state_dict()), audio, image, noise_a, noise_v, 0.75,
                               TINY.num_heads, TINY.decoder_num_heads, norm_pix)
    for name in ("loss", "loss_mae", "loss_mae_a", "loss_mae_v", "loss_c", "c_acc", "pred_a", "pred_v", "mask_a", "mask_v"):
        torch.testing.assert_close(getattr(out, name).double(), want[name], rtol=1e-4, atol=1e-4, msg=name)
        assert torch.equal(getattr(out, name), getattr(again, name)), f"{name} not reproducible"
    assert out.pred_a.shape == (2, 512, 256) and out.pred_v.shape == (2, 196, 768)
    assert out.mask_a.sum().item() == 2 * (512 - 128) and out.mask_v.sum().item() == 2 * (196 - 49)


def test_pretrain_backward_and_structured_modes(inputs):
    model = CAVMAE(TINY)
    audio, image = inputs
    for mode in ("unstructured", "time", "freq", "tf"):
        out = model(audio, image, mask_mode=mode, bidirect_contrast=True)
        out.loss.backward()
        assert torch.isfinite(out.loss)
        if mode == "time":  # 48 of 64 time columns removed entirely
            cols_removed = out.mask_a.reshape(2, 8, 64).min(1).values.sum(1)
            assert cols_removed.tolist() == [48.0, 48.0]
    assert model.patch_embed_a.proj.weight.grad is not None
    assert model.pos_embed_a.grad is None  # frozen, as the reference pre-training recipe


def test_contrastive_loss_hand_case():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss, acc = CAVMAE.contrastive_loss(a, a.clone())
    # sim = I / 0.05: each column's softmax puts e^20 / (e^20 + 1) on the diagonal
    want = -torch.log(torch.exp(torch.tensor(20.0)) / (torch.exp(torch.tensor(20.0)) + 1))
    torch.testing.assert_close(loss, want)
    assert acc.item() == 1.0
    _, acc_swapped = CAVMAE.contrastive_loss(a, a.flip(0))
    assert acc_swapped.item() == 0.0


def test_patchify_roundtrip_and_layout():
    x = torch.arange(2 * 3 * 32 * 48, dtype=torch.float32).reshape(2, 3, 32, 48)
    p = patchify(x, 16)
    assert p.shape == (2, 6, 768)
    # patch 1 is row 0, col 1; its first value is pixel (0, 16) of channel 0, then channel 1
    assert p[0, 1, 0] == x[0, 0, 0, 16] and p[0, 1, 1] == x[0, 1, 0, 16]
    torch.testing.assert_close(unpatchify(p, 16, (2, 3), 3), x)
    # numpy and torch give the same layout
    pn = patchify(x.numpy(), 16)
    assert (pn == p.numpy()).all()
    assert (unpatchify(pn, 16, (2, 3), 3) == x.numpy()).all()
    spec = torch.randn(2, 64, 32)
    assert audio_to_image(spec).shape == (2, 1, 32, 64)
    torch.testing.assert_close(image_to_audio(audio_to_image(spec)), spec)
    assert (audio_to_image(spec.numpy()) == audio_to_image(spec).numpy()).all()


def test_full_size_key_layout_and_parameter_count():
    """docs/model.md §4-5: classifier 478 keys; pre-training model 647 keys and 191.0 M parameters."""
    with torch.device("meta"):
        ft, pt = CAVMAEFT(BASE), CAVMAE(BASE)
    assert len(ft.state_dict()) == 478
    assert len(pt.state_dict()) == 647
    assert round(sum(p.numel() for p in pt.parameters()) / 1e6, 1) == 191.0
    keys = set(pt.state_dict())
    for k in ("blocks_u.0.norm1_a.weight", "blocks_a.10.norm2_v.bias", "decoder_blocks.7.norm1_v.weight",
              "decoder_pos_embed_a", "mask_token", "norm_a.weight", "decoder_pred_v.bias"):
        assert k in keys


def test_sincos_position_layout():
    """First half of the audio embedding encodes the time index, the second half the frequency."""
    m = CAVMAEFT(TINY)
    pe = m.pos_embed_a[0]  # [512, 64]
    half = pe.shape[1] // 2
    # tokens 0 (f0, t0) and 64 (f1, t0) share a time index -> equal first halves
    torch.testing.assert_close(pe[0, :half], pe[64, :half])
    assert not torch.allclose(pe[0, half:], pe[64, half:])
    # tokens 0 (f0, t0) and 1 (f0, t1) share a frequency index -> equal second halves
    torch.testing.assert_close(pe[0, half:], pe[1, half:])


def test_joint_classifier_stage_is_the_reference_per_frame_loop(classifier, inputs):
    """The joint stage shares the audio-only work of the first joint block across frames; its
    logits must still be the reference's whole forward, one frame at a time."""
    audio, image = inputs
    frames = torch.stack([image, image.flip(-1), 0.5 * image], dim=1)  # [2, 3 frames, 3, 224, 224]
    with torch.no_grad():
        a_tok = classifier.forward_audio_encoder(audio)
        v_tok = torch.stack([classifier.forward_visual_encoder(frames[:, i]) for i in range(3)], dim=1)
        logits, probs = classifier.forward_joint_classifier(a_tok, v_tok, task="multi-label", num_frames=3)
    s = ref.to64(classifier.state_dict())
    want = torch.stack([ref.classify(s, audio, frames[:, i], "multimodal", TINY.num_heads) for i in range(3)], 1)
    assert logits.shape == (2, 3, TINY.num_classes)
    torch.testing.assert_close(logits.double(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(probs.double(), torch.sigmoid(want).mean(1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prefix_scale, rest_scale", [(1.0, 1.0), (30.0, 1.0), (1.0, 30.0)])
def test_block_shared_prefix_equals_the_block_per_frame(prefix_scale, rest_scale):
    """Large scores on either side make the softmax's maximum come from the prefix keys for some
    rows and from a frame's keys for others: both rescalings must give the plain block."""
    torch.manual_seed(3)
    m = CAVMAEFT(TINY).eval()
    blk = m.blocks_u[0]
    prefix = prefix_scale * torch.randn(2, 7, TINY.embed_dim)
    rest = rest_scale * torch.randn(2, 4, 5, TINY.embed_dim)
    with torch.no_grad():
        got = blk.forward_shared_prefix(prefix, rest)
        want = blk(torch.cat((prefix.unsqueeze(1).expand(2, 4, 7, TINY.embed_dim), rest), 2).reshape(8, 12, -1))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * max(prefix_scale, rest_scale))


@pytest.mark.parametrize("depth_joint", [0, 2])
def test_joint_classifier_stage_any_joint_depth(depth_joint):
    torch.manual_seed(4)
    m = CAVMAEFT(TINY.replace(depth_joint=depth_joint)).eval()
    a = torch.randn(1, 512, TINY.embed_dim)
    v = torch.randn(1, 2, 196, TINY.embed_dim)
    with torch.no_grad():
        logits, _ = m.forward_joint_classifier(a, v, task="single-label", num_frames=2)
        want = torch.stack([m.head(m.pooled_features(a, v[:, i], "multimodal")) for i in range(2)], 1)
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
