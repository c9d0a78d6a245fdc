"""The exported graphs, each declared once as data: the one source of graph and tensor names.

A deployed model is a few fixed-shape graphs, one per stage. Each :class:`GraphDecl` below says
what its graph takes and returns (tensor names, symbolic shapes, dtypes), how its batch axis
counts (clips or frames), how validation compares each output with PyTorch, and how to draw
valid random inputs, in the manner of optimum's ONNX export configs. One name runs through
every layer (graph ``X``: model method ``forward_X``, file ``X.onnx``)::

    declaration        model stage (cavmae.model)              runtime call (Pipeline)
    AUDIO_ENCODER      CAVMAEEncoder.forward_audio_encoder     run_audio_encoder
    VISUAL_ENCODER     CAVMAEEncoder.forward_visual_encoder    run_visual_encoder
    AUDIO_EMBED        CAVMAEEncoder.forward_audio_embed       run_graph(AUDIO_EMBED, ...)
    VISUAL_EMBED       CAVMAEEncoder.forward_visual_embed      run_graph(VISUAL_EMBED, ...)
    JOINT_CLASSIFIER   CAVMAEFT.forward_joint_classifier       run_graph(JOINT_CLASSIFIER, ...)
    AUDIO_CLASSIFIER   CAVMAEFT.forward_audio_classifier       run_graph(AUDIO_CLASSIFIER, ...)
    VISUAL_CLASSIFIER  CAVMAEFT.forward_visual_classifier      run_graph(VISUAL_CLASSIFIER, ...)
    MASKED_ENCODER     CAVMAE.forward_masked_encoder           run_graph(MASKED_ENCODER, ...)
    DECODER            CAVMAE.forward_decoder                  run_graph(DECODER, ...)

The exporter traces ``forward_<name>`` (:attr:`GraphDecl.method`) into ``<name>.onnx``, the
manifest records :meth:`GraphDecl.spec`, validation reads :attr:`TensorDecl.tolerance`, the
engines check inputs against the spec, and the Triton writer and the pipeline refer to graphs
and tensors through the constants here, never through string literals.

Shapes are symbolic: ``"batch"`` is the one dynamic axis; the other symbols are the sizes of
:func:`graph_sizes` (``La``/``Lv`` audio/visual tokens, ``D`` width, ``T`` x ``M`` spectrogram,
``S`` image side, ``F`` frames per clip, ``C`` classes, ``Ka``/``Kv`` kept tokens, ``Pa``/``Pv``
patch sizes). Torch-free (the runtime imports it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from .config import ModelConfig
from .manifest import BATCH, GraphSpec, TensorSpec

__all__ = [
    "AUDIO_CLASSIFIER",
    "AUDIO_EMBED",
    "AUDIO_ENCODER",
    "CLASSIFIER_GRAPHS",
    "DECODER",
    "ENCODER_GRAPHS",
    "FEATURES",
    "GRAPHS",
    "JOINT_CLASSIFIER",
    "MASKED_ENCODER",
    "PRETRAIN_GRAPHS",
    "PROBABILITIES",
    "VISUAL_CLASSIFIER",
    "VISUAL_EMBED",
    "VISUAL_ENCODER",
    "GraphDecl",
    "TensorDecl",
    "Tolerance",
    "declaration",
    "graph_sizes",
    "output_tolerance",
]


# ------------------------------------------------------------------------------- tolerances
@dataclass(frozen=True)
class Tolerance:
    """How validation compares one exported output with its PyTorch stage.

    fp32: ``max|onnx - torch| / max|torch|`` at most ``fp32_max_rel_error``. fp16 features
    (tokens, embeddings, logits): cosine similarity per sample at least ``fp16_min_cosine``.
    fp16 scores a user reads (``top_k > 0``): the largest absolute difference at most
    ``fp16_max_abs`` and the top-``top_k`` ranking unchanged up to ``near_tie`` (classes whose
    reference scores are closer than that may trade places: fp16 rounding decides their order).
    """

    fp32_max_rel_error: float = 1e-4
    fp16_min_cosine: float = 0.999
    fp16_max_abs: float = math.inf
    top_k: int = 0
    near_tie: float = 1e-3

    @property
    def ranked(self) -> bool:
        """True for score outputs judged by their values and ranking under fp16."""
        return self.top_k > 0


#: tokens, embeddings, logits
FEATURES = Tolerance()
#: class probabilities
PROBABILITIES = Tolerance(fp16_max_abs=5e-3, top_k=5, near_tie=1e-3)


# ------------------------------------------------------------------------------- tensors
@dataclass(frozen=True)
class TensorDecl:
    """One graph input or output: name, symbolic shape, dtype, validation tolerance.

    ``indices`` marks an int64 index input of the masking (``("keep" | "restore", L, K)``: the
    ``ids_keep``/``ids_restore`` of keeping ``K`` of ``L`` tokens), so random validation inputs
    are valid permutations; every other input is drawn standard normal.
    """

    name: str
    dims: tuple[int | str, ...]
    dtype: str = "float32"
    tolerance: Tolerance = FEATURES
    indices: tuple[str, str, str] | None = None

    def shape(self, sizes: Mapping[str, int]) -> tuple[int | str, ...]:
        """The manifest shape: ``"batch"`` stays symbolic, every other symbol becomes its size."""
        return tuple(d if d == BATCH or isinstance(d, int) else int(sizes[d]) for d in self.dims)

    def spec(self, sizes: Mapping[str, int]) -> TensorSpec:
        return TensorSpec(self.name, self.shape(sizes), self.dtype)


def _t(name: str, *dims: int | str, **kw) -> TensorDecl:
    return TensorDecl(name, (BATCH, *dims), **kw)


AUDIO = _t("audio", "T", "M")
IMAGE = _t("image", 3, "S", "S")
AUDIO_TOKENS = _t("audio_tokens", "La", "D")
#: one frame's tokens (the visual encoder's batch counts frames)
VISUAL_TOKENS = _t("visual_tokens", "Lv", "D")
#: the F frames of a clip (the classifiers' batch counts clips); the same tensor name
FRAME_TOKENS = _t("visual_tokens", "F", "Lv", "D")
AUDIO_EMBEDDING = _t("audio_embedding", "D")
VISUAL_EMBEDDING = _t("visual_embedding", "D")
VISUAL_PATCHES = _t("visual_patches", "Lv", "D")
LOGITS = _t("logits", "C")
FRAME_LOGITS = _t("logits", "F", "C")
PROBS = _t("probs", "C", tolerance=PROBABILITIES)
IDS_KEEP_A = _t("ids_keep_a", "Ka", dtype="int64", indices=("keep", "La", "Ka"))
IDS_KEEP_V = _t("ids_keep_v", "Kv", dtype="int64", indices=("keep", "Lv", "Kv"))
JOINT_TOKENS = _t("joint_tokens", "K", "D")
IDS_RESTORE_A = _t("ids_restore_a", "La", dtype="int64", indices=("restore", "La", "Ka"))
IDS_RESTORE_V = _t("ids_restore_v", "Lv", dtype="int64", indices=("restore", "Lv", "Kv"))
PRED_A = _t("pred_a", "La", "Pa")
PRED_V = _t("pred_v", "Lv", "Pv")


# ------------------------------------------------------------------------------- graphs
@dataclass(frozen=True)
class GraphDecl:
    """One exported graph: the model stage ``forward_<name>`` with fixed shapes.

    ``params`` are the stage method's non-tensor arguments, fixed when the graph is built
    (``task``, ``num_frames``, ``mode``, ``keep_a``). ``per_frame`` graphs see every frame of a
    clip, so their batch limit is ``max_batch * F``. ``description`` may use ``{mode}`` and the
    size symbols.
    """

    name: str
    inputs: tuple[TensorDecl, ...]
    outputs: tuple[TensorDecl, ...]
    description: str
    per_frame: bool = False
    params: tuple[str, ...] = ()

    @property
    def method(self) -> str:
        """The model method this graph is traced from."""
        return f"forward_{self.name}"

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    def output(self, name: str) -> TensorDecl:
        for t in self.outputs:
            if t.name == name:
                return t
        raise KeyError(f"graph {self.name!r} has no output {name!r}")

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``{tensor: {axis: "batch"}}`` for the ONNX exporter."""
        return {
            t.name: {i: BATCH for i, d in enumerate(t.dims) if d == BATCH}
            for t in (*self.inputs, *self.outputs)
        }

    def max_batch(self, max_batch: int, num_frames: int) -> int:
        """The graph's batch limit when a deployment takes ``max_batch`` clips at once."""
        return max_batch * num_frames if self.per_frame else max_batch

    def spec(
        self, sizes: Mapping[str, int], *, max_batch: int, mode: str | None = None
    ) -> GraphSpec:
        """The manifest entry of this graph (fp32; the exporter sets the precision)."""
        return GraphSpec(
            name=self.name,
            file=self.file,
            inputs=tuple(t.spec(sizes) for t in self.inputs),
            outputs=tuple(t.spec(sizes) for t in self.outputs),
            max_batch=self.max_batch(max_batch, int(sizes["F"])),
            precision="fp32",
            description=self.description.format(mode=mode, **sizes),
        )


