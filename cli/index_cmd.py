"""``cavmae index``: maintenance of an embedding index (``merge``: its shards; ``build-ann``: its
approximate index; ``prune``: drop the rows of deleted or changed files).

Exit codes: 0 success; 2 a user mistake (no such index, faiss not installed, bad option).
"""

from __future__ import annotations

import click

from .common import echo_json


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def index() -> None:
    """Maintain an embedding index written by `cavmae embed`: shards, approximate index, stale rows."""


@index.command("build-ann")
@click.argument("index_dir", metavar="INDEX")
@click.option("--kind", type=click.Choice(["ivf", "hnsw"]), default="ivf", show_default=True,
              help="ivf: k-means cells, quick to build; hnsw: a graph, slower to build.")
@click.option("--nlist", type=click.IntRange(1), default=None,
              help="ivf: number of cells. [default: about the square root of the row count]")
@click.option("--nprobe", type=click.IntRange(1), default=None,
              help="ivf: cells scanned per query. [default: nlist/128, at least 8]")
@click.option("--ef-search", type=click.IntRange(1), default=128, show_default=True,
              help="hnsw: candidate list length per query.")
@click.option("--json", "as_json", is_flag=True, help="Print what was built as JSON on stdout.")
def build_ann(index_dir: str, kind: str, nlist: int | None, nprobe: int | None, ef_search: int,
              as_json: bool) -> None:
    """Build the approximate index of INDEX (faiss) for search --ann.

    One faiss index per modality goes into INDEX/ann, replacing one there. It holds 8-bit
    codes of the embeddings and is memory-mapped when searched, so it needs no more RAM than
    the pages a query reads; hits are re-scored with the exact embeddings. When clips are
    added to INDEX later, `search --ann` refuses the outdated one until it is built again.
    Needs faiss: pip install 'cavmae[ann]'.

    \b
    Examples:
      cavmae index build-ann my-index
      cavmae index build-ann my-index --kind hnsw
      cavmae search my-index --audio dog-bark.wav --ann
    """
    from cavmae.runtime.index.ann import AnnParams, build_ann

    meta = build_ann(index_dir, AnnParams(kind=kind, nlist=nlist, nprobe=nprobe,
                                          ef_search=ef_search))
    if as_json:
        echo_json({"index": index_dir, **meta})
        return
    counts = ", ".join(f"{m} {e['count']}" for m, e in meta["modalities"].items())
    p = meta["params"]
    how = (f"nlist {p['nlist']}, nprobe {p['nprobe']}" if kind == "ivf"
           else f"M {p['m']}, efSearch {p['ef_search']}")
    click.echo(f"Built the {kind} approximate index of {index_dir} ({counts} rows; {how})"
               f" in {meta['build_seconds']:.1f} s.")


@index.command("prune")
@click.argument("index_dir", metavar="INDEX")
@click.option("--keep-changed", is_flag=True,
              help="Drop only the rows of deleted files; keep those of files changed since they"
                   " were embedded (by default they are dropped too, so `cavmae embed` redoes them).")
@click.option("--dry-run", is_flag=True, help="Count what would be dropped; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print what was found and done as JSON on stdout.")
def prune(index_dir: str, keep_changed: bool, dry_run: bool, as_json: bool) -> None:
    """Drop the rows of INDEX whose files were deleted or changed, and damaged rows.

    The rows kept are copied into a new index that replaces INDEX in one rename (rows are
    renumbered), so a search sees the old index or the new one, and an interrupted prune leaves
    INDEX as it was. The approximate index (`index build-ann`) is removed with the old rows;
    build it again. Needs free disk for one copy of the rows kept.

    \b
    Examples:
      cavmae index prune my-index --dry-run
      cavmae index prune my-index && cavmae embed clips/ -o my-index   # re-embed changed files
    """
    from cavmae.runtime.index.prune import prune_index

    result = prune_index(index_dir, changed=not keep_changed, dry_run=dry_run, progress=True)
    if as_json:
        echo_json({"index": index_dir, "dry_run": dry_run, **result.to_dict()})
        return
    for path, reason in result.examples:
        click.echo(f"  {reason}: {path}", err=True)
    dropped = sum(result.dropped.values())
    if dropped > len(result.examples):
        click.echo(f"  ... and {dropped - len(result.examples)} more", err=True)
    why = f"{result.dropped['missing']} deleted, {result.dropped['changed']} changed"
    if result.dropped.get("damaged"):
        why += f", {result.dropped['damaged']} damaged"
    if not dropped:
        state = "no file deleted" if keep_changed else "every file there and unchanged"
        click.echo(f"{index_dir}: nothing to drop ({result.kept} rows, {state})")
    elif dry_run:
        click.echo(f"{index_dir}: would drop {dropped} row(s) ({why}) and keep {result.kept}; nothing changed")
    else:
        click.echo(f"{index_dir}: dropped {dropped} row(s) ({why}); {result.kept} kept")
        if result.ann_removed:
            click.echo(f"the approximate index was removed; rebuild it: cavmae index build-ann {index_dir}")


@index.command("merge")
@click.argument("index_dir", metavar="INDEX")
@click.option("--json", "as_json", is_flag=True, help="Print what was merged as JSON on stdout.")
def merge(index_dir: str, as_json: bool) -> None:
    """Merge the finished shards of INDEX into it (= embed --merge).

    \b
    Examples:
      cavmae embed clips/ -o my-index --shard 0/2 &  cavmae embed clips/ -o my-index --shard 1/2
      cavmae index merge my-index
    """
    from .embed_cmd import merge_index

    merge_index(index_dir, as_json)
