"""Media decoding with PyAV: a video/audio file -> waveform, sampled RGB frames, model inputs.

One pass over the file: the packets of the wanted window are demuxed once (after a seek when an
offset is given), then the audio packets are decoded and resampled and the video packets are
decoded in order, converting to RGB only the frames that are kept (docs/model.md §1).

Times are seconds relative to the container's start time, so audio and video stay aligned and
a file whose timestamps start at e.g. 1.4 s still has its first frame at 0.

Every failure on a bad file (missing, empty, not media, truncated, no such stream, offset past
the end) is a :class:`~cavmae.errors.MediaError` whose one-line message names the file; PyAV's
own exceptions never escape. No zero-filled stand-ins are returned on a decode error.

Modules, one job each: :mod:`.container` (opening, error mapping, :func:`probe`),
:mod:`.demux` (the packets of one window), :mod:`.audio_decode` (:func:`decode_audio`),
:mod:`.video_decode` (:func:`decode_frames`, the frame positions), :mod:`.clip`
(:func:`load_clip`, :func:`window_offsets`).
"""

from __future__ import annotations

from .audio_decode import decode_audio
from .clip import Clip, load_clip, window_offsets
from .container import MediaInfo, probe
from .video_decode import decode_frames, sample_frame_positions

__all__ = [
    "Clip",
    "MediaInfo",
    "decode_audio",
    "decode_frames",
    "load_clip",
    "probe",
    "sample_frame_positions",
    "window_offsets",
]