AUDIO_ENCODER = GraphDecl(
    "audio_encoder", (AUDIO,), (AUDIO_TOKENS,),
    "audio branch: spectrogram -> audio tokens (once per clip)",
)
VISUAL_ENCODER = GraphDecl(
    "visual_encoder", (IMAGE,), (VISUAL_TOKENS,),
    "visual branch: frame -> visual tokens (all frames as one batch)", per_frame=True,
)
AUDIO_EMBED = GraphDecl(
    "audio_embed", (AUDIO_TOKENS,), (AUDIO_EMBEDDING,),
    "audio-only stream, mean-pooled, L2-normalized",
)
VISUAL_EMBED = GraphDecl(
    "visual_embed", (VISUAL_TOKENS,), (VISUAL_EMBEDDING, VISUAL_PATCHES),
    "visual-only stream: pooled L2-normalized embedding and patch tokens", per_frame=True,
)
JOINT_CLASSIFIER = GraphDecl(
    "joint_classifier", (AUDIO_TOKENS, FRAME_TOKENS), (FRAME_LOGITS, PROBS),
    "joint stream + head per frame; probabilities averaged over frames",
    params=("task", "num_frames"),
)
AUDIO_CLASSIFIER = GraphDecl(
    "audio_classifier", (AUDIO_TOKENS,), (LOGITS, PROBS),
    "audio-only prediction (reference mode {mode})", params=("task", "mode"),
)
VISUAL_CLASSIFIER = GraphDecl(
    "visual_classifier", (FRAME_TOKENS,), (FRAME_LOGITS, PROBS),
    "visual-only prediction per frame, averaged (reference mode {mode})",
    params=("task", "mode", "num_frames"),
)
MASKED_ENCODER = GraphDecl(
    "masked_encoder", (AUDIO, IMAGE, IDS_KEEP_A, IDS_KEEP_V), (JOINT_TOKENS,),
    "pre-training encoder on {Ka} audio + {Kv} visual kept tokens",
)
DECODER = GraphDecl(
    "decoder", (JOINT_TOKENS, IDS_RESTORE_A, IDS_RESTORE_V), (PRED_A, PRED_V),
    "MAE decoder: joint tokens + restore indices -> patch predictions", params=("keep_a",),
)

