"""``cavmae embed`` (build, extend or merge an embedding index) and ``cavmae search``.

The index format and the embedding loop live in :mod:`cavmae.runtime.index`; these commands
parse, call it and print.

Exit codes: 0 success; 1 some inputs could not be embedded (each reported on stderr, the rest
indexed) or an internal error; 2 a user mistake (bad option, missing index, other model ...).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from cavmae.errors import CavmaeError, MissingStreamError

from .common import (
    ENGINE_CHOICES,
    EXIT_INPUT_FAILED,
    echo_json,
    expand_inputs,
    model_options,
    open_pipeline,
    parse_shard,
    progress,
    ray_inputs,
    select_shard,
    warn,
    warn_skipped,
)
from .ray_run import RayEmbed, RaySettings, ray_options


def _model_ref(model: str) -> str:
    """How to find ``model`` again from anywhere: an absolute path, or the registry name."""
    p = Path(model)
    return str(p.resolve()) if p.exists() else model


def _torchrun_device(device: str, shard: str | None) -> str:
    """Under torchrun (``--shard auto``) put each local rank on its own GPU."""
    local = os.environ.get("LOCAL_RANK")
    if shard != "auto" or local is None or not local.isdigit() or device not in ("auto", "cuda"):
        return device
    from cavmae.local_gpu import local_gpu_index
    from cavmae.runtime import hardware

    visible = len(hardware.gpu_names())
    if device == "auto" and not visible:
        return device
    return f"cuda:{local_gpu_index(int(local), visible)}" if visible else "cuda"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("inputs", nargs=-1, metavar="INPUT...")
@click.option("-o", "--output", "index", metavar="INDEX", default=None,
              help="Index directory (created when missing, extended when it exists).")
@model_options()
@click.option("--frame", default=None, metavar="middle|mean|N",
              help="Visual embedding: the middle frame (reference), the mean over frames, or frame N."
                   " [default: the index's choice, else middle]")
@click.option("--shard", default=None, metavar="i/n|auto",
              help="Embed only shard i of n (every n-th file in path order) into INDEX/shard-i-of-n;"
                   " auto takes RANK/WORLD_SIZE from torchrun.")
@click.option("--merge", is_flag=True,
              help="Combine the finished INDEX/shard-*-of-n directories into INDEX and remove them.")
@click.option("--batch", default=8, show_default=True, type=click.IntRange(1),
              help="Clips per model call.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(0),
              help="Decoding threads (0: decode in the main thread).")
@click.option("--commit-every", default=64, show_default=True, type=click.IntRange(1),
              help="Write finished rows to disk every this many clips.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@ray_options
def embed(
    inputs: tuple[str, ...],
    index: str | None,
    model: str | None,
    engine: str,
    device: str,
    mirror: str | None,
    frame: str | None,
    shard: str | None,
    merge: bool,
    batch: int,
    workers: int,
    commit_every: int,
    as_json: bool,
    ray_address: str | None = None,
    ray_actors: int | None = None,
    ray_gpus_per_actor: float = 0.0,
) -> None:
    """Embed videos (files, folders, globs) into an audio-visual embedding index.

    Each clip's first 10 s give an L2-normalized audio embedding and a visual embedding (numpy
    arrays in INDEX, memory-mapped by `cavmae search`). Running again on the same INDEX adds
    only new files; rows are written every --commit-every clips, so an interrupted run loses
    little and resumes. Files that cannot be decoded are reported and skipped (exit code 2 at the end).

    \b
    Examples:
      cavmae embed videos/ -o my-index
      cavmae embed clips/*.mp4 -o my-index --model as-full-51.2 --json
    \b
    Sharded over processes (each writes my-index/shard-i-of-n), then merged:
      cavmae embed videos/ -o my-index --shard 0/2 &
      cavmae embed videos/ -o my-index --shard 1/2 &
      wait; cavmae embed --merge my-index
      torchrun --nproc-per-node 4 --no-python cavmae embed videos/ -o my-index --shard auto
    """
    if merge:
        _merge(index, inputs, as_json)
        return
    if index is None:
        raise click.UsageError("missing -o INDEX (the index directory to write)")
    if not inputs:
        raise click.UsageError("no inputs: give video files, folders or globs")

    i, n = parse_shard(shard)
    root = Path(index)
    main_meta = _existing_meta(root)
    if main_meta is not None:  # an existing index decides what is not given
        model = model or main_meta["model"].get("ref")
        frame = frame if frame is not None else str(main_meta["frame"])
    from cavmae.runtime import index as ix

    frame_choice = ix.parse_frame(frame or "middle")
    listed: list[Path | str] = [*(ray_inputs(inputs) if ray_address is not None else expand_inputs(inputs))]
    paths = select_shard(listed, (i, n), key=ix.path_key)

    pipe = open_pipeline(model, engine, _torchrun_device(device, shard), mirror)
    try:
        run = _EmbedRun(root, (i, n), main_meta, batch, workers, commit_every)
        if ray_address is not None:  # decode and embed on Ray Data (cli/ray_run.py)
            run.ray = RayEmbed(RaySettings(ray_address, ray_actors, ray_gpus_per_actor), model,
                               engine, device)
        summary = run.embed(pipe, paths, model, frame_choice)
    finally:
        pipe.close()
    _report(summary, root, as_json)


def merge_index(index: str, as_json: bool) -> None:
    """Combine the finished shard directories of INDEX and print what was added (``cavmae embed
    --merge INDEX``, also ``cavmae index merge INDEX``)."""
    from cavmae.runtime import index as ix

    result = ix.merge_shards(index)
    if as_json:
        echo_json({"index": index, "shards": result.shards, "added": result.added,
                   "duplicates": result.duplicates, "count": result.count})
    else:
        click.echo(f"Merged {result.shards} shards into {index}: {result.added} rows added"
                   f" ({result.duplicates} duplicates skipped), {result.count} rows in all.")


def _merge(index: str | None, inputs: tuple[str, ...], as_json: bool) -> None:
    """``--merge``: the index is ``-o INDEX`` or the one argument."""
    if index is None and len(inputs) == 1:
        index, inputs = inputs[0], ()
    if index is None or inputs:
        raise click.UsageError("--merge takes only the index: cavmae embed --merge INDEX")
    merge_index(index, as_json)


def _existing_meta(root: Path) -> dict[str, Any] | None:
    """The metadata of the index at ``root``, or None where there is none yet."""
    from cavmae.runtime import index as ix

    if root.exists() and not root.is_dir():
        raise CavmaeError(f"{root} exists and is not a directory; choose another -o")
    if ix.is_index(root):
        return ix.EmbeddingIndex.open(root).meta
    ix.check_new_index_dir(root)  # before the model loads: a folder of the user's files is refused
    return None


@dataclass
class _EmbedRun:
    """Where and how one ``cavmae embed`` run writes: the index, its shard, the existing metadata."""

    root: Path
    shard: tuple[int, int]
    main_meta: dict[str, Any] | None
    batch: int
    workers: int
    commit_every: int
    ray: RayEmbed | None = None

    def embed(self, pipe: Any, paths: list[Path | str], model: str | None,
              frame: str | int) -> dict[str, Any]:
        """Embed the files of ``paths`` not yet in the index; the run's summary (see ``_report``)."""
        from cavmae.runtime import index as ix

        i, n = self.shard
        identity = ix.model_identity(pipe.manifest, _model_ref(model) if model else None)
        if identity["ref"] is None:
            from .common import default_model

            identity["ref"] = default_model()
        if isinstance(frame, int) and not 0 <= frame < pipe.num_frames:
            raise CavmaeError(f"--frame {frame}: this model samples frames 0..{pipe.num_frames - 1}")
        settings = dict(dim=pipe.manifest.model_config.embed_dim, frame=frame,
                        num_frames=pipe.num_frames)
        todo = list(paths)
        if self.main_meta is not None:
            ix.check_compatible(self.main_meta, identity, **settings, where=self.root)
            if n > 1:  # a shard skips what the main index has (looked up, not read whole)
                rows = ix.EmbeddingIndex.open(self.root).rows_of(todo)
                todo = [p for p, r in zip(todo, rows, strict=True) if r < 0]
        target = ix.shard_dir(self.root, self.shard) if n > 1 else self.root
        with ix.IndexWriter(target, model=identity, **settings, shard=self.shard if n > 1 else None,
                            commit_every=self.commit_every) as writer:
            there = writer.contains_many(todo)
            todo = [p for p, t in zip(todo, there, strict=True) if not t]
            failed, added = self._embed_new(pipe, todo, writer)
            count = writer.count
        skipped = sorted(set(paths) - set(todo))
        changed = [str(p) for p in self._changed(skipped, target)]
        return {"index": str(target), "added": added, "skipped": len(skipped), "changed": changed,
                "failed": failed, "count": count, "shard": [i, n] if n > 1 else None,
                "todo": len(todo)}

    def _changed(self, skipped: list[Path | str], target: Path) -> list[Path]:
        """Of the files skipped as already indexed (here, or in the main index of a shard), those
        changed since their rows were embedded."""
        from cavmae.runtime import index as ix

        out: list[Path] = []
        for where in dict.fromkeys([target, self.root]):
            if skipped and ix.is_index(where):
                out += ix.changed_files(ix.EmbeddingIndex.open(where), skipped)
        return sorted(set(out))

    def _embed_new(self, pipe: Any, todo: list[Path | str], writer: Any) -> tuple[list[dict[str, str]], int]:
        """Embed ``todo`` into ``writer`` with progress; (failed files, rows added)."""
        from cavmae.runtime import index as ix

        failed: list[dict[str, str]] = []
        added = 0
        results = (ix.embed_files(pipe, todo, writer, batch=self.batch, workers=self.workers)
                   if self.ray is None else self.ray.results(pipe, todo, writer))
        for r in progress(results, total=len(todo), desc="embed", unit="clip"):
            if r.error is not None:
                warn_skipped(r.path, r.error)
                failed.append({"path": str(r.path), "error": r.error})
            else:
                added += 1
        return failed, added


def _report(summary: dict[str, Any], root: Path, as_json: bool) -> None:
    """Print the summary of an embed run; exit 2 when some inputs failed."""
    todo = summary.pop("todo")
    failed, shard = summary["failed"], summary["shard"]
    if as_json:
        echo_json(summary)
    else:
        what = f"shard {shard[0]}/{shard[1]} " if shard else ""
        click.echo(f"Indexed {summary['added']} new clips into {what}{summary['index']}"
                   f" ({summary['skipped']} already there, {len(failed)} failed);"
                   f" {summary['count']} rows.")
        if shard:
            click.echo(f"When all {shard[1]} shards are done: cavmae embed --merge {root}")
    if summary["changed"]:
        changed = summary["changed"]
        warn(f"{len(changed)} file(s) changed since they were indexed ({changed[0]}"
             f"{', ...' if len(changed) > 1 else ''}): their rows keep the earlier content;"
             f" `cavmae index prune {summary['index']}` drops them, then this command embeds them again")
    if failed:
        click.echo(f"{len(failed)} of {todo} inputs failed (see warnings above).", err=True)
        click.get_current_context().exit(EXIT_INPUT_FAILED)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("index", metavar="INDEX")
@click.option("--audio", "audio_file", metavar="FILE", help="Query with the audio of a media file.")
@click.option("--image", "image_file", metavar="FILE", help="Query with an image.")
@click.option("--video", "video_file", metavar="FILE", help="Query with a video (its audio and/or frames).")
@click.option("-k", "--k", "k", default=10, show_default=True, type=click.IntRange(1), help="Hits per list.")
@click.option("--target", type=click.Choice(["audio", "visual", "both"]), default=None,
              help="Index rows to search: audio, visual or both. [default: the other modality for"
                   " --audio/--image; each stream's own modality for --video]")
@click.option("--modality", type=click.Choice(["audio", "visual", "both"]), default=None,
              help="Which streams of a --video query to use. [default: both]")
@click.option("-m", "--model", default=None, metavar="MODEL",
              help="Model to embed the query with. [default: the one recorded in the index]")
@click.option("--engine", type=click.Choice(ENGINE_CHOICES), default="auto", show_default=True,
              help="Inference engine: TensorRT, ONNX Runtime or PyTorch.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--mirror", envvar="CAVMAE_MIRROR", default=None, metavar="URL",
              help="Base URL replacing the checkpoint hosts (env CAVMAE_MIRROR).")
@click.option("--ann/--exact", "approximate", default=False,
              help="Search the approximate index built by `cavmae index build-ann` (fast on large"
                   " indexes), or every row exactly (the default; use it to compare).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
def search(
    index: str,
    audio_file: str | None,
    image_file: str | None,
    video_file: str | None,
    k: int,
    target: str | None,
    modality: str | None,
    model: str | None,
    engine: str,
    device: str,
    mirror: str | None,
    approximate: bool,
    as_json: bool,
) -> None:
    """Find the clips of INDEX nearest to a sound, an image or a video (cosine similarity).

    By default the search crosses modalities: --audio finds clips that look like the sound
    (visual rows), --image finds clips that sound like the picture (audio rows); --video
    compares its audio with the audio rows and its frame with the visual rows ("clips like
    this one"). --target chooses the rows instead. Rows without that modality are skipped.

    \b
    Examples:
      cavmae search my-index --audio dog-bark.wav
      cavmae search my-index --image beach.jpg --k 5
      cavmae search my-index --video clip.mp4 --target visual --json
      cavmae search my-index --audio dog-bark.wav --ann    # after cavmae index build-ann my-index
    """
    from cavmae.runtime import index as ix

    given = [(kind, f) for kind, f in (("audio", audio_file), ("image", image_file), ("video", video_file)) if f]
    if len(given) != 1:
        raise click.UsageError("give exactly one query: --audio FILE, --image FILE or --video FILE")
    kind, query_file = given[0]
    if modality is not None and kind != "video":
        raise click.UsageError(f"--modality picks the streams of a --video query; an --{kind} query has one")
    modality = modality or "both"
    idx = ix.EmbeddingIndex.open(index)
    if ix.find_shards(index):
        warn(f"{index} has shard directories that are not merged yet (cavmae embed --merge {index})")
    if len(idx) == 0:
        raise CavmaeError(f"{index} is empty; add clips with cavmae embed")
    query_path = Path(query_file)
    if query_path.is_dir():
        raise CavmaeError(f"{query_file} is a folder; give one file to query with")
    if not query_path.is_file():
        raise CavmaeError(f"no such file: {query_file}")
    searcher: Any = idx
    if approximate:  # refused before the model loads when missing or outdated
        from cavmae.runtime.index.ann import ApproximateIndex

        searcher = ApproximateIndex.open(idx)

    pipe = open_pipeline(model or idx.model.get("ref"), engine, device, mirror)
    try:
        identity = ix.model_identity(pipe.manifest)
        ix.check_compatible(idx.meta, identity, dim=pipe.manifest.model_config.embed_dim, where=index)
        queries = _embed_query(pipe, kind, query_path, modality, idx.frame)
    finally:
        pipe.close()

    results = []
    for q, t in _search_runs(queries, kind, target):
        hits = searcher.search(queries[q], t, k)
        results.append({"query": q, "target": t, "hits": [h.to_dict() for h in hits]})

    if as_json:
        echo_json({"index": index, "query": {"kind": kind, "path": str(query_path)}, "k": k,
                   "search": "approximate" if approximate else "exact", "results": results})
        return
    for res in results:
        click.echo(f"{res['query']} -> {res['target']} ({len(res['hits'])} hits):")
        if not res["hits"]:
            click.echo(f"  (no rows with {res['target']} in the index)")
        for h in res["hits"]:
            click.echo(f"  {h['rank']:>3}  {h['score']:+.4f}  {h['path']}")


def _search_runs(queries: dict[str, Any], kind: str, target: str | None) -> list[tuple[str, str]]:
    """The (query modality, target rows) pairs to search, in order.

    Without ``--target`` a --video query compares each stream with its own modality, an --audio
    or --image query crosses to the other one.
    """
    runs: list[tuple[str, str]] = []
    for q in queries:
        if target is None:
            targets: tuple[str, ...] = (q,) if kind == "video" else ("visual" if q == "audio" else "audio",)
        else:
            targets = ("audio", "visual") if target == "both" else (target,)
        runs.extend((q, t) for t in targets)
    return runs


def _embed_query(pipe: Any, kind: str, path: Path, modality: str, frame: str | int) -> dict[str, Any]:
    """The query embedding(s) ``{"audio": [D], "visual": [D]}`` of a query file."""
    import numpy as np

    from cavmae.media import probe

    if kind == "image":
        from cavmae.visual import load_image, preprocess_frame

        image = preprocess_frame(load_image(path), pipe.manifest.preprocess)
        return {"visual": pipe.embed_images(image[None])[0][0]}
    if kind == "audio":
        try:
            clip = pipe.load_clip(path, need_video=False)
        except MissingStreamError as e:  # the decoder's hint knows no flags of this command
            raise e.with_hint("query with its frames instead: --video FILE (or --image for a still)") from None
        return {"audio": pipe.embed_audio(clip.audio[None])[0]}
    info = probe(path)
    need_audio = modality in ("audio", "both") and info.has_audio
    need_video = modality in ("visual", "both") and info.has_video
    if not (need_audio or need_video):
        want = "audio or video" if modality == "both" else ("audio" if modality == "audio" else "video")
        other = "visual" if info.has_video else "audio"
        raise CavmaeError(f"{path} has no {want} stream to query with; use --modality {other} (or both)")
    clip = pipe.load_clip(path, need_audio=need_audio, need_video=need_video)
    out: dict[str, np.ndarray] = {}
    if clip.audio is not None:
        out["audio"] = pipe.embed_audio(clip.audio[None])[0]
    if clip.frames is not None:
        out["visual"] = pipe.embed_frames(clip.frames[None], frame)[0]
    return out
