"""The cache root, the one place that reads ``$CAVMAE_HOME``.

Layout under the root::

    $CAVMAE_HOME/                default $XDG_CACHE_HOME/cavmae or ~/.cache/cavmae
        checkpoints/             downloaded checkpoints and label CSVs (cavmae.hub.registry)
        exports/                 checkpoints exported to ONNX on first use (cavmae.runtime)
        trt/                     TensorRT engines when an export directory is read-only
        hashes.json              memo of checkpoint hashes
"""

from __future__ import annotations

import os
from pathlib import Path

from cavmae.errors import CavmaeError

#: Environment variable that moves the cache (read, never written).
ENV_HOME = "CAVMAE_HOME"


def cavmae_home() -> Path:
    """The cache root: ``$CAVMAE_HOME``, else ``$XDG_CACHE_HOME/cavmae``, else ``~/.cache/cavmae``.

    Read on every call (not at import), so tests and users can change the environment.
    """
    home = os.environ.get(ENV_HOME)
    if home:
        path = Path(home).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        path = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "cavmae"
    if path.exists() and not path.is_dir():  # else every command would call the cache empty
        raise CavmaeError(f"the cache {path} is a file, not a folder; set {ENV_HOME} to a folder")
    return path
