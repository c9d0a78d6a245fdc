"""Latency benchmark: the reference-style PyTorch loop and each engine, side by side, one process.

The baseline is what the reference evaluation does: an eager fp32 PyTorch model, the whole
forward once per frame (10 frames, same audio), probabilities averaged. Every engine runs the
runtime pipeline (audio once per clip, frames as one batch) on the same preprocessed clips.
Ratios are only meaningful within one run: they are computed here, never across runs.

torch is needed for the baseline and the torch engine only; it is imported lazily.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cavmae.config import BASE, DEFAULT_PREPROCESS, ModelConfig
from cavmae.errors import CavmaeError
from cavmae.graphs import JOINT_CLASSIFIER

from . import hardware

if TYPE_CHECKING:
    from .loader import ModelSource

#: a baseline estimated (after its first run) to take longer than this many seconds in all is
#: announced, with the options that shorten it
LONG_BASELINE_S = 60.0


# -- measurement helpers ----------------------------------------------------------------------
@dataclass
class Timing:
    """Wall-clock samples of one measured operation (seconds)."""

    name: str
    batch: int
    samples: list[float] = field(default_factory=list)
    gflop: float | None = None  # work per call, when known
    peak_rss_mb: float | None = None
    peak_gpu_mb: float | None = None

    def pct(self, q: float) -> float:
        return float(np.percentile(self.samples, q)) if self.samples else float("nan")

    @property
    def p50(self) -> float:
        return self.pct(50)

    @property
    def clips_per_s(self) -> float:
        return self.batch / self.p50 if self.samples else float("nan")

    @property
    def gflops(self) -> float | None:
        return self.gflop / self.p50 if self.gflop and self.samples else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(p50=self.p50, p90=self.pct(90), p99=self.pct(99), mean=statistics.fmean(self.samples),
                 n=len(self.samples), clips_per_s=self.clips_per_s, achieved_gflops=self.gflops)
        return d


def measure(
    fn: Callable[[], Any],
    warmup: int,
    repeat: int,
    sync: Callable[[], None] | None = None,
    step: Callable[[], None] | None = None,
) -> list[float]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeat`` times timed; returns seconds.
    ``step`` is called after each run (warm-up ones included), outside the timed span."""
    for _ in range(warmup):
        fn()
        if sync:
            sync()
        if step:
            step()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        out.append(time.perf_counter() - t0)
        if step:
            step()
    return out


def shown_measure(
    fn: Callable[[], Any],
    warmup: int,
    repeat: int,
    desc: str,
    *,
    progress: bool = False,
    sync: Callable[[], None] | None = None,
    after_first: Callable[[float], None] | None = None,
) -> list[float]:
    """:func:`measure` with its runs shown through :mod:`cavmae.progress`: a bar on a terminal,
    else lines such as ``bench: baseline, batch 8: 2/6 runs, timed 1/5, 2 min 01 s, ~4 min 02 s
    left`` (the first and last run always, in between at most one every
    ``CAVMAE_PROGRESS_INTERVAL`` seconds). ``after_first(seconds)``: called once the first run
    (warm-up or timed) is done, with the bar cleared (an estimate of the whole run goes there)."""
    from cavmae.progress import bar_paused, progress_bar

    started = time.perf_counter()
    done = 0
    with progress_bar(total=warmup + repeat, desc=desc, unit="run", leave=False, enabled=progress) as bar:

        def step() -> None:
            nonlocal done
            done += 1
            bar.set_postfix_str("warm-up" if done <= warmup else f"timed {done - warmup}/{repeat}", refresh=False)
            bar.update(1)
            if done == 1 and after_first is not None:
                with bar_paused():
                    after_first(time.perf_counter() - started)

        return measure(fn, warmup, repeat, sync, step)


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark for this process (Linux); no-op elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# -- work counts --------------------------------------------------------------------------------
def block_gflop(tokens: int, dim: int, mlp_ratio: float) -> float:
    """One transformer block on ``tokens``: qkv, scores, weighted sum, projection, MLP."""
    n, d = tokens, dim
    return (2 * n * d * d * (3 + 1 + 2 * mlp_ratio) + 4 * n * n * d) / 1e9


