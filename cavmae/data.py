"""Training datasets: clip records as model inputs, labels, sample weights and sampling.

The clips come from :func:`cavmae.clip_lists.read_clips` (the one reader of dataset files: the
reference dataset JSON and video lists; its docstring has the formats and the path, label and
missing-frame rules; ``ClipRecord``, ``read_clips`` and ``write_dataset_json`` are re-exported
here). Reference-layout clips are read from their 16 kHz ``wav`` and
``{video_path}/frame_{i}/{video_id}.jpg`` frames, video files are decoded on the fly with the
shared preprocessing (:mod:`cavmae.media`). Labels are ``mid`` s looked up in a label CSV
``index,mid,display_name``; an optional weight CSV holds one sampling weight per clip.

:class:`AVDataset` is a map-style dataset (any ``torch.utils.data.DataLoader`` takes it). It
returns dicts of numpy arrays; :func:`collate` stacks them into torch tensors. A training item
is addressed by an :class:`ItemKey` that carries the index *and* the seed of its augmentation
(``(run seed, epoch, position in the epoch)``), so what a position of an epoch looks like never
depends on worker processes, ranks or resumption. A training run's dataset
(``skip_bad_clips``) replaces a clip that fails to load by the next clip that loads, and says so
in the item (``"skipped"``); :meth:`AVDataset.missing_files` finds missing files up front. :class:`StepBatchSampler` produces those keys:
one global order per epoch, cut into optimizer steps of ``batch_size`` samples, each step split
into the micro-batches of every rank and accumulation round.

This module needs numpy only (torch is imported inside :func:`collate`).
"""

from __future__ import annotations

import functools
import wave
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np

from cavmae.audio import prepare_audio
from cavmae.augment import (
    AugmentConfig,
    add_noise,
    mix,
    mix_waveforms,
    mixup_lambda,
    smooth_labels,
    spec_augment,
    time_roll,
)
from cavmae.clip_lists import ClipRecord, frame_file, read_clips, write_dataset_json
from cavmae.config import DEFAULT_PREPROCESS, PreprocessConfig
from cavmae.errors import CavmaeError, DatasetError, MediaError
from cavmae.labels import LabelSet, read_label_csv
from cavmae.visual import load_image, preprocess_frame

__all__ = [
    "AVDataset",
    "ClipRecord",
    "ItemKey",
    "LabelSet",
    "StepBatchSampler",
    "balanced_sample_weights",
    "collate",
    "encode_labels",
    "epoch_order",
    "eval_batches",
    "read_clips",
    "read_labels",
    "read_wav",
    "read_weights",
    "write_dataset_json",
]

# --------------------------------------------------------------------------------------------
# Labels


def read_labels(path: str | Path) -> LabelSet:
    """Read a label CSV with the header ``index,mid,display_name`` (the reference format).

    Returns :class:`cavmae.labels.LabelSet` (``ids`` are the mids, in output order).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"label CSV not found: {path}")
    try:
        labels = read_label_csv(path)
    except CavmaeError as e:
        raise DatasetError(str(e)) from None
    if len(set(labels.ids)) != len(labels.ids):
        raise DatasetError(f"{path}: a mid appears twice")
    return labels


@functools.lru_cache(maxsize=16)
def _label_index(labels: LabelSet) -> dict[str, int]:
    return {mid: i for i, mid in enumerate(labels.ids)}


def encode_labels(labels: LabelSet, mids: Sequence[str], source: str = "") -> np.ndarray:
    """Multi-hot float32 ``[C]`` of ``mids``. An unknown mid raises ``DatasetError``."""
    index = _label_index(labels)
    out = np.zeros(len(labels), dtype=np.float32)
    for mid in mids:
        i = index.get(mid)
        if i is None:
            where = f" ({source})" if source else ""
            raise DatasetError(
                f"label {mid!r}{where} is not in the label CSV; check that the dataset and the "
                "label CSV belong together"
            )
        out[i] = 1.0
    return out


def read_weights(path: str | Path, num_clips: int | None = None) -> np.ndarray:
    """Read a sample-weight CSV (one non-negative float per line, dataset order) -> ``[N]``."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"weight CSV not found: {path}")
    values = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            line = line.strip().rstrip(",")
            if not line:
                continue
            try:
                values.append(float(line.split(",")[0]))
            except ValueError:
                raise DatasetError(f"{path}, line {n}: {line!r} is not a number") from None
    w = np.asarray(values, dtype=np.float64)
    if num_clips is not None and w.shape[0] != num_clips:
        raise DatasetError(
            f"{path} has {w.shape[0]} weights but the dataset has {num_clips} clips; the weight "
            "file must have one line per clip, in the same order"
        )
    if w.size == 0 or not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise DatasetError(f"{path}: weights must be finite, >= 0 and not all zero")
    return w


