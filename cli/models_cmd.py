"""``cavmae models`` and ``cavmae download``: the registry of released checkpoints."""

from __future__ import annotations

from typing import Any

import click

from .common import EXIT_INPUT_FAILED, echo_json, warn


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
    from cavmae.errors import CavmaeError

    done: list[dict[str, str | None]] = []
    for info in infos:  # each model is tried: one that fails does not stop the others
        try:
            done.append(_download_one(registry, info.name, mirror, sha256, progress=not as_json))
        except CavmaeError as e:
            if len(infos) == 1:
                raise
            warn(f"{info.name}: {e}")
            done.append({"name": info.name, "error": str(e)})
            continue
        if not as_json:
            click.echo(f"{info.name}: {done[-1]['path']}")
    if as_json:
        echo_json(done)
    failed = [d for d in done if "error" in d]
    if failed:
        click.echo(f"{len(failed)} of {len(done)} downloads failed (see warnings above).", err=True)
        click.get_current_context().exit(EXIT_INPUT_FAILED)


def _download_one(registry, name: str, mirror: str | None, sha256: str | None, progress: bool) -> dict[str, str | None]:
    """Download (or find cached and verified) one model and its labels."""
    from cavmae.errors import CavmaeError

    if sha256 and registry.cached_path(name):
        from cavmae.fsio import sha256_file

        if sha256_file(registry.checkpoint_path(name)) != sha256.strip().lower():
            raise CavmaeError(f"the cached {name} does not match --sha256; delete"
                              f" {registry.checkpoint_path(name)} and download again")
    cached = registry.cached_path(name)
    if cached is not None and not sha256:  # asked for explicitly: a damaged copy is replaced
        try:
            registry.verify_cached(name)
        except CavmaeError as e:
            warn(f"the cached {name} is damaged ({e}); downloading it again")
            cached.unlink()
    path = registry.ensure_model(name, mirror=mirror, progress=progress, sha256=sha256)
    labels = registry.ensure_labels(name, mirror=mirror, progress=progress)
    return {"name": name, "path": str(path), "labels": str(labels) if labels else None}