def stage_gflop(cfg: ModelConfig, num_frames: int) -> dict[str, float]:
    """GFLOP of one clip's stages (docs/model.md §11: audio 88.6, visual 31.8, joint 11.6 per
    forward), and of the joint classifier graph, which does its first block's audio-only work
    once per clip rather than once per frame (``Block.forward_shared_prefix``)."""
    d, r, p, f = cfg.embed_dim, cfg.mlp_ratio, cfg.patch_size, num_frames
    la, lv = cfg.num_audio_tokens, cfg.num_visual_tokens
    audio = cfg.depth_modality * block_gflop(la, d, r) + 2 * la * p * p * d / 1e9
    visual = cfg.depth_modality * block_gflop(lv, d, r) + 2 * lv * p * p * 3 * d / 1e9
    joint = cfg.depth_joint * block_gflop(la + lv, d, r)
    joint_graph = f * joint
    if cfg.depth_joint:
        shared_first = (2 * (la + f * lv) * d * 3 * d  # qkv: audio tokens once
                        + 4 * la * la * d  # audio queries on audio keys: once
                        + 4 * f * (la * lv + lv * (la + lv)) * d  # the scores that involve a frame
                        + 2 * f * (la + lv) * d * d * (1 + 2 * r)) / 1e9  # projection and MLP
        joint_graph = (f * (cfg.depth_joint - 1) * block_gflop(la + lv, d, r)) + shared_first
    return {
        "audio_encoder": audio,
        "visual_encoder_per_frame": visual,
        "joint_per_frame": joint,
        "joint_graph_per_clip": joint_graph,
        "pipeline_per_clip": audio + f * visual + joint_graph,
        "baseline_per_clip": f * (audio + visual + joint),
    }


def matmul_gflops(threads: int | None = None, size: int = 2048, repeat: int = 10) -> dict[str, float]:
    """Achieved GFLOP/s of a large fp32 matrix product (this machine's practical ceiling)."""
    out: dict[str, float] = {}
    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    times = measure(lambda: a @ a, 2, repeat)
    out["numpy"] = 2 * size**3 / statistics.median(times) / 1e9
    try:
        import torch

        t = torch.from_numpy(a)
        times = measure(lambda: t @ t, 2, repeat)
        out["torch"] = 2 * size**3 / statistics.median(times) / 1e9
    except ImportError:
        pass
    return out


def load_average() -> list[str]:
    """The 1, 5 and 15 minute load averages, as ``/proc/loadavg`` shows them (a benchmark
    records them before and after its runs, so a reader can tell an idle machine)."""
    return [f"{x:.2f}" for x in os.getloadavg()]


def write_result(result: dict[str, Any], output: Path | None) -> None:
    """Add the load average after the runs to ``result`` and write it as JSON to ``output``,
    or print it when ``output`` is None."""
    result["load_after"] = load_average()
    text = json.dumps(result, indent=2, default=str) + "\n"
    if output:
        output.write_text(text)
    else:
        print(text)


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "physical_cores": hardware.physical_cores(),
        "gpus": list(hardware.gpu_names()),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    import onnxruntime

    info["onnxruntime"] = onnxruntime.__version__
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


# -- the benchmark ------------------------------------------------------------------------------
@dataclass
class BenchConfig:
    model: str | Path | None = None  # None: full-size random weights (latency does not depend on them)
    engines: tuple[str, ...] = ("ort",)
    device: str = "auto"  # per engine, as check_engine resolves it; the baseline follows
    batches: tuple[int, ...] = (1, 8)
    num_frames: int = 10
    clip: str | Path | None = None  # None: random preprocessed inputs
    warmup: int = 1
    repeat: int = 5
    baseline: bool = True
    baseline_repeat: int | None = None  # the slow loop; default: repeat
    stages: bool = True
    #: autocast precisions of the torch engine; each one is a run of its own beside the others
    torch_precisions: tuple[str, ...] = ("fp32",)
    precision: str = "fp32"  # "int8": the ort engine also runs the int8 export, beside fp32
    work_dir: str | Path | None = None
    threads: int | None = None


