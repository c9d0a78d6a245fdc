"""Entry point of the ``cavmae`` console script.

Commands live in their own modules and are imported only when invoked (``LazyGroup``), so
``cavmae --help`` stays fast and a command that needs torch or TensorRT does not slow the rest.
Errors are handled once, here: a ``CavmaeError`` is a user mistake (one line, exit 2), anything
else is a bug (one line and a hint, exit 1); ``--debug`` shows the traceback instead. Usage
errors (unknown option or command, bad value) are one line too, naming the ``--help`` to read,
with exit code 2 as click gives them.
"""

from __future__ import annotations

import difflib
import errno
import importlib
import logging
import os
import sys
from typing import Any

import click

from cavmae import __version__
from cavmae.errors import CavmaeError

#: command name -> "module:function", imported on first use
COMMANDS: dict[str, str] = {
    "models": "cavmae.cli.models_cmd:models",
    "download": "cavmae.cli.models_cmd:download",
    "cache": "cavmae.cli.cache_cmd:cache",
    "export": "cavmae.cli.export_cmd:export",
    "classify": "cavmae.cli.classify_cmd:classify",
    "embed": "cavmae.cli.embed_cmd:embed",
    "search": "cavmae.cli.embed_cmd:search",
    "index": "cavmae.cli.index_cmd:index",
    "reconstruct": "cavmae.cli.visualize_cmd:reconstruct",
    "localize": "cavmae.cli.visualize_cmd:localize",
    "evaluate": "cavmae.cli.evaluate_cmd:evaluate",
    "bench": "cavmae.cli.bench_cmd:bench",
    "prepare": "cavmae.cli.train_cmd:prepare",
    "pretrain": "cavmae.cli.train_cmd:pretrain",
    "finetune": "cavmae.cli.train_cmd:finetune",
    "serve": "cavmae.cli.serve_cmd:serve",
}

#: one-line summaries for `cavmae --help` without importing every command
SUMMARIES: dict[str, str] = {
    "models": "List the released checkpoints and which are cached.",
    "download": "Download released checkpoints into the cache.",
    "cache": "List the cache (sizes, last use); prune or clear it.",
    "export": "Export a model to per-stage ONNX graphs (and a Triton repository).",
    "classify": "Classify videos: top-k audio-visual labels.",
    "embed": "Build or merge an audio-visual embedding index.",
    "search": "Search an embedding index with audio, an image or a video.",
    "index": "Maintain an embedding index: merge shards, build-ann, prune.",
    "reconstruct": "Masked reconstruction figure of a clip (pre-trained models).",
    "localize": "Sound-source heat map over a frame.",
    "evaluate": "mAP / accuracy and retrieval recall on a dataset.",
    "bench": "Latency benchmark against the reference-style PyTorch loop.",
    "prepare": "Extract audio and frames of videos into the reference dataset layout.",
    "pretrain": "CAV-MAE pre-training (masked reconstruction + contrast).",
    "finetune": "Fine-tune a classifier.",
    "serve": "HTTP service with dynamic batching and a web page to try a video.",
}


#: options of ``cavmae`` itself, written before the command
_GLOBAL_OPTIONS = ("-v", "-vv", "--verbose", "--debug")


class OneLineUsageError(click.UsageError):
    """A click usage error shown as one line: ``Error: ... (see 'cavmae CMD --help')``."""

    def show(self, file: Any = None) -> None:
        path = self.ctx.command_path if self.ctx is not None else "cavmae"
        click.echo(f"Error: {self.message} (see '{path} --help')", err=True, file=file)


