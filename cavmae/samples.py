"""The two sample clips that ship with the package (``cavmae/assets/media``).

They are package data, so an installed cavmae has them as well as a checkout (where
``examples/media`` links to them): the int8 export's accuracy gate runs on them by default, and
the README's examples name them. Where they come from: ``cavmae/assets/media/README.md``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

#: the AudioSet sample (256x144, 12.5 fps, 10.0 s) and the VGGSound one (1280x720, 10.04 s)
SAMPLE_CLIP_NAMES: tuple[str, ...] = ("00W1lcxW-WU_40.000.mp4", "KlsG1EnBEjc_000361.mp4")


def sample_media_dir() -> Path:
    """The folder holding the sample clips inside the installed package."""
    return Path(str(resources.files("cavmae") / "assets" / "media"))


def sample_clips() -> list[Path]:
    """The sample clips that are present (both, unless a packager left them out), sorted."""
    folder = sample_media_dir()
    return [folder / name for name in SAMPLE_CLIP_NAMES if (folder / name).is_file()]