def _random_checkpoint(work: Path, config: ModelConfig = BASE, log: Callable[[str], None] | None = None) -> Path:
    """A full-size classifier checkpoint with random weights, written once into ``work``."""
    import torch

    from cavmae.checkpoint import save_checkpoint
    from cavmae.model import CAVMAEFT

    path = work / "random-classifier-base.pth"
    if not path.exists():
        if log is not None:
            log(f"writing a classifier with random weights to {path} (kept for later runs)")
        torch.manual_seed(0)
        save_checkpoint(CAVMAEFT(config), path)
    return path


def _inputs(cfg: BenchConfig, batch: int, clip_arrays: tuple[np.ndarray, np.ndarray] | None):
    if clip_arrays is not None:
        audio, frames = clip_arrays
        return np.repeat(audio[None], batch, 0), np.repeat(frames[None], batch, 0)
    rng = np.random.default_rng(0)
    p = DEFAULT_PREPROCESS
    audio = rng.standard_normal((batch, p.target_length, p.num_mel_bins), dtype=np.float32)
    frames = rng.standard_normal((batch, cfg.num_frames, 3, p.image_size, p.image_size), dtype=np.float32)
    return audio, frames


def _cache_bytes() -> int:
    """What the cache ($CAVMAE_HOME) holds now, each hard-linked file once (``cavmae cache``)."""
    from cavmae.hub.inventory import list_cache

    return sum(e.size for e in list_cache())


def run_benchmark(
    cfg: BenchConfig, log: Callable[[str], None] = lambda s: None, *, progress: bool = False
) -> dict[str, Any]:
    """Run the benchmark; returns a JSON-able dict with machine, timings and ratios.

    Every engine and the device are checked first, so a missing TensorRT or GPU is reported
    before minutes of baseline runs. ``progress``: show each measurement's runs on stderr
    (:func:`shown_measure`). ``result["cache"]["added_bytes"]``: what the run added to the
    cache (a checkpoint's export, about 1.2 GB at full size; :func:`cache_note` says so).
    """
    from cavmae.hub.cache import cavmae_home

    from .engines import check_engine

    devices = {engine: check_engine(engine, cfg.device)[1] for engine in cfg.engines}
    if "fp16" in cfg.torch_precisions and not devices.get("torch", "cuda").startswith("cuda"):
        raise CavmaeError("--torch-precision fp16 needs --device cuda (bf16 also runs on the CPU)")
    # The baseline runs where the engines do: on the GPU when any of them does.
    gpu = next((d for d in devices.values() if d.startswith("cuda")), None)
    base_device = check_engine("torch", gpu or "cpu")[1] if cfg.baseline else None
    cache_before = _cache_bytes()
    work = Path(cfg.work_dir or Path(os.environ.get("TMPDIR", "/tmp")) / "cavmae-bench")
    work.mkdir(parents=True, exist_ok=True)
    model_ref = cfg.model if cfg.model is not None else _random_checkpoint(work, log=log)
    source = _check_model(cfg, model_ref)  # before the baseline: it takes minutes at full size
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine_info(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "devices": {**devices, **({"baseline": base_device} if base_device else {})},
        "timings": [],
        "ratios": {},
    }
    clip_arrays = None
    if cfg.clip is not None:
        clip_arrays = _stage_timings(cfg, cfg.clip, result, log, progress)
    timings: dict[tuple[str, int], Timing] = {}

    if cfg.baseline:
        log("baseline: eager fp32 PyTorch, full forward once per frame")
        base = _baseline(cfg, source, clip_arrays, log, base_device or "cpu", progress)
        timings.update(base)
    for engine, precision, name in _engine_runs(cfg):
        timings.update(_engine_timings(cfg, model_ref, (engine, precision, name), devices[engine], clip_arrays,
                                       result, log, progress))
    result["timings"] += [t.to_dict() for t in timings.values()]
    for (engine, b), t in timings.items():
        ref = timings.get(("baseline", b))
        if engine != "baseline" and ref is not None:
            result["ratios"][f"{engine}/batch{b}"] = ref.p50 / t.p50
    result["matmul_gflops"] = matmul_gflops()
    result["cache"] = {"home": str(cavmae_home()), "added_bytes": max(0, _cache_bytes() - cache_before),
                       "random_checkpoint": None if cfg.model is not None else str(model_ref)}
    return result