def balanced_sample_weights(clips: Sequence[ClipRecord], labels: LabelSet) -> np.ndarray:
    """Class-balanced sampling weights, as the reference ``gen_weight_file`` makes them.

    Each class weighs ``1000 / (its clip count + 0.01)``; a clip weighs the sum of its classes'
    weights. Returns float64 ``[N]``.
    """
    if not clips:
        return np.zeros(0)
    targets = np.stack([encode_labels(labels, c.label_tokens(), c.video_id) for c in clips])
    class_weight = 1000.0 / (targets.sum(axis=0) + 0.01)
    return (targets * class_weight).sum(axis=1)


# --------------------------------------------------------------------------------------------
# Reading media


def read_wav(path: str | Path, sample_rate: int = DEFAULT_PREPROCESS.sample_rate) -> np.ndarray:
    """First channel of an audio file at ``sample_rate`` as float32 ``[n]``.

    16-bit PCM WAV at the right rate (what ``cavmae prepare`` writes) is read directly; anything
    else goes through PyAV (:func:`cavmae.media.decode_audio`), which resamples.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"audio file not found: {path}")
    try:
        with wave.open(str(path), "rb") as w:
            if w.getsampwidth() == 2 and w.getframerate() == sample_rate and w.getcomptype() == "NONE":
                channels = w.getnchannels()
                raw = w.readframes(w.getnframes())
                # a file cut short ends inside a frame: keep its whole frames, as FFmpeg does
                raw = raw[: len(raw) // (2 * channels) * (2 * channels)]
                data = np.frombuffer(raw, dtype="<i2").reshape(-1, channels)[:, 0]
                return data.astype(np.float32) / np.float32(32768.0)
    except (wave.Error, EOFError):
        pass  # not a plain PCM WAV: let FFmpeg read it
    from cavmae.media import decode_audio

    return decode_audio(path, sample_rate=sample_rate)


# --------------------------------------------------------------------------------------------
# The dataset


class ItemKey(NamedTuple):
    """A training item: the clip's index and the seed of its augmentation."""

    clip: int  # not ``index``: a field of that name would hide ``tuple.index``
    seed: int
    epoch: int
    position: int

    def rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, self.position])


#: what ``frame`` may be: "random" (training), "middle", an index, or "all" (the 10 frames)
FrameChoice = str | int

#: how many clips one training item may skip before the dataset is judged broken: a few bad
#: clips are replaced, but a missing disk or a wrong path makes every clip fail, and replacing
#: clip after clip would only hide that
MAX_SKIPS_PER_ITEM = 8

_T = TypeVar("_T")


class _ClipFailed(Exception):
    """Clip ``clip`` of a training item could not be loaded (``error`` says why); internal to
    :class:`AVDataset`, which replaces the clip."""

    def __init__(self, clip: int, error: BaseException) -> None:
        super().__init__(clip, error)
        self.clip, self.error = clip, error

    @property
    def reason(self) -> str:
        text = str(self.error).splitlines()[0] if str(self.error) else ""
        return text or type(self.error).__name__


