"""Model and preprocessing configuration.

One place decides each fact: the sizes of the model and the constants of the input pipeline
(docs/model.md §1-5) live here and nowhere else. This module is numpy/torch free so that the
runtime can read it where torch is absent.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of a CAV-MAE model (docs/model.md §2-5).

    ``num_classes`` is only used by the classifier (``CAVMAEFT``); the decoder fields only by the
    pre-training model (``CAVMAE``).
    """

    embed_dim: int = 768
    depth_modality: int = 11  # blocks_a and blocks_v
    depth_joint: int = 1  # blocks_u
    num_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 16
    audio_length: int = 1024  # time frames of the spectrogram
    num_mel_bins: int = 128
    image_size: int = 224
    num_classes: int = 527
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    norm_pix_loss: bool = False
    layer_norm_eps: float = 1e-5

    @property
    def audio_grid(self) -> tuple[int, int]:
        """(frequency rows, time columns) of the audio patch grid, e.g. (8, 64)."""
        return self.num_mel_bins // self.patch_size, self.audio_length // self.patch_size

    @property
    def visual_grid(self) -> tuple[int, int]:
        """(rows, cols) of the image patch grid, e.g. (14, 14)."""
        side = self.image_size // self.patch_size
        return side, side

    @property
    def num_audio_tokens(self) -> int:
        f, t = self.audio_grid
        return f * t

    @property
    def num_visual_tokens(self) -> int:
        h, w = self.visual_grid
        return h * w

    @property
    def audio_patch_dim(self) -> int:
        return self.patch_size * self.patch_size

    @property
    def visual_patch_dim(self) -> int:
        return self.patch_size * self.patch_size * 3

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


#: The size of every released checkpoint.
BASE = ModelConfig()

#: A tiny size for fast tests: same token grids, small width and depth.
TINY = ModelConfig(
    embed_dim=64,
    depth_modality=2,
    depth_joint=1,
    num_heads=4,
    num_classes=10,
    decoder_embed_dim=32,
    decoder_depth=1,
    decoder_num_heads=4,
)

PRESETS: dict[str, ModelConfig] = {"base": BASE, "tiny": TINY}


@dataclass(frozen=True)
class PreprocessConfig:
    """Constants of the reference input pipeline (docs/model.md §1).

    The input sizes (spectrogram rows, mel bins, image side) are the model's: they are stored
    once, in :class:`ModelConfig`, and read here through ``model``; bind another model's sizes
    with :meth:`for_model`. ``num_frames`` is how many frames a clip contributes (the frames a
    dataset holds per clip, or the frames an export aggregates).
    """

    sample_rate: int = 16000
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    low_freq: float = 20.0
    preemphasis: float = 0.97
    # AudioSet statistics; the released models use them for VGGSound too.
    fbank_mean: float = -5.081
    fbank_std: float = 4.4849
    clip_seconds: float = 10.0
    num_frames: int = 10
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # Single-frame protocols (retrieval, localization) use the middle frame.
    middle_frame: int = 5
    #: the model whose inputs this pipeline makes (only its input sizes are read)
    model: ModelConfig = field(default=BASE, repr=False)

    @property
    def target_length(self) -> int:
        """Rows (time frames) of the spectrogram: the model's ``audio_length``."""
        return self.model.audio_length

    @property
    def num_mel_bins(self) -> int:
        """Mel bins of the spectrogram: the model's ``num_mel_bins``."""
        return self.model.num_mel_bins

    @property
    def image_size(self) -> int:
        """Side of the square input image: the model's ``image_size``."""
        return self.model.image_size

    @property
    def audio_seconds(self) -> float:
        """Audio a clip's spectrogram covers: ``target_length`` frames of fbank (10.255 s).

        The reference computes the fbank of the whole extracted track and then cuts it to
        ``target_length`` rows, so a 10.04 s clip fills 999 rows, not 998; decoding this much
        audio reproduces that exactly. Counted in whole samples, as the fbank frames them.
        """
        shift = round(self.sample_rate * self.frame_shift_ms / 1000)
        length = round(self.sample_rate * self.frame_length_ms / 1000)
        return ((self.target_length - 1) * shift + length) / self.sample_rate

    def for_model(self, model: ModelConfig) -> PreprocessConfig:
        """These constants making the inputs of ``model`` (its spectrogram and image sizes)."""
        return self if model == self.model else dataclasses.replace(self, model=model)

    def replace(self, **changes: Any) -> PreprocessConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The constants; the input sizes belong to the model config and are not repeated."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}

    @classmethod
    def from_dict(cls, data: dict[str, Any], model: ModelConfig | None = None) -> PreprocessConfig:
        """Read :meth:`to_dict`'s output for ``model`` (default: the released size).

        Older files also hold ``target_length``, ``num_mel_bins`` and ``image_size``: they
        repeated the model's sizes and are ignored.
        """
        known = {f.name for f in dataclasses.fields(cls)} - {"model"}
        kwargs: dict[str, Any] = {
            k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in known
        }
        return cls(**kwargs, model=model or BASE)


#: The reference input pipeline.
DEFAULT_PREPROCESS = PreprocessConfig()

#: the most frames a clip may contribute: well past any protocol (the reference uses 10), and
#: small enough that a mistyped count fails in one line instead of exhausting memory
MAX_FRAMES = 64


def check_max_batch(max_batch: int) -> int:
    """``max_batch`` when it is a whole number >= 1, else a one-line ``CavmaeError``."""
    from .errors import CavmaeError

    if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
        raise CavmaeError(f"max batch must be a whole number >= 1, not {max_batch!r}")
    return max_batch


def check_num_frames(num_frames: int) -> int:
    """``num_frames`` when it is 1..:data:`MAX_FRAMES`, else a one-line ``CavmaeError``."""
    from .errors import CavmaeError

    if not isinstance(num_frames, int) or isinstance(num_frames, bool) or not 1 <= num_frames <= MAX_FRAMES:
        raise CavmaeError(f"frames per clip must be 1 to {MAX_FRAMES}, not {num_frames!r}")
    return num_frames