def one_line_usage_error(e: click.UsageError) -> click.UsageError:
    """``e`` reworded as one line; click's help-on-no-arguments passes through unchanged."""
    if isinstance(e, (OneLineUsageError, click.exceptions.NoArgsIsHelpError)):
        return e
    if isinstance(e, click.NoSuchOption):
        # click appends its suggestion without a separator ("--fo Did you mean --foo?")
        text = f"no such option: {e.option_name}"
        if e.option_name in _GLOBAL_OPTIONS and e.ctx is not None and e.ctx.parent is not None:
            command = e.ctx.command_path.split()[-1]
            text += f"; it goes before the command: cavmae {e.option_name} {command} ..."
        elif e.possibilities:
            text += ". Did you mean " + " or ".join(list(e.possibilities)[:3]) + "?"  # closest first
    else:
        text = " ".join(e.format_message().split())
        if text[:1].isupper() and text[1:2].islower():  # "Invalid value" -> "invalid value"
            text = text[0].lower() + text[1:]
        if text.endswith(".") and not text.endswith(".."):
            text = text[:-1]
    return OneLineUsageError(text, e.ctx)


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(COMMANDS) | set(self.commands))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.commands:
            return self.commands[name]
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name = args[0] if args else ""
        if name and not name.startswith("-") and not ctx.resilient_parsing and self.get_command(ctx, name) is None:
            close = difflib.get_close_matches(name, self.list_commands(ctx), n=1, cutoff=0.6)
            ctx.fail(f"no such command {name!r}" + (f". Did you mean {close[0]!r}?" if close else ""))
        return super().resolve_command(ctx, args)

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:  # the group's own options (`cavmae --fo`)
            raise one_line_usage_error(e) from None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, SUMMARIES.get(name, "")) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        debug = bool(ctx.params.get("debug"))
        try:
            result = super().invoke(ctx)
            # output still buffered fails here, in one line, rather than at exit, where the
            # interpreter (or _end_now) could only drop it
            sys.stdout.flush()
            return result
        except click.UsageError as e:  # a command's options, arguments, or an unknown command
            raise one_line_usage_error(e) from None
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except CavmaeError as e:
            if debug:
                raise
            click.echo(f"Error: {e}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)
        except (OSError, MemoryError) as e:
            # the file system or the machine refused (a read-only or missing folder, a full
            # disk, a file where a folder should be, too little memory): the user can act on it
            message = _resource_error(e)
            if debug or message is None:
                raise
            _drop_unwritable_output()
            click.echo(f"Error: {message}", err=True)
            ctx.exit(2)
        except Exception as e:  # a bug: keep it to one line unless asked
            if debug:
                raise
            first = str(e).splitlines()[0] if str(e) else ""
            click.echo(
                f"Internal error: {type(e).__name__}: {first} (run with --debug for a traceback)",
                err=True,
            )
            ctx.exit(1)


#: errors of a write that is refused for want of room. Writing stdout (redirected to a full disk
#: or /dev/full) raises one that names no file, and so does writing a file object the library
#: opened: either way the command's output could not be written, which the user can act on.
#: A closed pipe (EPIPE) is not among them: click ends the command quietly, as a reader that
#: stopped early (``cavmae models | head -1``) expects.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _resource_error(e: BaseException) -> str | None:
    """One line for a file-system error on a path, a write refused for want of room (stdout
    included), or running out of memory; None for others."""
    if isinstance(e, MemoryError):
        detail = str(e).splitlines()[0] if str(e) else "memory is exhausted"
        return f"out of memory ({detail}); use smaller batches or fewer workers"
    if isinstance(e, OSError) and e.filename is not None:
        return f"cannot use {e.filename}: {e.strerror or e}"
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
        return f"cannot write output: {e.strerror or e}"
    return None


def _drop_unwritable_output() -> None:
    """After a write was refused: when stdout still holds output it cannot write, point it at
    the null device, so that the interpreter's flush at exit does not fail once more (a second
    report, exit code 120) after the one-line error. Output stdout can write is flushed."""
    try:
        sys.stdout.flush()
    except ValueError:  # closed: nothing left to flush
        pass
    except OSError:
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, sys.stdout.fileno())
            os.close(null)
        except (OSError, ValueError):  # a stream without a file descriptor (a test's capture)
            pass


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cavmae")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(debug: bool, verbose: int) -> None:
    """CAV-MAE audio-visual models: export, classify, embed, reconstruct, benchmark, train.

    \b
    Examples:
      cavmae classify video.mp4
      cavmae export as-full-51.2 -o exports/as-full
      cavmae bench --engine ort --batch 1,8
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    # without -v, the library's warnings read like the commands' own ("warning: ..."); with -v
    # the logger's name says where each line comes from
    fmt = "%(levelname)s %(name)s: %(message)s" if verbose else "%(levelname_lower)s: %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LevelFormatter(fmt))
    logging.basicConfig(level=level, handlers=[handler])


class _LevelFormatter(logging.Formatter):
    """Adds ``levelname_lower`` (``warning``) to the fields a format can use."""

    def format(self, record: logging.LogRecord) -> str:
        record.levelname_lower = record.levelname.lower()
        return super().format(record)


def main() -> None:
    try:
        cli(prog_name="cavmae")
    except SystemExit as e:  # click ends every run with one
        from cavmae.heap import is_one_shot

        if is_one_shot() and (e.code is None or isinstance(e.code, int)):
            _stop_ray()
            _end_now(e.code or 0)
        raise


def _stop_ray() -> None:
    """Stop the local Ray a ``--ray`` run started: :func:`_end_now` skips the exit hook that
    would, and Ray's agent processes would outlive the command."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def _end_now(code: int) -> None:
    """End a one-shot command's process (:func:`cavmae.heap.is_one_shot`) after flushing its
    output, without the interpreter's teardown: freeing gigabytes of model memory object by
    object and the libraries' exit handlers change nothing a finished command wrote."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it
            pass
    os._exit(code)
