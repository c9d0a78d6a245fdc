"""``cavmae models`` and ``cavmae download``: the registry of released checkpoints."""

from __future__ import annotations

from typing import Any

import click

from .common import echo_json


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models(as_json: bool) -> None:
    """List the released checkpoints and which are already downloaded.

    \b
    Example:
      cavmae models
    """
    from cavmae.hub import registry
    from cavmae.hub.cache import cavmae_home

    rows: list[dict[str, Any]] = []
    for info in registry.list_models():
        cached = registry.cached_path(info.name)
        rows.append({
            "name": info.name, "kind": info.kind, "classes": info.num_classes, "task": info.task,
            "finetune_mode": info.finetune_mode, "label_set": info.label_set, "modes": list(info.modes), "reported": info.reported, "cached": str(cached) if cached else None,
            "default": info.name == registry.DEFAULT_MODEL, "description": info.description,
        })
    if as_json:
        echo_json({"home": str(cavmae_home()), "models": rows})
        return
    click.echo(f"{'name':<22}{'kind':<12}{'classes':>8}  {'reported':<14}{'cached':<8}")
    for r in rows:
        mark = "*" if r["default"] else " "
        click.echo(f"{r['name'] + mark:<22}{r['kind']:<12}{r['classes'] or '-':>8}  {r['reported']:<14}"
                   f"{'yes' if r['cached'] else 'no':<8}")
    click.echo(f"\n* default model; cache: {cavmae_home()} (set CAVMAE_HOME to move it)")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("names", nargs=-1)
@click.option("--all", "all_models", is_flag=True, help="Download every released checkpoint.")
@click.option("--mirror", envvar="CAVMAE_MIRROR", default=None, metavar="URL",
              help="Base URL replacing the original hosts (env CAVMAE_MIRROR).")
@click.option("--sha256", default=None, metavar="HEX", help="Pin the expected sha256 (one model only).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def download(names: tuple[str, ...], all_models: bool, mirror: str | None, sha256: str | None, as_json: bool) -> None:
    """Download released checkpoints (and their label CSVs) into the cache, verified.

    \b
    Examples:
      cavmae download as-full-51.2
      cavmae download --all --mirror https://models.example.org/cavmae
    """
    from cavmae.hub import registry

    if all_models:
        names = tuple(i.name for i in registry.list_models())
    if not names:
        raise click.UsageError("name at least one model (see `cavmae models`) or pass --all")
    infos = [registry.get_model_info(n) for n in names]  # unknown names fail before any download
    if sha256 and len(infos) != 1:
        raise click.UsageError("--sha256 pins one file: give exactly one model name")
    done = []
    for info in infos:
        if sha256 and registry.cached_path(info.name):
            from cavmae.errors import CavmaeError
            from cavmae.fsio import sha256_file

            if sha256_file(registry.checkpoint_path(info.name)) != sha256.strip().lower():
                raise CavmaeError(f"the cached {info.name} does not match --sha256; delete"
                                  f" {registry.checkpoint_path(info.name)} and download again")
        path = registry.ensure_model(info.name, mirror=mirror, progress=not as_json, sha256=sha256)
        labels = registry.ensure_labels(info.name, mirror=mirror, progress=not as_json)
        done.append({"name": info.name, "path": str(path), "labels": str(labels) if labels else None})
        if not as_json:
            click.echo(f"{info.name}: {path}")
    if as_json:
        echo_json(done)
