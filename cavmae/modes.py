"""The one table of classification modes, read by every layer.

Three vocabularies name the same few things:

- the command line's ``--mode``: ``av``, ``audio``, ``visual`` (which inputs a prediction uses);
- the reference's classifier modes: ``multimodal``, ``audioonly``, ``videoonly``,
  ``missingaudioonly``, ``missingvideoonly`` (which stream of the model feeds the head);
- the fine-tune mode a classifier was trained for: ``multimodal``, ``audioonly``, ``videoonly``.

One row per reference mode ties them together (docs/model.md section 4): the fine-tune mode of
the models that run it, the command-line mode it serves, the exported graph that computes it,
and the inputs it needs. A model fine-tuned on both modalities serves all three command-line
modes: ``audio`` is its ``missingaudioonly`` stream, ``visual`` its ``missingvideoonly``
(the reference names the two by the modality that *is* given). A single-modality model serves
one mode. Everything else (model forward, export stages, manifest, runtime, CLI choices,
training) derives from :data:`TABLE`.

Torch-free: the runtime imports this module; graph names come from :mod:`cavmae.graphs`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .graphs import AUDIO_CLASSIFIER, JOINT_CLASSIFIER, VISUAL_CLASSIFIER

__all__ = [
    "AUTO",
    "CLI_MODES",
    "FINETUNE_MODES",
    "REFERENCE_MODES",
    "TABLE",
    "Mode",
    "best_mode",
    "cli_modes",
    "finetune_mode_of",
    "finetune_needs",
    "graph_for",
    "lookup",
    "modes_without",
    "needs",
    "reference_mode",
    "reference_modes",
]


@dataclass(frozen=True)
class Mode:
    """One reference classifier mode and everything derived from it."""

    reference: str  # the reference's mode name, the model's ``forward(..., mode)``
    finetune: str  # fine-tune mode of the models that have this mode
    cli: str  # command-line ``--mode`` value that selects it
    graph: str  # exported graph computing it (declared in cavmae.graphs)
    audio: bool  # needs the audio input
    video: bool  # needs the frames
    joint: bool  # goes through the joint stream (blocks_u with the shared norms, then norm)

    @property
    def inputs(self) -> str:
        """``"audio and video"``, ``"audio"`` or ``"video"``: for messages."""
        return "audio and video" if self.audio and self.video else ("audio" if self.audio else "video")


#: The table. Order matters: the first mode of a fine-tune mode is its default, and
#: :func:`best_mode` prefers earlier command-line modes (both inputs before one).
TABLE: tuple[Mode, ...] = (
    Mode("multimodal", "multimodal", "av", JOINT_CLASSIFIER.name, audio=True, video=True,
         joint=True),
    Mode("missingaudioonly", "multimodal", "audio", AUDIO_CLASSIFIER.name, audio=True,
         video=False, joint=True),
    Mode("missingvideoonly", "multimodal", "visual", VISUAL_CLASSIFIER.name, audio=False,
         video=True, joint=True),
    Mode("audioonly", "audioonly", "audio", AUDIO_CLASSIFIER.name, audio=True, video=False,
         joint=False),
    Mode("videoonly", "videoonly", "visual", VISUAL_CLASSIFIER.name, audio=False, video=True,
         joint=False),
)

#: ``--mode`` value that picks a mode from the model and the file's streams.
AUTO = "auto"


def _unique(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))


#: the reference's five mode names, in table order
REFERENCE_MODES: tuple[str, ...] = tuple(m.reference for m in TABLE)
#: what a classifier can be fine-tuned for
FINETUNE_MODES: tuple[str, ...] = _unique(m.finetune for m in TABLE)
#: command-line ``--mode`` values (without ``auto``)
CLI_MODES: tuple[str, ...] = _unique(m.cli for m in TABLE)

_BY_REFERENCE = {m.reference: m for m in TABLE}


def lookup(reference: str) -> Mode:
    """The row of a reference mode name; ``ValueError`` names the valid ones."""
    try:
        return _BY_REFERENCE[reference]
    except KeyError:
        raise ValueError(f"mode must be one of {', '.join(REFERENCE_MODES)}, not {reference!r}") from None


def _check_finetune(finetune: str) -> None:
    if finetune not in FINETUNE_MODES:
        raise ValueError(f"finetune_mode must be one of {', '.join(FINETUNE_MODES)}, not {finetune!r}")


def reference_modes(finetune: str) -> tuple[str, ...]:
    """Reference modes a model fine-tuned for ``finetune`` serves (its default first)."""
    _check_finetune(finetune)
    return tuple(m.reference for m in TABLE if m.finetune == finetune)


def cli_modes(finetune: str) -> tuple[str, ...]:
    """Command-line modes a model fine-tuned for ``finetune`` serves (its default first)."""
    _check_finetune(finetune)
    return tuple(m.cli for m in TABLE if m.finetune == finetune)


def reference_mode(finetune: str, cli: str) -> str:
    """The reference mode behind ``--mode cli`` for a model fine-tuned for ``finetune``."""
    _check_finetune(finetune)
    for m in TABLE:
        if m.finetune == finetune and m.cli == cli:
            return m.reference
    raise ValueError(f"a {finetune} model has no {cli!r} mode; it has {', '.join(cli_modes(finetune))}")


def finetune_mode_of(reference: Iterable[str]) -> str:
    """The fine-tune mode of a model that lists the reference modes ``reference``
    (a registry entry's or a manifest's ``modes``); ``multimodal`` when none are listed."""
    names = tuple(reference)
    return lookup(names[0]).finetune if names else FINETUNE_MODES[0]


def finetune_needs(finetune: str) -> tuple[bool, bool]:
    """``(audio, video)``: the inputs fine-tuning in ``finetune`` mode reads."""
    row = lookup(reference_modes(finetune)[0])
    return row.audio, row.video


def _by_cli(cli: str) -> Mode:
    for m in TABLE:
        if m.cli == cli:
            return m
    raise ValueError(f"mode must be one of {', '.join(CLI_MODES)}, not {cli!r}")


def graph_for(cli: str) -> str:
    """The exported graph that classifies in command-line mode ``cli``."""
    return _by_cli(cli).graph


def needs(cli: str) -> tuple[bool, bool]:
    """``(audio, video)``: the inputs command-line mode ``cli`` reads."""
    m = _by_cli(cli)
    return m.audio, m.video


def best_mode(supported: Iterable[str], has_audio: bool, has_video: bool) -> str | None:
    """The command-line mode for a file with these streams, among the ``supported`` ones.

    Both modalities when the model and the file have them, else the one the file has; None when
    the model supports no mode the file can feed.
    """
    have = set(supported)
    for cli in CLI_MODES:
        audio, video = needs(cli)
        if cli in have and (has_audio or not audio) and (has_video or not video):
            return cli
    return None


def modes_without(supported: Iterable[str], stream: str) -> list[str]:
    """The ``supported`` command-line modes that do not read ``stream`` (``"audio"`` or
    ``"video"``): what a file without that stream can still be classified with."""
    uses = 0 if stream == "audio" else 1
    return [m for m in supported if not needs(m)[uses]]
