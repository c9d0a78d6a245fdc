"""``cavmae reconstruct`` and ``cavmae localize``: PNG figures of one clip.

Both decode one clip, run the model through the runtime pipeline and draw with
``cavmae.runtime.figures``. The default models follow the reference: reconstruction with the
model pre-trained without ``norm_pix_loss`` (``cav-mae-base-nonorm``, whose decoder predicts
pixels); localization with a pre-trained-only model (``cav-mae-scale++``), as the reference's
``localization.py`` does: the contrastive objective of pre-training is what aligns the pooled
audio embedding with the visual stream's patch tokens, and fine-tuning for classification does
not keep that alignment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cavmae.errors import CavmaeError, MissingStreamError, ModelKindError
from cavmae.masking import DEFAULT_MASK_RATIO, MASK_MODES

from .common import echo_json, model_options, open_pipeline, warn

#: reconstruction: the decoder predicts pixels of the normalized input (docs/model.md section 6)
RECONSTRUCT_MODEL = "cav-mae-base-nonorm"
#: localization: a pre-trained model's modality streams (the reference's localization.py)
LOCALIZE_MODEL = "cav-mae-scale++"

CONTEXT = {"help_option_names": ["-h", "--help"]}


def _show_model_default(f: Any) -> Any:
    """Show ``--model``'s default in ``--help`` (``model_options`` leaves it unshown)."""
    for param in getattr(f, "__click_params__", []):
        if param.name == "model":
            param.show_default = True
    return f


def _frame_option(f: Any) -> Any:
    return click.option("--frame", type=click.IntRange(0), default=None, metavar="INDEX",
                        help="Which of the clip's frames to use [default: the middle one, 5 of 10].")(f)


def _offset_option(f: Any) -> Any:
    return click.option("--offset", type=click.FloatRange(0), default=0.0, show_default=True,
                        metavar="SECONDS", help="Start of the 10 s clip in the file.")(f)


@click.command(context_settings=CONTEXT)
@click.argument("video", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, metavar="PNG",
              help="Where to write the figure (a .png file).")