class AVDataset:
    """Audio-visual clips as model inputs (map-style dataset).

    ``dataset[key]`` returns a dict of numpy arrays:

    - ``"audio"``: float32 ``[target_length, num_mel_bins]`` normalized fbank (if ``audio``);
    - ``"image"``: float32 ``[3, S, S]`` one normalized frame, or ``"frames"``
      ``[F, 3, S, S]`` with ``frame="all"`` (if ``video``);
    - ``"target"``: float32 ``[C]`` (multi-hot, or mixed and smoothed in training) when a label
      set is given;
    - ``"index"``: the clip's index.

    ``key`` is an ``int`` (evaluation: no augmentation; a ``"random"`` frame is then drawn
    from a generator seeded by the index) or an :class:`ItemKey` (training: all randomness comes
    from ``key.rng()``).

    Args:
        clips: the clip list (:func:`read_clips`).
        labels: label set to encode targets, or ``None`` (no targets).
        augment: training augmentation; ``None`` or an inactive config = none.
        frame: ``"random"`` (a random frame of ``num_frames``, the reference training rule),
            ``"middle"`` (``preprocess.middle_frame``, the reference evaluation rule), an index,
            or ``"all"``.
        audio / video: which modalities to load.
        preprocess: preprocessing constants (target length, image size, normalization).
        frame_fallback: use the nearest lower frame when a reference-layout frame is missing, as
            the reference's training loader does (with a warning). Off by default: a missing
            frame is then a ``DatasetError`` naming the file.
        skip_bad_clips: training items (:class:`ItemKey`) replace a clip (or mixup partner)
            that fails to load by the next clip of the list that loads, and name the replaced
            ones under ``"skipped"`` (``[(video_id, reason)]``); more than
            :data:`MAX_SKIPS_PER_ITEM` in a row raise ``DatasetError``. The replacement is a
            function of the key and of which clips fail, so it does not depend on workers or
            resumption. Evaluation items (``int`` keys) always raise: a replaced clip would
            silently change the metrics. Off by default.
    """

    def __init__(
        self,
        clips: Sequence[ClipRecord],
        labels: LabelSet | None = None,
        *,
        augment: AugmentConfig | None = None,
        frame: FrameChoice = "middle",
        audio: bool = True,
        video: bool = True,
        preprocess: PreprocessConfig = DEFAULT_PREPROCESS,
        frame_fallback: bool = False,
        skip_bad_clips: bool = False,
    ) -> None:
        if not (audio or video):
            raise ValueError("AVDataset needs audio or video")
        if isinstance(frame, str) and frame not in ("random", "middle", "all"):
            raise ValueError(f"frame must be 'random', 'middle', 'all' or an index, not {frame!r}")
        if isinstance(frame, int) and not 0 <= frame < preprocess.num_frames:
            raise ValueError(f"frame index must be in 0..{preprocess.num_frames - 1}, got {frame}")
        self.clips = list(clips)
        self.labels = labels
        self.augment = augment or AugmentConfig()
        self.frame = frame
        self.audio = audio
        self.video = video
        self.preprocess = preprocess
        self.frame_fallback = frame_fallback
        self.skip_bad_clips = skip_bad_clips
        if labels is not None:
            for c in self.clips:  # fail early on unknown or missing labels
                tokens = c.label_tokens()
                if not tokens:
                    raise DatasetError(f"clip {c.video_id} has no labels; a labeled dataset is needed here")
                encode_labels(labels, tokens, c.video_id)

    def __len__(self) -> int:
        return len(self.clips)

    # -- media -----------------------------------------------------------------------------
    def waveform(self, index: int) -> np.ndarray:
        """Mono float32 waveform at the preprocessing rate."""
        clip = self.clips[index]
        sr = self.preprocess.sample_rate
        if clip.wav is not None:
            return read_wav(clip.wav, sr)
        from cavmae.media import decode_audio

        assert clip.video is not None
        return decode_audio(clip.video, sample_rate=sr, duration=self.preprocess.audio_seconds)

    def rgb_frames(self, index: int, which: Sequence[int]) -> list[np.ndarray]:
        """RGB uint8 frames ``which`` (indices into the clip's ``num_frames`` frames)."""
        clip = self.clips[index]
        n = self.preprocess.num_frames
        if clip.frame_dir is not None:
            return [load_image(frame_file(clip, i, fallback=self.frame_fallback)) for i in which]
        from cavmae.media import decode_frames

        assert clip.video is not None
        rgb, _ = decode_frames(clip.video, n, 0.0, self.preprocess.clip_seconds)
        return [rgb[i] for i in which]

    # -- items -----------------------------------------------------------------------------
    def _frames_needed(self) -> list[int]:
        """The frames an item may read: all of them for ``"random"`` and ``"all"``."""
        if self.frame in ("random", "all"):
            return list(range(self.preprocess.num_frames))
        if self.frame == "middle":
            return [self.preprocess.middle_frame]
        return [int(self.frame)]

    def _frame_indices(self, rng: np.random.Generator) -> list[int]:
        if self.frame == "random":
            return [int(rng.integers(self.preprocess.num_frames))]
        return self._frames_needed()

    def _images(self, index: int, rng: np.random.Generator) -> np.ndarray:
        which = self._frame_indices(rng)
        rgb = self.rgb_frames(index, which)
        return np.stack([preprocess_frame(x, self.preprocess) for x in rgb])

    def missing_files(self) -> list[tuple[int, str]]:
        """The files the clips name that do not exist, as ``(clip index, path)`` in clip order.

        Only existence is checked (a stat per file, cheap next to decoding), and only of what
        this dataset reads: the audio (``audio``); the video file, or the frames that ``frame``
        may read (``video``). With ``frame_fallback`` a lower frame stands in for a missing one,
        so a frame at or below the lowest needed one is enough.
        """
        needed = self._frames_needed()
        missing: list[tuple[int, str]] = []
        for i, clip in enumerate(self.clips):
            if clip.video is not None:
                if not Path(clip.video).is_file():
                    missing.append((i, clip.video))
                continue
            if self.audio and clip.wav is not None and not Path(clip.wav).is_file():
                missing.append((i, clip.wav))
            if self.video and clip.frame_dir is not None:
                if self.frame_fallback:
                    low = min(needed)
                    if not any(Path(clip.frame_path(j)).is_file() for j in range(low + 1)):
                        missing.append((i, clip.frame_path(low)))
                else:
                    missing += [(i, p) for p in map(clip.frame_path, needed) if not Path(p).is_file()]
        return missing

    def __getitem__(self, key: int | ItemKey) -> dict[str, Any]:
        if not isinstance(key, ItemKey):
            index = int(key)
            return self._item(index, np.random.default_rng([index]), False, None)
        if not self.skip_bad_clips:
            return self._item(key.clip, key.rng(), True, None)
        failed: dict[int, str] = {}  # clip index -> why it did not load, in the order found
        while True:
            try:
                # a fresh generator each try: the replacement draws what the first try drew
                out = self._item(key.clip, key.rng(), True, failed)
            except _ClipFailed as f:
                failed[f.clip] = f.reason
                if len(failed) >= min(MAX_SKIPS_PER_ITEM, len(self.clips)):
                    raise DatasetError(self._too_many_failed(failed)) from None
                continue
            if failed:
                out["skipped"] = [(self.clips[i].video_id, why) for i, why in failed.items()]
            return out

    def _too_many_failed(self, failed: dict[int, str]) -> str:
        first, why = next(iter(failed.items()))
        return (
            f"{len(failed)} clips in a row failed to load (first {self.clips[first].video_id}: "
            f"{why}); check the dataset's files (a missing folder or disk?), then run again"
        )

    def _replacement(self, index: int, failed: dict[int, str] | None) -> int:
        """``index``, or the next clip (cyclically) that has not failed to load."""
        while failed and index in failed:  # fewer failed than clips: this ends
            index = (index + 1) % len(self.clips)
        return index

    def _loaded(self, index: int, load: Callable[[int], _T], guarded: bool) -> _T:
        """``load(index)``; when ``guarded`` a failure says which clip failed (``_ClipFailed``)."""
        if not guarded:
            return load(index)
        try:
            return load(index)
        except (CavmaeError, OSError) as e:  # missing, corrupt or unreadable media
            raise _ClipFailed(index, e) from e

    def _item(
        self, index: int, rng: np.random.Generator, train: bool, failed: dict[int, str] | None
    ) -> dict[str, Any]:
        """One item; with ``failed`` (a dict, even empty) the clips in it are replaced
        (:meth:`_replacement`) and a clip that fails to load raises ``_ClipFailed``."""
        if not 0 <= index < len(self.clips):
            raise IndexError(f"index {index} out of range for {len(self.clips)} clips")
        guarded = failed is not None
        index = self._replacement(index, failed)
        aug = self.augment if train else AugmentConfig()
        cfg = self.preprocess
        out: dict[str, Any] = {"index": index}

        partner, lam = None, 1.0
        if aug.mixup > 0 and rng.random() < aug.mixup:
            partner = self._replacement(int(rng.integers(len(self.clips))), failed)
            lam = mixup_lambda(rng, aug.mixup_alpha)

        if self.audio:
            wav = self._loaded(index, self.waveform, guarded)
            if partner is not None:
                wav = mix_waveforms(wav, self._loaded(partner, self.waveform, guarded), lam)
            try:
                x = prepare_audio(wav, cfg)  # mean-subtract, fbank, pad/cut, normalize
            except MediaError as e:
                error = MediaError(f"clip {self.clips[index].video_id}: {e}")
                raise (_ClipFailed(index, error) if guarded else error) from None
            if aug.freqm or aug.timem:
                fill = (0.0 - cfg.fbank_mean) / cfg.fbank_std
                x = spec_augment(x, rng, aug.freqm, aug.timem, fill)
            if aug.noise:
                x = add_noise(x, rng)
                roll = cfg.target_length if aug.roll_frames is None else aug.roll_frames
                x = time_roll(x, rng, roll)
            out["audio"] = np.ascontiguousarray(x, dtype=np.float32)

        if self.video:
            images = self._loaded(index, lambda i: self._images(i, rng), guarded)
            if partner is not None:
                images = mix(images, self._loaded(partner, lambda i: self._images(i, rng), guarded), lam)
            if self.frame == "all":
                out["frames"] = images
            else:
                out["image"] = images[0]

        if self.labels is not None:
            clip = self.clips[index]
            target = encode_labels(self.labels, clip.label_tokens(), clip.video_id)
            if partner is not None:
                other = self.clips[partner]
                other_target = encode_labels(self.labels, other.label_tokens(), other.video_id)
                target = mix(target, other_target, lam)
            out["target"] = smooth_labels(target, aug.label_smooth) if train else target
        return out


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of :class:`AVDataset` items into a dict of torch tensors; the items'
    ``"skipped"`` lists (clips replaced in training) are joined into one list."""
    import torch

    out: dict[str, Any] = {}
    for k in items[0]:
        if k == "skipped":
            continue
        values = [it[k] for it in items]
        if k == "index":
            out[k] = torch.tensor(values, dtype=torch.long)
        else:
            out[k] = torch.from_numpy(np.stack(values))
    skipped = [s for it in items for s in it.get("skipped", ())]
    if skipped:
        out["skipped"] = skipped
    return out


# --------------------------------------------------------------------------------------------
# Sampling


def epoch_order(
    num_clips: int,
    seed: int,
    epoch: int,
    *,
    shuffle: bool = True,
    weights: np.ndarray | None = None,
    num_samples: int | None = None,
) -> np.ndarray:
    """The global order of clip indices for one epoch, the same on every rank.

    ``weights`` given: ``num_samples`` (default ``num_clips``) draws with replacement, with
    probability proportional to the weights (``WeightedRandomSampler``). Otherwise a random
    permutation (``shuffle``) or ``0..N-1``.
    """
    rng = np.random.default_rng([seed, epoch, 0x5A4D])
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (num_clips,):
            raise ValueError(f"weights must have shape [{num_clips}], got {w.shape}")
        return rng.choice(num_clips, size=num_samples or num_clips, replace=True, p=w / w.sum())
    if shuffle:
        return rng.permutation(num_clips)
    return np.arange(num_clips)


class StepBatchSampler:
    """This rank's micro-batches of :class:`ItemKey` for one epoch (a ``batch_sampler``).

    Optimizer step ``k`` consumes positions ``[k * B, (k + 1) * B)`` of the epoch ``order``
    (``B = batch_size``, the global batch per optimizer step); the incomplete last step is
    dropped (the reference drops the last batch). A step is split into
    ``world_size * accum_steps`` micro-batches of ``m = B / (world_size * accum_steps)``
    positions; micro-batch ``j`` covers ``[k * B + j * m, k * B + (j + 1) * m)`` and rank ``r``
    takes ``j = a * world_size + r`` in accumulation round ``a``. Ranks therefore see disjoint
    shards, and a position's augmentation seed does not depend on how the batch is split.

    ``start_step`` skips the first steps (resuming mid-epoch).
    """

    def __init__(
        self,
        order: np.ndarray,
        batch_size: int,
        *,
        seed: int,
        epoch: int,
        world_size: int = 1,
        rank: int = 0,
        accum_steps: int = 1,
        start_step: int = 0,
    ) -> None:
        per = world_size * accum_steps
        if batch_size % per:
            raise ValueError(
                f"batch_size {batch_size} must be divisible by world_size x accum_steps = {per}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in 0..{world_size - 1}")
        self.order = np.asarray(order)
        self.batch_size = batch_size
        self.micro = batch_size // per
        self.seed, self.epoch = seed, epoch
        self.world_size, self.rank, self.accum_steps = world_size, rank, accum_steps
        self.steps = len(self.order) // batch_size
        self.start_step = min(start_step, self.steps)

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.accum_steps

    def positions(self, step: int, round_: int) -> range:
        j = round_ * self.world_size + self.rank
        start = step * self.batch_size + j * self.micro
        return range(start, start + self.micro)

    def __iter__(self) -> Iterator[list[ItemKey]]:
        for k in range(self.start_step, self.steps):
            for a in range(self.accum_steps):
                yield [
                    ItemKey(int(self.order[p]), self.seed, self.epoch, p)
                    for p in self.positions(k, a)
                ]


def eval_batches(num_clips: int, batch_size: int, world_size: int = 1, rank: int = 0) -> list[list[int]]:
    """This rank's evaluation batches: a contiguous shard of ``0..N-1`` cut into batches.

    Shards of consecutive ranks are consecutive, so concatenating the ranks' outputs in rank
    order gives the dataset order.
    """
    lo = rank * num_clips // world_size
    hi = (rank + 1) * num_clips // world_size
    return [list(range(s, min(s + batch_size, hi))) for s in range(lo, hi, batch_size)]
