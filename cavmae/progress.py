"""Progress bars: shown on an interactive stderr only, never in logs or pipes."""

from __future__ import annotations

import os
import sys
from typing import Any


def progress_enabled(requested: bool = True) -> bool:
    """Whether to draw a bar: asked for, stderr is a terminal and CAVMAE_NO_PROGRESS is unset."""
    return requested and sys.stderr.isatty() and not os.environ.get("CAVMAE_NO_PROGRESS")


def progress_bar(iterable: Any = None, *, enabled: bool = True, **kwargs: Any) -> Any:
    """A tqdm bar on stderr, disabled unless :func:`progress_enabled`."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not progress_enabled(enabled), file=sys.stderr, **kwargs)