@_show_model_default
@model_options(default=RECONSTRUCT_MODEL)
@click.option("--mask-ratio", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help=f"Share of patches removed, audio and visual [default: {DEFAULT_MASK_RATIO:g}, or an export's own].")
@click.option("--mask-mode", type=click.Choice(MASK_MODES), default="unstructured", show_default=True,
              help="Audio masking: random patches, whole time columns, frequency rows, or both.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="Seed of the random masks.")
@_frame_option
@_offset_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object (MSEs, output path, ...).")
def reconstruct(video: Path, output: Path, model: str, engine: str, device: str, mirror: str | None,
                mask_ratio: float | None, mask_mode: str, seed: int, frame: int | None, offset: float,
                as_json: bool) -> None:
    """Mask a clip's spectrogram and frame, reconstruct them, and draw the result as a PNG.

    The figure shows the spectrogram (time on x, low frequencies at the bottom) and one frame,
    each as original, masked (removed patches grey) and reconstructed (predicted patches pasted
    in), with the mean squared error on the removed patches. Needs a pre-training model with its
    decoder; the default cav-mae-base-nonorm predicts pixels (models pre-trained with
    norm_pix_loss, like cav-mae-scale++, predict per-patch standardized values).

    \b
    Examples:
      cavmae reconstruct video.mp4 -o rec.png
      cavmae reconstruct video.mp4 -o rec.png --mask-ratio 0.9 --mask-mode time --seed 3
      cavmae reconstruct video.mp4 -o rec.png --json
    """
    from cavmae.audio import audio_frames
    from cavmae.runtime.figures import (
        ReconstructionInfo,
        check_png_path,
        reconstruction_figure,
        save_png,
    )

    output = check_png_path(output)
    _check_media(video, "reconstruct")
    ratios = {} if mask_ratio is None else {"mask_ratio_a": mask_ratio, "mask_ratio_v": mask_ratio}
    # task: a classifier is refused from its registry entry or keys, before download or export
    pipe = open_pipeline(model, engine, device, mirror, task="reconstruct", **ratios)
    try:
        m = pipe.manifest
        if m.model_kind != "pretrain":
            raise ModelKindError(_wrong_kind(model))
        if m.model_config.norm_pix_loss:
            warn(f"{_model_name(model)} was pre-trained with norm_pix_loss: its predictions are per-patch"
                 " standardized and are drawn with each original patch's mean and std; use"
                 f" {RECONSTRUCT_MODEL} for a true pixel reconstruction")
        clip, index = _load(pipe, video, frame, offset)
        rec = pipe.reconstruct(clip.audio, clip.frames[index], seed=seed, mask_ratio_a=mask_ratio,
                               mask_ratio_v=mask_ratio, mask_mode=mask_mode)
        ratio_a = m.mask_ratio_a if mask_ratio is None else mask_ratio
        ratio_v = m.mask_ratio_v if mask_ratio is None else mask_ratio
        frame_time = float(clip.frame_times[index])
        info = ReconstructionInfo(
            source=video.name, model=_model_name(model), mask_ratio_a=ratio_a, mask_ratio_v=ratio_v,
            mask_mode=mask_mode, seed=seed, frame_index=index, frame_time=frame_time, offset=offset,
            frame_shift_s=m.preprocess.frame_shift_ms / 1000.0,
            audio_frames=audio_frames(len(clip.waveform), m.preprocess),
            image_mean=m.preprocess.image_mean, image_std=m.preprocess.image_std,
        )
        image = reconstruction_figure(rec, info)
        engine_name = pipe.describe()
    finally:
        pipe.close()
    save_png(image, output)
    record = {
        "path": str(video), "output": str(output), "model": str(model), "engine": engine_name,
        "mask_ratio_a": ratio_a, "mask_ratio_v": ratio_v, "mask_mode": mask_mode, "seed": seed,
        "offset": offset, "frame": index, "frame_time": round(frame_time, 4),
        "mse_a": float(rec.mse_a), "mse_v": float(rec.mse_v), "audio_frames": info.audio_frames,
        "removed_a": int(rec.mask_a.sum()), "tokens_a": int(rec.mask_a.size),
        "removed_v": int(rec.mask_v.sum()), "tokens_v": int(rec.mask_v.size),
        "width": int(image.shape[1]), "height": int(image.shape[0]),
    }
    if as_json:
        echo_json(record)
    else:
        click.echo(f"wrote {output}: audio MSE {rec.mse_a:.4f}, visual MSE {rec.mse_v:.4f} on removed"
                   f" patches (mask ratio {ratio_a:g}/{ratio_v:g}, {mask_mode}, seed {seed})")


@click.command(context_settings=CONTEXT)
@click.argument("video", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, metavar="PNG",
              help="Where to write the figure (a .png file).")
@_show_model_default
@model_options(default=LOCALIZE_MODEL)
@_frame_option
@_offset_option
@click.option("--alpha", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Weight of the heat map in the overlay.")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON object (output path, heat-map statistics and the map itself).")
def localize(video: Path, output: Path, model: str, engine: str, device: str, mirror: str | None,
             frame: int | None, offset: float, alpha: float, as_json: bool) -> None:
    """Draw where the sound comes from: a heat map over one frame of a clip, as a PNG.

    The map is the cosine between the clip's pooled audio embedding and every patch token of
    the frame's visual stream (14x14), upsampled bilinearly and blended over the frame, with a
    colour bar labelled with the map's minimum and maximum. The default model is the
    pre-trained cav-mae-scale++, as in the reference's localization experiments; any model works.

    \b
    Examples:
      cavmae localize video.mp4 -o heat.png
      cavmae localize video.mp4 -o heat.png --frame 2 --json
    """
    import numpy as np

    from cavmae.runtime.figures import (
        LocalizationInfo,
        check_png_path,
        localization_figure,
        save_png,
    )

    output = check_png_path(output)
    _check_media(video, "localize")
    pipe = open_pipeline(model, engine, device, mirror)
    try:
        m = pipe.manifest
        if m.model_kind == "classifier":
            warn(f"{_model_name(model)} is a fine-tuned classifier: fine-tuning does not train audio and"
                 f" image patches to agree; the pre-trained {LOCALIZE_MODEL} is the reference's choice")
        clip, index = _load(pipe, video, frame, offset)
        heat = np.asarray(pipe.localize(clip.audio, clip.frames[index]), dtype=np.float32)
        frame_time = float(clip.frame_times[index])
        info = LocalizationInfo(source=video.name, model=_model_name(model), frame_index=index,
                                frame_time=frame_time, alpha=alpha,
                                image_mean=m.preprocess.image_mean, image_std=m.preprocess.image_std)
        image = localization_figure(clip.frames[index], heat, info)
        engine_name = pipe.describe()
    finally:
        pipe.close()
    save_png(image, output)
    gh, gw = heat.shape
    row, col = (int(v) for v in np.unravel_index(int(np.argmax(heat)), heat.shape))
    size = clip.frames.shape[-1]
    record = {
        "path": str(video), "output": str(output), "model": str(model), "engine": engine_name,
        "offset": offset, "frame": index, "frame_time": round(frame_time, 4),
        "heatmap": {
            "min": float(heat.min()), "max": float(heat.max()), "mean": float(heat.mean()),
            "std": float(heat.std()), "grid": [gh, gw], "peak": [row, col],
            # the peak patch's centre in the model's input frame (pixels, x then y)
            "peak_xy": [round((col + 0.5) * size / gw, 1), round((row + 0.5) * size / gh, 1)],
        },
        "map": [[round(float(v), 6) for v in r] for r in heat],
        "width": int(image.shape[1]), "height": int(image.shape[0]),
    }
    if as_json:
        echo_json(record)
    else:
        click.echo(f"wrote {output}: frame {index} (t = {frame_time:.2f} s), cosine {heat.min():.3f}"
                   f" .. {heat.max():.3f}, peak at patch row {row}, column {col} of {gh}x{gw}")


# ---------------------------------------------------------------------------------------------


def _model_name(model: str) -> str:
    """A short model name for captions: registry name, or a file/folder's name."""
    return Path(model).name if ("/" in model or Path(model).exists()) else model


def _check_media(video: Path, command: str) -> None:
    """Fail fast (before loading a model) on a missing or unusable file or a missing stream."""
    from cavmae.media import probe

    info = probe(video)
    for have, what in ((info.has_audio, "audio"), (info.has_video, "video")):
        if not have:
            raise MissingStreamError(f"{video}: no {what} stream; {command} needs both audio and video")


def _wrong_kind(model: str) -> str:
    return (f"{_model_name(model)} is a fine-tuned classifier without the decoder; reconstruct needs a"
            f" pre-training model such as {RECONSTRUCT_MODEL} (the default) -- see `cavmae models`")


def _load(pipe: Any, video: Path, frame: int | None, offset: float) -> tuple[Any, int]:
    """Decode the clip at ``offset`` and pick the frame (default: the middle one)."""
    count = pipe.num_frames
    index = min(pipe.manifest.preprocess.middle_frame, count - 1) if frame is None else frame
    if not 0 <= index < count:
        raise CavmaeError(f"--frame must be in 0..{count - 1} (this model uses {count} frames per clip)")
    clip = pipe.load_clip(video, offset=offset)
    return clip, index