def cache_note(result: dict[str, Any]) -> str | None:
    """One line on what a run left in the cache (``cavmae bench``'s last), or None when nothing."""
    from cavmae.hub.inventory import format_size

    cache = result.get("cache") or {}
    added = cache.get("added_bytes") or 0
    if not added:
        return None
    what = "the export of the random-weight model" if cache.get("random_checkpoint") else "the model's export"
    return (f"bench: this run added {format_size(added)} to the cache {cache['home']} ({what}); `cavmae cache`"
            " lists it, `cavmae cache prune --older-than AGE` or `cavmae cache clear` removes it")


def _engine_timings(
    cfg: BenchConfig,
    model_ref: str | Path,
    run: tuple[str, str, str],
    device: str,
    clip_arrays: tuple[np.ndarray, np.ndarray] | None,
    result: dict[str, Any],
    log: Callable[[str], None],
    progress: bool,
) -> dict[tuple[str, int], Timing]:
    """One engine run (``(engine, precision, name)`` of :func:`_engine_runs`) at every batch:
    the pipeline's classify timing per batch, and its per-graph timings into ``result``."""
    from .loader import load

    engine, precision, name = run
    opts: dict[str, Any] = {"threads": cfg.threads} if engine == "ort" and cfg.threads else {}
    pipe = load(model_ref, engine=engine, device=device, num_frames=cfg.num_frames,
                max_batch=max(cfg.batches), precision=precision, progress=progress, **opts)
    gf = stage_gflop(pipe.manifest.model_config, cfg.num_frames)
    log(f"{name} ({pipe.describe()}): classify, batch {', '.join(map(str, cfg.batches))}")
    result.setdefault("engines", {})[name] = pipe.describe()  # provider and thread count
    out: dict[tuple[str, int], Timing] = {}
    try:
        for b in cfg.batches:
            audio, frames = _inputs(cfg, b, clip_arrays)
            reset_peak_rss()
            t = Timing(f"{name} classify", b, gflop=gf["pipeline_per_clip"] * b)
            t.samples = shown_measure(functools.partial(pipe.classify_batch, audio, frames), cfg.warmup,
                                      cfg.repeat, f"bench: {engine} {precision} classify, batch {b}",
                                      progress=progress)
            t.peak_rss_mb = peak_rss_mb()
            out[(name, b)] = t
            if cfg.stages:
                _graph_timings(cfg, pipe, (name, f"{engine} {precision}"), b, audio, frames, gf, result, progress)
    finally:
        pipe.close()
    return out


def _engine_runs(cfg: BenchConfig) -> list[tuple[str, str, str]]:
    """(engine, precision, name in the results) of each measured pipeline: ``--precision int8``
    runs the ort engine twice, fp32 and int8, so both sit beside the baseline of the same run."""
    runs = []
    for engine in cfg.engines:
        for precision in cfg.torch_precisions if engine == "torch" else ("fp32",):
            runs.append((engine, precision, engine if precision == "fp32" else f"{engine}-{precision}"))
        if engine == "ort" and cfg.precision == "int8":
            runs.append((engine, "int8", "ort-int8"))
    return runs


