"""Bulk inference on Ray Data: decode on CPU tasks, the model in a pool of actors.

Every stage takes and returns a :class:`ray.data.Dataset`, so the stages compose with a
user's own Ray pipelines::

    ds = read_media(["videos/", "s3://bucket/clips/"])           # rows: path
    ds = plan_clips(ds, modes=("av", "audio", "visual"), window=10.0, hop=5.0)
    ds = decode_clips(ds, pipe.manifest.preprocess)            # + audio, frames, end, error
    ds = classify_clips(ds, ModelSpec("as-full-51.2"), actors=4)  # path, offset, mode, probs, error

What runs where: listing the inputs runs in the driver; planning (probe, mode, window offsets)
and decoding (PyAV plus the numpy preprocessing of the core, no torch) run as CPU tasks; the
model runs in ``actors`` actors that each load the pipeline once (ONNX Runtime on CPU, or a GPU
engine with ``gpus_per_actor``). A file that cannot be used becomes a row with ``error`` set and
the job goes on; an actor that dies is restarted by Ray and its batch retried.

Nothing here is imported by ``import cavmae.runtime``: ray is an optional extra (``cavmae[ray]``).
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cavmae.errors import CavmaeError
from cavmae.filetypes import (
    MEDIA_SUFFIXES,
    expand_inputs,
    input_key,
    is_media_file,
    is_remote,
)

if TYPE_CHECKING:
    import ray.data

    from cavmae.config import PreprocessConfig

__all__ = [
    "ModelSpec",
    "actor_resources",
    "classify_clips",
    "decode_clips",
    "embed_clips",
    "init_ray",
    "list_inputs",
    "plan_clips",
    "from_paths",
    "read_media",
    "unpack",
]

#: environment the workers need to find the same model cache as the driver
FORWARDED_ENV = ("CAVMAE_HOME", "CAVMAE_MIRROR", "CAVMAE_NO_PROGRESS")


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise CavmaeError("--ray needs Ray Data: pip install 'cavmae[ray]'") from None
    return ray


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> str:
    """Start a new local Ray (``address`` None or ``"local"``, with ``num_cpus`` CPUs or all of
    this machine's), join the running cluster (``"auto"``: ``RAY_ADDRESS`` or the one
    ``ray start`` started here) or connect to one (``"HOST:PORT"``, ``"ray://HOST:10001"``);
    the model cache settings travel to the workers. Returns what it did, in words ("started a
    new local Ray on this machine (2 CPUs)").

    A local Ray is always a new one: ``RAY_ADDRESS`` or a cluster started with ``ray start``
    on this machine are joined only when asked for (``"auto"``).
    """
    ray = _ray()
    if ray.is_initialized():
        return f"using the Ray this process already joined ({_describe(ray.cluster_resources())})"
    local = address in (None, "local")
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                              "runtime_env": {"env_vars": env}}
    if local:
        ray.init(address="local", num_cpus=num_cpus, **kwargs)
        what = "started a new local Ray on this machine"
    else:
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, ValueError) as e:  # nothing there, or not an address
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CavmaeError(f"--ray {address}: no Ray cluster there ({first}); start one with"
                              " `ray start --head`, or give --ray alone for a local one") from None
        what = ("joined the running Ray cluster" if address == "auto"
                else f"connected to the Ray cluster at {address}")
    return f"{what} ({_describe(ray.cluster_resources())})"


def _describe(resources: dict[str, float]) -> str:
    """``"2 CPUs"``, ``"64 CPUs, 8 GPUs"``: what a cluster offers."""
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    return f"{cpus:g} CPUs" + (f", {gpus:g} GPUs" if gpus else "")


# -- reading ----------------------------------------------------------------------------------
def _list_remote(uri: str, suffixes: tuple[str, ...]) -> list[str]:
    """A remote file as is, or the media files under a remote folder (pyarrow file systems)."""
    from pyarrow import fs

    try:
        filesystem, root = fs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(root)
    except Exception as e:  # pyarrow raises plain ArrowInvalid / OSError for both cases
        raise CavmaeError(f"cannot read {uri}: {e}") from None
    scheme = uri.split("://", 1)[0]
    if info.type == fs.FileType.File:
        return [uri]
    if info.type != fs.FileType.Directory:
        raise CavmaeError(f"no such file or folder: {uri}")
    found = filesystem.get_file_info(fs.FileSelector(root, recursive=True))
    files = sorted(f"{scheme}://{f.path}" for f in found
                   if f.type == fs.FileType.File and is_media_file(f.base_name, suffixes))
    if not files:
        raise CavmaeError(f"no media files in folder {uri}")
    return files


def list_inputs(inputs: Iterable[str], suffixes: tuple[str, ...] = MEDIA_SUFFIXES) -> list[str]:
    """The files named by ``inputs``: files, folders (searched recursively for media), globs,
    text files of paths (``.txt``/``.lst``, one a line) and ``s3://``/``gs://`` files or folders.

    A name that matches nothing is an error; duplicates are dropped (first kept).
    """
    return expand_inputs(inputs, suffixes, path_lists=True,
                         list_remote=lambda uri: _list_remote(uri, suffixes))


def read_media(inputs: Iterable[str] | Sequence[str]) -> ray.data.Dataset:
    """A dataset of one row ``{"path"}`` per file named by ``inputs`` (see :func:`list_inputs`)."""
    return from_paths(list_inputs(inputs))


def from_paths(paths: Sequence[str]) -> ray.data.Dataset:
    """A dataset of one row ``{"path"}`` per path, as listed already (:func:`list_inputs`): a
    path that is missing becomes that file's error row downstream, not the job's failure."""
    ray = _ray()
    return ray.data.from_items([{"path": p} for p in paths])


# -- planning and decoding (CPU tasks) -----------------------------------------------------------
class _Local:
    """A local path for a (possibly remote) file: remote files are copied to a temporary file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._tmp: str | None = None

    def __enter__(self) -> str:
        if not is_remote(self.path):
            return self.path
        from pyarrow import fs

        filesystem, name = fs.FileSystem.from_uri(self.path)
        fd, self._tmp = tempfile.mkstemp(suffix=Path(name).suffix)
        with os.fdopen(fd, "wb") as out, filesystem.open_input_stream(name) as src:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        return self._tmp

    def __exit__(self, *exc: Any) -> None:
        if self._tmp is not None:
            os.unlink(self._tmp)


def _reason(path: str, error: BaseException) -> str:
    """One line saying why ``path`` failed (media errors name the file already)."""
    from cavmae.errors import MediaError

    if isinstance(error, MediaError):
        return str(error)
    first = str(error).splitlines()[0] if str(error) else ""
    return f"{path}: {type(error).__name__}: {first}"


@dataclass(frozen=True)
class _Planner:
    """Row ``{"path"}`` -> one row per clip or window: path, offset, duration, mode, error."""

    modes: tuple[str, ...]  # the model's supported modes, best first
    mode: str  # a mode, or "auto" (per file, from its streams), or "embed" (every stream it has)
    window: float | None
    hop: float | None
    offset: float
    done: frozenset[tuple[str, str, float]] = field(default_factory=frozenset)

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        from cavmae.media import probe, window_offsets
        from cavmae.modes import AUTO, best_mode

        path = str(row["path"])
        base = {"path": path, "offset": self.offset, "duration": math.nan, "mode": self.mode,
                "error": ""}
        try:
            with _Local(path) as local:
                info = probe(local)
            mode = self.mode
            if mode == "embed":
                if not (info.has_audio or info.has_video):
                    raise CavmaeError(f"{path}: no audio or video stream")
                mode = "av" if info.has_audio and info.has_video else "audio" if info.has_audio else "visual"
            elif mode == AUTO:
                chosen = best_mode(self.modes, info.has_audio, info.has_video)
                if chosen is None:
                    raise CavmaeError(f"{path}: no stream this model classifies with"
                                      f" ({'/'.join(self.modes)})")
                mode = chosen
            offsets = [self.offset]
            if self.window is not None:
                offsets = window_offsets(info.duration, self.window, self.hop or self.window / 2)
        except Exception as e:  # every failure of one file is that file's row
            return [{**base, "error": _reason(path, e)}]
        span = math.nan if self.window is None else self.window
        key = _done_key(path)
        return [{"path": path, "offset": float(s), "duration": span, "mode": mode, "error": ""}
                for s in offsets if (key, mode, round(float(s), 6)) not in self.done]


def _done_key(path: str) -> str:
    return input_key(path)


def plan_clips(
    ds: ray.data.Dataset,
    *,
    modes: Sequence[str],
    mode: str = "auto",
    window: float | None = None,
    hop: float | None = None,
    offset: float = 0.0,
    done: Iterable[tuple[str, str, float]] = (),
) -> ray.data.Dataset:
    """Rows ``{"path"}`` -> one row per clip (or per window with ``window``/``hop``):
    ``path, offset, duration`` (NaN: the model's span), ``mode``, ``error``.

    ``modes`` are those the model supports, best first; ``mode`` a mode, ``"auto"`` (the best
    one each file's streams allow) or ``"embed"`` (every stream the file has). ``done`` holds
    ``(resolved path, mode, offset)`` keys already written by an earlier run: skipped.
    """
    planner = _Planner(tuple(modes), mode, window, hop, offset, frozenset(done))
    return ds.flat_map(planner, num_cpus=1)


@dataclass(frozen=True)
class _Decoder:
    preprocess: PreprocessConfig

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        from cavmae.media import load_clip
        from cavmae.modes import needs

        out = {**row, "audio": b"", "frames": b"", "end": math.nan, "clip_duration": math.nan}
        if row["error"]:
            return out
        need_audio, need_video = needs(str(row["mode"]))
        duration = None if math.isnan(row["duration"]) else float(row["duration"])
        try:
            with _Local(str(row["path"])) as local:
                clip = load_clip(local, offset=float(row["offset"]), config=self.preprocess,
                                 need_audio=need_audio, need_video=need_video, duration=duration)
        except Exception as e:
            return {**out, "error": _reason(str(row["path"]), e)}
        span = self.preprocess.clip_seconds if duration is None else duration
        return {**out, "audio": _pack(clip.audio), "frames": _pack(clip.frames),
                "end": float(min(float(row["offset"]) + span, clip.duration)),
                "clip_duration": float(clip.duration)}


def decode_clips(ds: ray.data.Dataset, preprocess: PreprocessConfig, *, num_cpus: float = 1.0
                 ) -> ray.data.Dataset:
    """Planned rows -> the same rows plus ``audio [T, F]``, ``frames [F, 3, H, W]`` (``.npy``
    bytes, see :func:`unpack`; b"" where the mode reads no such stream), ``end`` and
    ``clip_duration``; a failure sets ``error``.

    ``preprocess`` is the model's (``pipe.manifest.preprocess``): sizes and frames per clip.
    One full CPU per task keeps decode from being fused into the model actors.
    """
    return ds.map(_Decoder(preprocess), num_cpus=num_cpus)


# -- the model (actors) ---------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """How each actor opens the pipeline (:func:`cavmae.runtime.load` arguments)."""

    model: str
    engine: str = "ort"
    device: str = "cpu"
    num_frames: int = 10
    labels: str | None = None
    frame: str | int = "middle"  # the visual embedding's frame choice (embed only)
    precision: str | None = None  # load()'s: None is fp32, or an export directory's own

    def open(self) -> Any:
        from cavmae.runtime import load

        return load(self.model, engine=self.engine, device=self.device, num_frames=self.num_frames,
                    labels=self.labels, precision=self.precision)


def _pack(x: np.ndarray | None) -> bytes:
    """An array as ``.npy`` bytes (b"" for None): Arrow cannot mix null rows into a tensor column."""
    if x is None:
        return b""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(x, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def unpack(data: Any) -> np.ndarray | None:
    """The array of :func:`_pack`'s bytes (None for b"")."""
    if data is None or len(data) == 0:
        return None
    return np.load(io.BytesIO(bytes(data)), allow_pickle=False)


def _nan(n: int) -> np.ndarray:
    return np.full(n, np.nan, dtype=np.float32)


class _ModelActor:
    """Loads the pipeline once per actor; ``__call__`` maps one batch (numpy dict) of rows."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.pipe = spec.open()
        self.classes = int(self.pipe.manifest.model_config.num_classes or 0)
        self.dim = int(self.pipe.manifest.model_config.embed_dim)

    def _keep(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return {k: list(batch[k]) for k in ("path", "offset", "end", "mode", "error")
                if k in batch}


class ClassifyActor(_ModelActor):
    """Rows with audio/frames -> ``path, offset, end, mode, probs [C] (NaN on error), error``."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        out = self._keep(batch)
        probs: list[Any] = []
        for i in range(len(batch["path"])):
            if batch["error"][i]:
                probs.append(_nan(self.classes))
                continue
            audio, frames = unpack(batch["audio"][i]), unpack(batch["frames"][i])
            # one clip per call, as the single-process path: the same numbers to the last bit
            p = self.pipe.classify(audio, frames, str(batch["mode"][i]))
            probs.append(np.asarray(p, dtype=np.float32))
        out["probs"] = probs
        return out


class EmbedActor(_ModelActor):
    """Rows with audio/frames -> ``path, offset, end, mode, audio_embedding, visual_embedding,
    clip_duration, error`` (an embedding is NaN where the file has no such stream)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        out = self._keep(batch)
        ea: list[Any] = []
        ev: list[Any] = []
        for i in range(len(batch["path"])):
            audio, frames = unpack(batch["audio"][i]), unpack(batch["frames"][i])
            ok = not batch["error"][i]
            ea.append(self.pipe.embed_audio(audio[None])[0] if ok and audio is not None
                      else _nan(self.dim))
            ev.append(self.pipe.embed_frames(frames[None], self.spec.frame)[0]
                      if ok and frames is not None else _nan(self.dim))
        out["audio_embedding"], out["visual_embedding"] = ea, ev
        out["clip_duration"] = list(batch["clip_duration"])
        return out


def actor_resources(actors: int | None, gpus_per_actor: float, cluster: dict[str, float]
                    ) -> tuple[int, float]:
    """``(actors, CPUs reserved per actor)`` for a cluster of ``cluster`` resources.

    Actors default to one per GPU (``gpus_per_actor`` > 0) or one per two CPUs. Together they
    reserve at most half the CPUs: a full CPU per actor on a 2-CPU node leaves none for the
    read and decode tasks, and the job never finishes. The reservation is bookkeeping for
    Ray's scheduler; ONNX Runtime still uses the threads it finds.

    Raises ``CavmaeError`` for a pool the cluster cannot hold (Ray would wait for it forever):
    GPUs it lacks, or more actors than CPUs (each actor loads the model).
    """
    cpus, gpus = float(cluster.get("CPU", 1.0)), float(cluster.get("GPU", 0.0))
    if gpus_per_actor > 0 and gpus < gpus_per_actor:
        raise CavmaeError(f"--ray-gpus-per-actor {gpus_per_actor:g}: the Ray cluster has {gpus:g} GPUs;"
                          " leave it at 0 to run the model on CPUs")
    if actors is None:
        actors = max(1, int(gpus / gpus_per_actor)) if gpus_per_actor > 0 else max(1, int(cpus // 2))
    if gpus_per_actor > 0 and actors * gpus_per_actor > gpus:
        raise CavmaeError(f"{actors} actors x {gpus_per_actor:g} GPU need {actors * gpus_per_actor:g} GPUs;"
                          f" the Ray cluster has {gpus:g}: lower --ray-actors or --ray-gpus-per-actor")
    if actors > max(1, int(cpus)):
        raise CavmaeError(f"--ray-actors {actors}: the Ray cluster has {cpus:g} CPUs and each actor loads"
                          f" the model; use at most {max(1, int(cpus))}")
    per_actor = min(1.0, cpus / 2 / actors)
    return actors, round(per_actor, 3)


def _run_model(ds: ray.data.Dataset, actor: type, spec: ModelSpec, actors: int | None,
               gpus_per_actor: float, batch_size: int) -> ray.data.Dataset:
    """A fixed pool of ``actor`` over ``ds``. Ray Data's actor pools restart a dead actor and
    retry the batch it held by default (its pool sets ``max_restarts`` and ``max_task_retries``
    on the actors it makes), so nothing is passed for that: the extra ``**ray_remote_args`` of
    ``map_batches`` are deprecated."""
    ray = _ray()
    count, cpus = actor_resources(actors, gpus_per_actor, ray.cluster_resources())
    return ds.map_batches(
        actor, fn_constructor_args=(spec,), batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=count), num_cpus=cpus,
        num_gpus=gpus_per_actor or None,
    )


def classify_clips(ds: ray.data.Dataset, spec: ModelSpec, *, actors: int | None = None,
                   gpus_per_actor: float = 0.0, batch_size: int = 4,
                   actor: type = ClassifyActor) -> ray.data.Dataset:
    """Decoded rows -> ``path, offset, end, mode, probs, error`` through a pool of model actors."""
    return _run_model(ds, actor, spec, actors, gpus_per_actor, batch_size)


def embed_clips(ds: ray.data.Dataset, spec: ModelSpec, *, actors: int | None = None,
                gpus_per_actor: float = 0.0, batch_size: int = 4,
                actor: type = EmbedActor) -> ray.data.Dataset:
    """Decoded rows -> ``path, audio_embedding, visual_embedding, clip_duration, error``."""
    return _run_model(ds, actor, spec, actors, gpus_per_actor, batch_size)
