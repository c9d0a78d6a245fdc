"""``cavmae cache``: what the cache holds (sizes, last use), and pruning or clearing it."""

from __future__ import annotations

import sys
import time

import click

from cavmae.errors import CavmaeError

from .common import echo_json

CONTEXT = {"help_option_names": ["-h", "--help"]}


def _table(entries, now: float) -> list[str]:
    from cavmae.hub.inventory import format_age, format_size

    rows = [("KIND", "NAME", "SIZE", "LAST USED", "DETAIL")]
    rows += [(e.kind, e.name, format_size(e.size), f"{format_age(now - e.last_used)} ago",
              e.detail + (f" (+{format_size(e.shared)} shared with an entry above)" if e.shared else ""))
             for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.rjust(w) if i == 2 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
            for r in rows]


def _summary(entries, size: int | None = None) -> str:
    """"N items, SIZE": ``size`` by default the entries' (each hard-linked file once)."""
    from cavmae.hub.inventory import format_size

    size = sum(e.size for e in entries) if size is None else size
    return f"{len(entries)} item{'s' * (len(entries) != 1)}, {format_size(size)}"


@click.group(invoke_without_command=True, context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print the listing as JSON.")
@click.pass_context
def cache(ctx: click.Context, as_json: bool) -> None:
    """List the cache ($CAVMAE_HOME, default ~/.cache/cavmae): downloaded checkpoints, label
    files, exports (with the optimized copies made on first use) and TensorRT engines, with
    their sizes and last use.

    \b
    Examples:
      cavmae cache
      cavmae cache --json
      cavmae cache prune --older-than 30d
      cavmae cache clear --yes
    """
    if ctx.invoked_subcommand is not None:
        return
    from cavmae.hub.cache import cavmae_home
    from cavmae.hub.inventory import list_cache

    home = cavmae_home()
    entries = list_cache(home)
    if as_json:
        echo_json({"home": str(home), "total_bytes": sum(e.size for e in entries),
                   "entries": [e.to_dict() for e in entries]})
        return
    if not entries:
        click.echo(f"the cache {home} is empty")
        return
    for line in _table(entries, time.time()):
        click.echo(line)
    click.echo(f"total: {_summary(entries)} in {home}")


def _confirm(what: str, yes: bool) -> bool:
    """True when the user agreed (or passed --yes); refuses without a terminal to ask on."""
    if yes:
        return True
    if not sys.stdin.isatty():
        raise CavmaeError(f"not deleting {what} without confirmation: stdin is not a terminal; pass --yes")
    return click.confirm(f"Delete {what}?", default=False, err=True)


def _delete(entries, yes: bool, dry_run: bool, as_json: bool, clear: bool = False) -> None:
    from cavmae.hub.cache import cavmae_home
    from cavmae.hub.inventory import clear_cache, freed_bytes, remove_entries

    home = cavmae_home()
    freed = freed_bytes(entries)  # what removing them gives back: shared graphs stay with the others
    if dry_run or not entries:
        if as_json:
            echo_json({"home": str(home), "removed": [], "would_remove": [e.to_dict() for e in entries], "busy": [],
                       "freed_bytes": freed})
        else:
            for e in entries:
                click.echo(f"would remove {e.kind} {e.name} ({e.path})")
            click.echo(f"{'would remove' if entries else 'nothing to remove:'} {_summary(entries, freed)}", err=True)
        return
    if not _confirm(f"{_summary(entries, freed)} from {home}", yes):
        click.echo("nothing deleted", err=True)
        return
    removed, busy = clear_cache(home) if clear else remove_entries(entries)
    if as_json:
        echo_json({"home": str(home), "removed": [e.to_dict() for e in removed],
                   "would_remove": [], "busy": [e.to_dict() for e in busy],
                   "freed_bytes": None if busy else freed})
    else:
        click.echo(f"removed {_summary(removed, None if busy else freed)}", err=True)
    for e in busy:
        click.echo(f"warning: kept {e.path}: another process is writing it", err=True)


@cache.command(context_settings=CONTEXT)
@click.option("--older-than", "older", required=True, metavar="AGE",
              help="Remove items last used longer ago than AGE: a number and s, m, h, d or w (30d, 12h).")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation (needed without a terminal).")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@click.option("--json", "as_json", is_flag=True, help="Print what was removed as JSON.")
def prune(older: str, yes: bool, dry_run: bool, as_json: bool) -> None:
    """Remove cached checkpoints, exports and engines not used for a while.

    \b
    Examples:
      cavmae cache prune --older-than 30d
      cavmae cache prune --older-than 2w --dry-run
    """
    from cavmae.hub.inventory import list_cache, older_than, parse_age

    _delete(older_than(list_cache(), parse_age(older)), yes, dry_run, as_json)


@cache.command(context_settings=CONTEXT)
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation (needed without a terminal).")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@click.option("--json", "as_json", is_flag=True, help="Print what was removed as JSON.")
def clear(yes: bool, dry_run: bool, as_json: bool) -> None:
    """Remove everything cavmae cached: checkpoints, label files, exports, engines.

    Files under $CAVMAE_HOME that cavmae did not put there are left alone.
    """
    from cavmae.hub.inventory import list_cache

    _delete(list_cache(), yes, dry_run, as_json, clear=True)