def _check_model(cfg: BenchConfig, model_ref: str | Path) -> ModelSource:
    """The benchmarked model's ``ModelSource``, refused now when no run can use it: a
    pre-training model (the benchmark classifies), or an export directory whose precision or
    frame count is not one a run asks for (an export runs as it was written). The loader's
    own checks, so the messages are those ``load`` gives."""
    from cavmae.manifest import Manifest

    from .loader import check_export_frames, check_export_precision, resolve_model

    source = resolve_model(model_ref, task="bench")
    if source.kind == "export":
        manifest = Manifest.load(source.path)
        check_export_frames(source.path, manifest, cfg.num_frames)
        for engine, precision, _name in _engine_runs(cfg):
            if engine != "torch":  # the torch engine runs the export's checkpoint instead
                check_export_precision(source.path, manifest, precision)
    return source


def _baseline(cfg: BenchConfig, source: ModelSource, clip_arrays, log, device: str,
              progress: bool = False) -> dict[tuple[str, int], Timing]:
    import torch

    from .loader import resolve_model

    if source.kind != "checkpoint":
        path = (source.path / "manifest.json").read_text()
        ckpt = json.loads(path).get("source", {}).get("checkpoint")
        if not ckpt or not Path(ckpt).is_file():
            log("baseline skipped: the export's checkpoint is not available")
            return {}
        source = resolve_model(ckpt)
    model = source.load_model()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = model.to(device).eval()
    on_gpu = device.startswith("cuda")
    gpu = torch.device(device) if on_gpu else None  # else the CUDA calls below use the current device
    sync = (lambda: torch.cuda.synchronize(gpu)) if on_gpu else None
    gf = stage_gflop(model.config, cfg.num_frames)
    repeat = cfg.baseline_repeat or cfg.repeat
    out = {}
    for b in cfg.batches:
        audio, frames = _inputs(cfg, b, clip_arrays)
        a = torch.from_numpy(audio).to(device)
        f = torch.from_numpy(frames).to(device)

        def loop(model: Any = model, a: Any = a, f: Any = f) -> Any:
            with torch.inference_mode():
                probs = [torch.sigmoid(model(a, f[:, i])) for i in range(cfg.num_frames)]
                return torch.stack(probs).mean(0).cpu()

        reset_peak_rss()
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(gpu)
        t = Timing("baseline (reference loop)", b, gflop=gf["baseline_per_clip"] * b)
        first = b == cfg.batches[0]
        t.samples = shown_measure(loop, cfg.warmup, repeat, f"bench: baseline fp32, batch {b}", progress=progress,
                                  sync=sync, after_first=_baseline_estimate(cfg, b, log) if first else None)
        t.peak_rss_mb = peak_rss_mb()
        if on_gpu:
            t.peak_gpu_mb = torch.cuda.max_memory_allocated(gpu) / 2**20
        log(f"baseline batch {b}: p50 {t.p50:.3f} s")
        out[("baseline", b)] = t
    return out


def _baseline_estimate(cfg: BenchConfig, batch: int, log: Callable[[str], None]) -> Callable[[float], None]:
    """Given the seconds of the baseline's first run (at ``batch``), say how long the whole
    baseline will take when that is long, and which options shorten it."""
    runs = cfg.warmup + (cfg.baseline_repeat or cfg.repeat)

    def announce(seconds: float) -> None:
        total = seconds / batch * runs * sum(cfg.batches)  # its time grows with the clips
        if total < LONG_BASELINE_S:
            return
        about = f"{total / 60:.0f} min" if total >= 90 else f"{total:.0f} s"
        batches = ", ".join(map(str, cfg.batches))
        log(f"baseline: about {about} in all ({runs} runs at batch {batches}, {seconds:.0f} s for the first);"
            " --baseline-repeat 1, --batch 1 or --no-baseline shortens it")

    return announce