#: every model deploys these (encoders and retrieval embeddings)
ENCODER_GRAPHS: tuple[GraphDecl, ...] = (AUDIO_ENCODER, VISUAL_ENCODER, AUDIO_EMBED, VISUAL_EMBED)
#: classifier heads; which of them a classifier deploys follows its modes (cavmae.modes)
CLASSIFIER_GRAPHS: tuple[GraphDecl, ...] = (JOINT_CLASSIFIER, AUDIO_CLASSIFIER, VISUAL_CLASSIFIER)
#: what a pre-training model adds
PRETRAIN_GRAPHS: tuple[GraphDecl, ...] = (MASKED_ENCODER, DECODER)
#: every declared graph by name
GRAPHS: dict[str, GraphDecl] = {g.name: g for g in (*ENCODER_GRAPHS, *CLASSIFIER_GRAPHS, *PRETRAIN_GRAPHS)}


def declaration(graph: str | GraphDecl) -> GraphDecl:
    """The declaration of a graph given by name (or the declaration itself)."""
    if isinstance(graph, GraphDecl):
        return graph
    try:
        return GRAPHS[graph]
    except KeyError:
        raise KeyError(f"no graph {graph!r} is declared; the graphs are {', '.join(GRAPHS)}") from None


def output_tolerance(name: str) -> Tolerance:
    """The tolerance the declarations give outputs called ``name`` (``FEATURES`` if none)."""
    for g in GRAPHS.values():
        for t in g.outputs:
            if t.name == name:
                return t.tolerance
    return FEATURES


def graph_sizes(
    config: ModelConfig,
    *,
    num_frames: int,
    mask_ratio_a: float | None = None,
    mask_ratio_v: float | None = None,
) -> dict[str, int]:
    """The sizes behind the shape symbols, for a model of ``config`` deployed with these
    settings. The kept-token counts (``Ka``, ``Kv``, ``K``) only with both mask ratios."""
    sizes = {
        "T": config.audio_length,
        "M": config.num_mel_bins,
        "S": config.image_size,
        "D": config.embed_dim,
        "La": config.num_audio_tokens,
        "Lv": config.num_visual_tokens,
        "F": num_frames,
        "C": config.num_classes,
        "Pa": config.audio_patch_dim,
        "Pv": config.visual_patch_dim,
    }
    if mask_ratio_a is not None and mask_ratio_v is not None:
        from .masking import num_kept  # numpy; only pre-training deployments need it

        ka, kv = num_kept(sizes["La"], mask_ratio_a), num_kept(sizes["Lv"], mask_ratio_v)
        sizes.update(Ka=ka, Kv=kv, K=ka + kv)
    return sizes
