"""``cavmae index``: maintenance of an embedding index (``build-ann``: its approximate index).

Exit codes: 0 success; 2 a user mistake (no such index, faiss not installed, bad option).
"""

from __future__ import annotations

import click

from .common import echo_json


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def index() -> None:
    """Maintain an embedding index written by `cavmae embed`."""


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
    """Build the approximate (faiss) index of INDEX, used by `cavmae search --ann`.

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
