"""int8 variants of exported graphs, and the accuracy gate that decides whether one is written.

Dynamic quantization is written by :mod:`cavmae.export.dynamic_int8` (the graph ONNX Runtime's
``quantize_dynamic`` writes, in whole-array numpy), static by ``onnxruntime.quantization``. The
default, chosen by measurement
on a full-size classifier (benchmarks/README.md, "int8"), is **dynamic** quantization of the
MatMul nodes with constant weights, **per-channel** int8 weights: weights are quantized once
here, activations per call from their own range, so no calibration set can be unrepresentative.
What stays fp32, and why:

- LayerNormalization, Softmax, GELU (Erf) and every reduction: dynamic quantization only
  rewrites MatMul nodes, so these keep their fp32 kernels;
- the attention products ``q @ k^T`` and ``attn @ v``: both operands are activations
  (``MatMulConstBOnly``), and the scores feed the softmax;
- the classification head (``mlp_head``): one small product that decides the ranking the user
  sees, not worth a rounding step.

``method="static"`` writes QDQ graphs with activation scales calibrated on the gate's clips
(``CalibrationDataReader``); it is kept for measurement and for users who want it.

The gate runs the fp32 and the int8 graphs side by side on real clips (the repository's sample
clips, or the user's ``calibration`` directory) through the same flow as the runtime (audio once,
the frames as one batch, the classifier on both) and reports per clip: how many of the fp32
top-5 classes the int8 top-5 keeps, the largest probability difference, and the cosine of the
audio and visual embeddings (or tokens). Below the thresholds the export is refused.

``onnxruntime.quantization`` is imported lazily, for static quantization only (it is slow to
import).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from cavmae import fsio
from cavmae.config import PreprocessConfig
from cavmae.cpu_flags import int8_products_saturate
from cavmae.errors import ExportError, MediaError, MissingStreamError, skipped_message
from cavmae.filetypes import VIDEO_SUFFIXES, is_media_file
from cavmae.graphs import VISUAL_ENCODER
from cavmae.manifest import GraphSpec
from cavmae.progress import progress_bar, progress_note, progress_style
from cavmae.run_sizes import rows_per_run
from cavmae.samples import sample_clips

from .dynamic_int8 import quantize_dynamic_int8
from .validate import ort_session

log = logging.getLogger(__name__)

METHODS = ("dynamic", "static")
#: the node types quantized; Gemm/Conv (patch embeddings, head) stay fp32
INT8_OPS = ("MatMul",)
#: nodes whose name contains one of these stay fp32 (the classification heads)
KEEP_FP32 = ("mlp_head",)
#: default thresholds of the gate
DEFAULT_MIN_TOP5 = 4
DEFAULT_MIN_COSINE = 0.99
TOP_K = 5
#: the graph that classifies, in order of preference (the first one an export has)
CLASSIFIERS = ("joint_classifier", "audio_classifier", "visual_classifier")


class Int8GateError(ExportError):
    """The int8 graphs disagree with the fp32 ones beyond the thresholds; nothing is written."""


@dataclass(frozen=True)
class Int8Options:
    """How to quantize and how strict the gate is.

    ``calibration``: a directory (or files) of clips for the gate and static calibration;
    None takes the two sample clips that ship with the package (:mod:`cavmae.samples`).
    """

    method: str = "dynamic"
    per_channel: bool = True
    calibration: str | Path | Sequence[str | Path] | None = None
    min_top5: int = DEFAULT_MIN_TOP5
    min_cosine: float = DEFAULT_MIN_COSINE
    max_clips: int = 16  # the gate decodes and runs each clip twice; more adds little
    #: weights in 7 bits (ONNX Runtime's reduce_range); None: where this CPU's int8 products
    #: would saturate without it (:func:`cavmae.cpu_flags.int8_products_saturate`)
    reduce_range: bool | None = None

    def check(self) -> None:
        if self.method not in METHODS:
            raise ExportError(f"int8 method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if not 0 <= self.min_top5 <= TOP_K:
            raise ExportError(f"the int8 top-5 threshold must be 0..{TOP_K}, not {self.min_top5}")
        if not -1.0 <= self.min_cosine <= 1.0:
            raise ExportError(f"the int8 cosine threshold must be in [-1, 1], not {self.min_cosine}")


@dataclass
class ClipAgreement:
    """int8 against fp32 on one clip."""

    clip: str
    top5_shared: int | None = None  # of the fp32 top-5 classes, how many int8's top-5 keeps
    probs_max_abs: float | None = None
    #: the same per classifier graph (the worst of them is ``top5_shared``)
    top5_by_graph: dict[str, int] = field(default_factory=dict)
    cosines: dict[str, float] = field(default_factory=dict)  # output name -> cosine

    @property
    def min_cosine(self) -> float:
        return min(self.cosines.values()) if self.cosines else 1.0


# -- which clips ----------------------------------------------------------------------------
def gate_clips(calibration: str | Path | Sequence[str | Path] | None) -> list[Path]:
    """The candidate clips of the gate (and static calibration), directories' sorted; see
    :func:`load_gate_clips` for the ones it runs on."""
    if calibration is None:
        items: list[Path] = list(sample_clips())
        if not items:
            raise ExportError(
                "an int8 export compares int8 with fp32 on real clips, and the sample clips are"
                " not installed here; pass --calibration DIR (a folder of your clips)"
            )
    elif isinstance(calibration, (str, Path)):
        items = [Path(calibration)]
    else:
        items = [Path(p) for p in calibration]
    clips: list[Path] = []
    for item in items:
        if item.is_dir():
            clips += sorted(p for p in item.rglob("*") if is_media_file(p.name, VIDEO_SUFFIXES))
        elif item.is_file():
            clips.append(item)
        else:
            raise ExportError(f"calibration clips: {item} does not exist")
    if not clips:
        raise ExportError(
            f"calibration clips: no video files ({', '.join(VIDEO_SUFFIXES)}) in"
            f" {', '.join(map(str, items))}"
        )
    return clips


@dataclass(frozen=True)
class GateClip:
    """One clip the gate (and static calibration) runs on: ``audio [T, F]``, ``frames [F, 3, H, W]``."""

    name: str
    audio: np.ndarray
    frames: np.ndarray


def load_gate_clips(
    calibration: str | Path | Sequence[str | Path] | None, limit: int, num_frames: int,
    preprocess: PreprocessConfig,
) -> list[GateClip]:
    """The first ``limit`` candidate clips (:func:`gate_clips`) that decode with both streams:
    the gate runs every graph, the audio and the visual ones. A clip that
    cannot be used (no audio or no video stream, not media, corrupt) is skipped with one
    warning line and the next one taken; ``ExportError`` only when none is left."""
    from cavmae.media import load_clip

    candidates = gate_clips(calibration)
    loaded: list[GateClip] = []
    for path in candidates:
        if len(loaded) == limit:
            break
        try:
            clip = load_clip(path, num_frames=num_frames, config=preprocess)
        except MissingStreamError as e:
            log.warning("%s", skipped_message(path, str(e.with_hint(_BOTH_STREAMS))))
        except MediaError as e:
            log.warning("%s", skipped_message(path, str(e)))
        else:
            assert clip.audio is not None and clip.frames is not None  # both streams were asked for
            loaded.append(GateClip(path.name, clip.audio, clip.frames))
    if not loaded:
        raise ExportError(
            f"calibration clips: none of the {len(candidates)} clip(s) can be used (each skipped with"
            " a warning); the int8 gate needs clips with an audio and a video stream"
        )
    return loaded


#: why a calibration clip needs both streams, in its skip warning
_BOTH_STREAMS = "the int8 gate runs the audio and the visual graphs, so each clip needs both streams"


# -- quantization ---------------------------------------------------------------------------
def kept_fp32_nodes(path: Path) -> list[str]:
    """Names of the matrix products that stay fp32 by choice (see ``KEEP_FP32``)."""
    model = onnx.load(str(path), load_external_data=False)
    return [n.name for n in model.graph.node
            if n.op_type in (*INT8_OPS, "Gemm") and any(k in n.name for k in KEEP_FP32)]


def nodes_to_quantize(path: Path) -> list[str]:
    """The MatMul nodes to quantize: every one outside the heads.

    A list of nodes to quantize rather than to exclude, because ONNX Runtime's static quantizer
    rewrites a Gemm (the head's Linear on 2-D input) into a MatMul of a new name before it
    quantizes.
    """
    model = onnx.load(str(path), load_external_data=False)
    return [n.name for n in model.graph.node
            if n.op_type in INT8_OPS and not any(k in n.name for k in KEEP_FP32)]


def has_weight_matmul(path: Path) -> bool:
    """True when the graph has a MatMul with a constant (initializer) operand to quantize."""
    model = onnx.load(str(path), load_external_data=False)
    weights = {i.name for i in model.graph.initializer}
    return any(n.op_type in INT8_OPS and any(i in weights for i in n.input)
               and not any(k in n.name for k in KEEP_FP32) for n in model.graph.node)


class _FeedReader:
    """A ``CalibrationDataReader`` over a list of feeds (built lazily: the base class is in
    ``onnxruntime.quantization``)."""

    @staticmethod
    def make(feeds: list[dict[str, np.ndarray]]) -> Any:
        from onnxruntime.quantization import CalibrationDataReader

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self._it, None)

            def rewind(self) -> None:
                self._it = iter(feeds)

        return Reader()


def quantize_graph(
    src: Path, dst: Path, *, method: str = "dynamic", per_channel: bool = True,
    calibration: list[dict[str, np.ndarray]] | None = None, reduce_range: bool = False,
) -> None:
    """Write the int8 variant of the fp32 graph ``src`` to ``dst``.

    ``method="static"`` needs ``calibration``: feeds of this graph's inputs (one batch each).
    """
    nodes = nodes_to_quantize(src)
    if method == "dynamic":  # what ONNX Runtime's quantize_dynamic writes, 10-20x sooner
        quantize_dynamic_int8(src, dst, nodes, per_channel=per_channel, reduce_range=reduce_range)
        return
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    logging.getLogger("root").setLevel(logging.ERROR)  # the quantizer's pre-processing advice
    if method == "static":
        if not calibration:
            raise ExportError(f"static int8 quantization of {src.name} needs calibration inputs")
        quantize_static(
            src, dst, _FeedReader.make(calibration), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(INT8_OPS), per_channel=per_channel, reduce_range=reduce_range,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            nodes_to_quantize=nodes,
            extra_options={"MatMulConstBOnly": True, "ActivationSymmetric": False},
        )
    else:
        raise ExportError(f"int8 method must be one of {', '.join(METHODS)}, not {method!r}")


# -- the flow the gate runs -----------------------------------------------------------------
class _Runner:
    """The export's graphs in ONNX Runtime, one session each, run as the runtime pipeline does."""

    def __init__(self, paths: dict[str, Path], frame_rows: int) -> None:
        self.sessions = {name: ort_session(p) for name, p in paths.items()}
        self.frame_rows = frame_rows  # frames per visual encoder run, as the pipeline runs them

    def run(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sess = self.sessions[name]
        wanted = {i.name for i in sess.get_inputs()}
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, {k: v for k, v in feeds.items() if k in wanted}),
                        strict=True))

    def _frame_runs(self, name: str, input_name: str, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Graph ``name`` over one clip's per-frame ``rows``, ``frame_rows`` at a time."""
        step = self.frame_rows
        parts = [self.run(name, {input_name: rows[i : i + step]}) for i in range(0, len(rows), step)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def clip_outputs(self, audio: np.ndarray, frames: np.ndarray) -> dict[str, np.ndarray]:
        """Every output the gate compares, for one clip (``audio [T, F]``, ``frames [F, 3, H, W]``)."""
        out: dict[str, np.ndarray] = {}
        have = self.sessions
        if "audio_encoder" in have:
            out["audio_tokens"] = self.run("audio_encoder", {"audio": audio[None]})["audio_tokens"]
        if "visual_encoder" in have:
            out["visual_tokens"] = self._frame_runs("visual_encoder", "image", frames)["visual_tokens"]
        if "audio_embed" in have and "audio_tokens" in out:
            out.update(self.run("audio_embed", {"audio_tokens": out["audio_tokens"]}))
        if "visual_embed" in have and "visual_tokens" in out:
            emb = self._frame_runs("visual_embed", "visual_tokens", out["visual_tokens"])
            out["visual_embedding"] = emb["visual_embedding"]
        feeds = {"audio_tokens": out.get("audio_tokens")}
        if "visual_tokens" in out:
            feeds["visual_tokens"] = out["visual_tokens"][None]
        for graph in (g for g in CLASSIFIERS if g in have):  # every mode the export serves
            out[f"probs/{graph}"] = self.run(graph, {k: v for k, v in feeds.items() if v is not None})["probs"][0]
        return out

    def feeds_for(self, name: str, audio: np.ndarray, frames: np.ndarray,
                  ref: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The inputs graph ``name`` sees for one clip (static calibration)."""
        pool = {"audio": audio[None], "image": frames}
        if "audio_tokens" in ref:
            pool["audio_tokens"] = ref["audio_tokens"]
        if "visual_tokens" in ref:
            frame_graph = name in ("visual_embed",)
            pool["visual_tokens"] = ref["visual_tokens"] if frame_graph else ref["visual_tokens"][None]
        wanted = [i.name for i in self.sessions[name].get_inputs()]
        return {k: pool[k] for k in wanted}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest cosine over the rows of ``a`` and ``b`` (``[N, ...]``, each row flattened)."""
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.min(np.where(den > 0, (a * b).sum(1) / np.maximum(den, 1e-300), 1.0)))


def compare_clip(name: str, ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> ClipAgreement:
    """Top-5 overlap, probability difference and cosines of one clip's outputs."""
    result = ClipAgreement(name)
    for key in (k for k in ref if k.startswith("probs/")):
        want, have = ref[key], got[key]
        k = min(TOP_K, want.shape[-1])
        top_ref = set(np.argsort(-want, kind="stable")[:k].tolist())
        top_got = set(np.argsort(-have, kind="stable")[:k].tolist())
        result.top5_by_graph[key.split("/", 1)[1]] = len(top_ref & top_got)
        diff = float(np.abs(want - have).max())
        result.probs_max_abs = max(diff, result.probs_max_abs or 0.0)
    if result.top5_by_graph:
        result.top5_shared = min(result.top5_by_graph.values())
    for key in ("audio_embedding", "visual_embedding", "audio_tokens", "visual_tokens"):
        if key in ref:
            result.cosines[key] = _cosine(got[key], ref[key])
    return result


@dataclass
class GateReport:
    """What the gate measured and decided; goes into the manifest as ``quantization``."""

    method: str
    per_channel: bool
    op_types: list[str]
    kept_fp32: list[str]
    graphs: dict[str, str]  # graph -> "int8" or "fp32"
    min_top5: int
    min_cosine: float
    clips: list[ClipAgreement]
    passed: bool = True
    reduce_range: bool = False  # weights in 7 bits (see Int8Options.reduce_range)

    def worst(self) -> dict[str, Any]:
        tops = [c.top5_shared for c in self.clips if c.top5_shared is not None]
        probs = [c.probs_max_abs for c in self.clips if c.probs_max_abs is not None]
        return {
            "top5_shared_min": min(tops) if tops else None,
            "probs_max_abs": max(probs) if probs else None,
            "cosine_min": min(c.min_cosine for c in self.clips) if self.clips else None,
        }

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["clips"] = [asdict(c) for c in self.clips]
        d["worst"] = self.worst()
        return d

    def summary(self) -> str:
        w = self.worst()
        parts = [f"{len(self.clips)} clip(s)"]
        if w["top5_shared_min"] is not None:
            parts.append(f"top-5 shared >= {w['top5_shared_min']}/{TOP_K}")
            parts.append(f"probs max abs {w['probs_max_abs']:.2e}")
        parts.append(f"cosine >= {w['cosine_min']:.5f}")
        return ", ".join(parts)

    def failure(self) -> str | None:
        """One line naming the worst clip and the threshold, or None when the gate passes."""
        for c in self.clips:
            if c.top5_shared is not None and c.top5_shared < self.min_top5:
                graph = min(c.top5_by_graph, key=c.top5_by_graph.__getitem__)
                return (f"{c.clip}: int8 keeps {c.top5_shared} of the fp32 top-{TOP_K} classes"
                        f" ({graph}), fewer than --int8-min-top5 {self.min_top5}")
        for c in self.clips:
            if c.min_cosine < self.min_cosine:
                worst = min(c.cosines, key=c.cosines.__getitem__)
                return (f"{c.clip}: {worst} cosine to fp32 is {c.min_cosine:.5f}, below"
                        f" --int8-min-cosine {self.min_cosine:g}")
        return None


def _frame_rows(specs: dict[str, GraphSpec], num_frames: int) -> int:
    """Frames per visual encoder run in the gate: what the runtime runs on a CPU, where int8
    graphs run (:mod:`cavmae.run_sizes`); its tokens per frame from the encoder's output."""
    spec = specs.get(VISUAL_ENCODER.name)
    if spec is None:
        return num_frames
    tokens_per_frame = int(spec.outputs[0].concrete_shape(1)[1])
    return rows_per_run(tokens_per_frame, num_frames)


def quantize_export(
    work: Path,
    specs: dict[str, GraphSpec],
    *,
    num_frames: int,
    preprocess: PreprocessConfig,
    options: Int8Options | None = None,
    progress: bool = False,
    clips: list[GateClip] | None = None,
) -> tuple[dict[str, GraphSpec], GateReport]:
    """Quantize the fp32 graphs in ``work`` in place, after the gate has accepted them.

    Returns the specs (precision ``int8`` where a graph was quantized) and the gate's report.
    Raises ``Int8GateError`` when int8 disagrees with fp32 beyond the thresholds; the caller
    discards ``work`` then, so nothing is written. ``progress``: a bar on a terminal, a line
    per step (reference run, each graph quantized, gate) in a log. ``clips``: the gate's
    clips as :func:`load_gate_clips` gives them (the exporter loads them before tracing, so a
    calibration folder with no usable clip fails first); None loads them here.
    """
    opts = options or Int8Options()
    opts.check()
    if opts.reduce_range is None:
        opts = replace(opts, reduce_range=int8_products_saturate())
        if opts.reduce_range:
            log.info("int8: this CPU has no VNNI, so its int8 products would saturate; weights in 7 bits")
    if clips is None:
        clips = load_gate_clips(opts.calibration, opts.max_clips, num_frames, preprocess)
    fp32_paths = {name: work / spec.file for name, spec in specs.items()}
    frame_rows = _frame_rows(specs, num_frames)
    # read each graph once to see whether it has weight products (a full-size one is 330 MB)
    to_quantize = [name for name, path in fp32_paths.items() if has_weight_matmul(path)]
    with _Steps(2 + len(to_quantize), progress) as step:
        fp32 = _Runner(fp32_paths, frame_rows)
        refs = [fp32.clip_outputs(c.audio, c.frames) for c in clips]
        step.done(f"fp32 reference outputs on {len(clips)} clip(s)")
        int8_paths, kept = _quantize_graphs(fp32_paths, to_quantize, opts, fp32, clips, refs, step)
        int8 = _Runner({**fp32_paths, **int8_paths}, frame_rows)
        agreements = [compare_clip(c.name, ref, int8.clip_outputs(c.audio, c.frames))
                      for c, ref in zip(clips, refs, strict=True)]
        del fp32, int8  # close the sessions before files are replaced
        report = GateReport(
            method=opts.method, per_channel=opts.per_channel, op_types=list(INT8_OPS), kept_fp32=sorted(kept),
            graphs={name: ("int8" if name in int8_paths else "fp32") for name in specs},
            min_top5=opts.min_top5, min_cosine=opts.min_cosine, clips=agreements,
            reduce_range=bool(opts.reduce_range),
        )
        reason = report.failure()
        step.done(f"gate {'failed' if reason else 'passed'} ({report.summary()})")
    if reason is not None:
        report.passed = False
        raise Int8GateError(
            f"int8 accuracy gate failed, nothing written: {reason} ({report.summary()});"
            " export fp32 instead, or lower the threshold"
        )
    for name, dst in int8_paths.items():
        fsio.publish_file(dst, fp32_paths[name])
    out = {name: (replace(spec, precision="int8") if name in int8_paths else spec)
           for name, spec in specs.items()}
    log.info("int8 gate passed: %s", report.summary())
    return out, report


def _quantize_graphs(
    fp32_paths: dict[str, Path], names: list[str], opts: Int8Options, fp32: _Runner, clips: list[GateClip],
    refs: list[dict[str, np.ndarray]], step: _Steps,
) -> tuple[dict[str, Path], set[str]]:
    """Write ``NAME.int8.onnx`` beside each graph of ``names``; those paths, and the nodes
    kept in fp32."""
    int8_paths: dict[str, Path] = {}
    kept: set[str] = set()
    for name in names:
        path = fp32_paths[name]
        kept.update(kept_fp32_nodes(path))
        dst = path.with_name(path.stem + ".int8.onnx")
        calibration = None
        if opts.method == "static":
            calibration = [fp32.feeds_for(name, c.audio, c.frames, ref)
                           for c, ref in zip(clips, refs, strict=True)]
        quantize_graph(path, dst, method=opts.method, per_channel=opts.per_channel,
                       calibration=calibration, reduce_range=bool(opts.reduce_range))
        int8_paths[name] = dst
        step.done(f"{name} quantized")
    return int8_paths, kept


class _Steps:
    """The int8 step's progress: a bar on a terminal, one timed line per step in a log."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = progress_bar(total=total, enabled=enabled and progress_style() == "bar",
                                desc="int8", unit="step")
        self.t0 = time.perf_counter()

    def done(self, what: str) -> None:
        now = time.perf_counter()
        self.bar.update(1)
        self.bar.set_postfix_str(what.split(" (")[0])
        progress_note(f"export: int8: {what} in {now - self.t0:.1f} s", enabled=self.enabled)
        self.t0 = now

    def __enter__(self) -> _Steps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def format_gate(report: dict[str, Any]) -> str:
    """The gate's report (as in the manifest) as a few lines for the terminal."""
    weights = ", 7-bit weights" if report.get("reduce_range") else ""
    lines = [f"  int8 gate ({report['method']}, per-channel {report['per_channel']}{weights}): passed;"
             f" thresholds top-5 >= {report['min_top5']}, cosine >= {report['min_cosine']:g}"]
    for c in report["clips"]:
        cos = min(c["cosines"].values()) if c["cosines"] else float("nan")
        top = "-" if c["top5_shared"] is None else f"{c['top5_shared']}/{TOP_K}"
        probs = "-" if c["probs_max_abs"] is None else f"{c['probs_max_abs']:.2e}"
        lines.append(f"    {c['clip']}: top-5 shared {top}, probs max abs {probs}, cosine {cos:.5f}")
    return "\n".join(lines)