def _graph_timings(cfg, pipe, names: tuple[str, str], b, audio, frames, gf, result, progress: bool = False) -> None:
    """Per-graph timings of one engine at batch ``b`` (audio once per clip, frames batched);
    ``names``: the run's name in the results and as its progress shows it."""
    engine, shown = names
    n, f = frames.shape[:2]
    flat = frames.reshape(n * f, *frames.shape[2:])
    a_tok = pipe.run_audio_encoder(audio)
    v_tok = pipe.run_visual_encoder(flat, f).reshape(n, f, -1, a_tok.shape[-1])
    runs = {
        "audio graph": (lambda: pipe.run_audio_encoder(audio), gf["audio_encoder"] * b),
        "visual graph": (lambda: pipe.run_visual_encoder(flat, f), gf["visual_encoder_per_frame"] * b * f),
        "joint graph": (lambda: pipe.run_graph(JOINT_CLASSIFIER, a_tok, v_tok, chunk=1),
                        gf["joint_graph_per_clip"] * b),
    }
    for name, (fn, gflop) in runs.items():
        t = Timing(f"{engine} {name}", b, gflop=gflop)
        t.samples = shown_measure(fn, cfg.warmup, cfg.repeat, f"bench: {shown} {name}, batch {b}", progress=progress)
        result["timings"].append(t.to_dict())


def _stage_timings(
    cfg: BenchConfig, clip: str | Path, result: dict[str, Any], log, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Decode, fbank and frame preprocessing of ``clip``; returns its arrays."""
    from cavmae.audio import prepare_audio
    from cavmae.media import decode_audio, decode_frames
    from cavmae.visual import preprocess_frames

    p = DEFAULT_PREPROCESS
    log(f"preprocessing stages on {clip}")
    holder: dict[str, Any] = {}

    def decode() -> None:
        holder["wave"] = decode_audio(clip, p.sample_rate, 0.0, p.audio_seconds)
        holder["rgb"], _ = decode_frames(clip, cfg.num_frames, 0.0, p.clip_seconds)

    stages = {
        "decode (audio + 10 frames)": decode,
        "fbank": lambda: holder.__setitem__("audio", prepare_audio(holder["wave"], p)),
        "frame preprocessing": lambda: holder.__setitem__("frames", preprocess_frames(holder["rgb"], p)),
    }
    for name, fn in stages.items():
        t = Timing(name, 1)
        t.samples = shown_measure(fn, cfg.warmup, max(cfg.repeat, 5), f"bench: {name}", progress=progress)
        result["timings"].append(t.to_dict())
    return holder["audio"], holder["frames"]


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of a benchmark result."""
    rows = [("operation", "batch", "p50 ms", "p90 ms", "p99 ms", "n", "clips/s", "GFLOP/s", "peak RSS MB")]
    for t in result["timings"]:
        rows.append((
            t["name"], str(t["batch"]), f"{t['p50'] * 1e3:.1f}", f"{t['p90'] * 1e3:.1f}", f"{t['p99'] * 1e3:.1f}",
            str(t["n"]), f"{t['clips_per_s']:.2f}",
            f"{t['achieved_gflops']:.1f}" if t.get("achieved_gflops") else "-",
            f"{t['peak_rss_mb']:.0f}" if t.get("peak_rss_mb") else "-",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if result["ratios"]:
        lines.append("")
        lines.extend(f"speed-up vs baseline, {k}: {v:.2f}x" for k, v in result["ratios"].items())
    mm = result.get("matmul_gflops", {})
    if mm:
        lines.append("large fp32 matmul on this machine: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in mm.items()))
    m = result["machine"]
    lines.append(f"machine: {m['cpu']}, {m['physical_cores']} physical cores; gpus: {', '.join(m['gpus']) or 'none'}")
    return "\n".join(lines)


def parse_batches(text: str | Sequence[int]) -> tuple[int, ...]:
    """``"1,8"`` -> ``(1, 8)``."""
    if not isinstance(text, str):
        return tuple(int(x) for x in text)
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:  # also an empty item: "1,,8"
        values = ()
    values = tuple(dict.fromkeys(values))  # "1,1" measures batch 1 once
    if not values or min(values) < 1:
        raise CavmaeError(f"--batch takes positive integers separated by commas, e.g. 1,8; got {text!r}")
    return values
