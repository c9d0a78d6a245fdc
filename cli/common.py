"""What every command shares: model options, input expansion, sharding, output, progress.

Commands stay thin: they parse, call the library and print. Anything that decides a fact about
models or media lives in the library, not here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click

from cavmae import filetypes
from cavmae.config import MAX_FRAMES
from cavmae.errors import CavmaeError
from cavmae.filetypes import MEDIA_SUFFIXES
from cavmae.manifest import EXPORT_PRECISIONS, TORCH_PRECISIONS

T = TypeVar("T")

ENGINE_CHOICES = ["auto", "ort", "trt", "torch"]
#: every precision some engine runs (cavmae.runtime.loader.check_precision says which one)
PRECISION_CHOICES = list(dict.fromkeys([*EXPORT_PRECISIONS, *TORCH_PRECISIONS]))

#: exit code of a batch job in which some inputs failed (reported, the rest processed): the same
#: code as any other user mistake, so scripts need to know only 0, 1 (a bug) and 2.
EXIT_INPUT_FAILED = 2


def default_model() -> str:
    """The model used when none is given: ``$CAVMAE_MODEL`` or the AudioSet-2M AV classifier."""
    from cavmae.hub.registry import DEFAULT_MODEL

    return os.environ.get("CAVMAE_MODEL", DEFAULT_MODEL)


def model_options(
    default: str | None = "registry", precision: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--model``, ``--engine``, ``--device``, ``--mirror`` for commands that run a model, and
    ``--precision`` where ``precision`` is true (the command takes a ``precision`` argument)."""

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        if precision:
            f = click.option(
                "--precision", type=click.Choice(PRECISION_CHOICES), default=None,
                help="fp32, fp16 or int8 graphs on ONNX Runtime / TensorRT (a checkpoint or registry"
                     " name is exported in it on first use; int8 is checked against fp32 on the sample"
                     " clips first); fp32, fp16 or bf16 autocast on --engine torch. [default: fp32,"
                     " or an export directory's own]")(f)
        f = click.option("--mirror", envvar="CAVMAE_MIRROR", default=None, metavar="URL",
                         help="Base URL replacing the checkpoint hosts (env CAVMAE_MIRROR).")(f)
        f = click.option("--device", default="auto", show_default=True,
                         help="auto, cpu, cuda or cuda:N.")(f)
        f = click.option("--engine", type=click.Choice(ENGINE_CHOICES), default="auto", show_default=True,
                         help="Inference engine: TensorRT, ONNX Runtime or PyTorch.")(f)
        help_text = "Registry name, checkpoint file or export directory."
        if default == "registry":
            f = click.option("-m", "--model", default=None, metavar="MODEL",
                             help=help_text + " [default: $CAVMAE_MODEL or as-full-51.2]")(f)
        else:
            f = click.option("-m", "--model", default=default, required=default is None, metavar="MODEL",
                             help=help_text)(f)
        return f

    return decorate


def open_pipeline(model: str | None, engine: str, device: str, mirror: str | None = None, **kw: Any):
    """Load a pipeline, downloading and exporting on first use with progress on stderr.

    The command runs once and exits: the heap keeps the memory it frees (an export's large
    buffers are then not new pages each time, see :mod:`cavmae.heap`)."""
    from cavmae.heap import keep_freed_memory
    from cavmae.runtime import load

    keep_freed_memory()
    return load(model or default_model(), engine=engine, device=device, mirror=mirror, progress=True, **kw)


def expand_inputs(inputs: Iterable[str], extensions: tuple[str, ...] = MEDIA_SUFFIXES) -> list[Path]:
    """Local files, folders, globs and lists of paths (``.txt``/``.lst``, one a line) as paths
    (see :func:`cavmae.filetypes.expand_inputs`)."""
    return [Path(p) for p in filetypes.expand_inputs(inputs, extensions, path_lists=True)]


def ray_inputs(inputs: Iterable[str], extensions: tuple[str, ...] = MEDIA_SUFFIXES) -> list[str]:
    """With ``--ray``: what :func:`expand_inputs` takes and ``s3://``/``gs://`` files and folders,
    listed in the driver (so a re-run can skip what is done); remote URIs stay strings."""
    from cavmae.runtime.ray_data import list_inputs

    return list_inputs(inputs, extensions)


#: more shards than any job needs: a mistyped count fails instead of naming a folder with it
MAX_SHARDS = 100_000


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/n"`` -> (i, n); ``"auto"`` takes torchrun's RANK / WORLD_SIZE; None -> (0, 1)."""
    if text is None:
        return 0, 1
    if text == "auto":
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise CavmaeError(f"--shard takes i/n (e.g. 0/4) or auto, not {text!r}") from None
    if not (1 <= n <= MAX_SHARDS and 0 <= i < n):
        raise CavmaeError(f"--shard {text}: need 0 <= i < n <= {MAX_SHARDS}")
    return i, n


def select_shard(items: list[T], shard: tuple[int, int], key: Callable[[T], str] = str) -> list[T]:
    """The deterministic subset of ``items`` for shard ``(i, n)``: sorted by key, every n-th.

    Sorting first makes the split independent of the order inputs were listed in, so every
    process of a job computes the same partition.
    """
    i, n = shard
    if n == 1:
        return items
    return [x for k, x in enumerate(sorted(items, key=key)) if k % n == i]


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "file") -> Iterator[T]:
    """A bar on an interactive stderr, else a line per step in logs (see ``cavmae.progress``).

    Print what comes out meanwhile with :func:`echo` (or :func:`warn`, :func:`echo_json`), which
    clear the bar first.
    """
    from cavmae.progress import progress_bar

    yield from progress_bar(iterable, total=total, desc=desc, unit=unit, leave=False)


def echo(message: str = "", *, err: bool = False, nl: bool = True) -> None:
    """``click.echo`` that clears a progress bar on screen first and redraws it after."""
    from cavmae.progress import bar_paused

    with bar_paused():
        click.echo(message, err=err, nl=nl)


def echo_json(obj: Any) -> None:
    """``obj`` as one line of JSON; a file name that is not UTF-8 (surrogate escapes) makes the
    line ASCII with ``\\u`` escapes, which read back to the same name (UTF-8 could not carry it)."""
    text = json.dumps(obj, ensure_ascii=False, default=_json_default)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(obj, ensure_ascii=True, default=_json_default)
    echo(text)


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def warn(message: str) -> None:
    """A one-line warning on stderr (skipped files and the like)."""
    echo(f"warning: {message}", err=True)


def warn_skipped(path: str | Path, reason: str) -> None:
    """``warning: skipped PATH: REASON``, the path once (media errors already start with it)."""
    from cavmae.errors import skipped_message

    warn(skipped_message(path, reason))


#: the ``--frames`` of every command (frames aggregated per clip)
FRAMES = click.IntRange(1, MAX_FRAMES)
