"""The ONNX Runtime engine (``ort``): CPU and CUDA execution providers.

Session options are tuned for latency of one request at a time: intra-op threads = physical
cores (``$CAVMAE_THREADS`` or ``threads=`` override), one inter-op thread, sequential
execution, every graph optimization on.

Optimized-model cache (ONNX Runtime's "offline mode"): the first session of a graph runs the
optimizers online and saves the result to
``{export_dir}/.ort/{graph}.{provider}.{ort version}.{hardware}.onnx``. Later sessions load
that file with optimizations *disabled*, as the ONNX Runtime graph-optimization docs advise
for a pre-optimized model, which cuts session start-up. Because ``ORT_ENABLE_ALL`` bakes
provider- and CPU-specific layout transforms into the saved graph, the file name carries the
provider, the ONNX Runtime version and a hardware fingerprint. A cached file older than its
source, or one that fails to load, is replaced. A read-only export directory just means no
cache.

``onnxruntime`` is imported lazily so this module imports anywhere.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from cavmae import fsio
from cavmae.errors import CavmaeError, EngineUnavailableError
from cavmae.manifest import GraphSpec, Manifest

from .. import hardware
from .base import Engine, GraphSession
from .devices import parse_device

log = logging.getLogger(__name__)

CACHE_DIRNAME = ".ort"

_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_SHORT = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda"}

# ONNX Runtime's type strings for the dtypes a manifest may declare.
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _import_ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError as e:  # a hard dependency, but say what to do if it is broken
        raise EngineUnavailableError(
            f"the ONNX Runtime engine needs onnxruntime: pip install onnxruntime ({e})"
        ) from None
    return ort


#: ONNX Runtime's errors for a model file it cannot read as a graph: not protobuf or cut short
#: (INVALID_PROTOBUF), empty ("No graph was found", INVALID_ARGUMENT), a graph that does not hold
#: together (INVALID_GRAPH)
_DAMAGED = ("InvalidProtobuf", "InvalidGraph", "InvalidArgument")


def _is_damaged_model(error: Exception) -> bool:
    """Whether ``error``, raised opening a model file, says the file is not a usable graph."""
    return type(error).__name__ in _DAMAGED and "onnxruntime" in type(error).__module__


class OrtSession(GraphSession):
    """One graph in an ``onnxruntime.InferenceSession``."""

    def __init__(self, spec: GraphSpec, session: Any, source: str) -> None:
        super().__init__(spec)
        self._session = session
        #: where the graph came from: "source", "cache" (pre-optimized), "source+cached" or
        #: "validation" (the session the exporter validated, see ``validation_session``)
        self.source = source
        self._outputs = [t.name for t in spec.outputs]
        self._check_against_spec()

    def _check_against_spec(self) -> None:
        """Fail at open, not at first run, when the ONNX file and the manifest disagree."""
        have_in = {i.name: i for i in self._session.get_inputs()}
        have_out = {o.name for o in self._session.get_outputs()}
        want_in = [t.name for t in self.spec.inputs]
        if set(have_in) != set(want_in) or not set(self._outputs) <= have_out:
            raise CavmaeError(
                f"graph {self.spec.name!r}: the ONNX file has inputs {sorted(have_in)} and"
                f" outputs {sorted(have_out)}, the manifest declares inputs {want_in} and"
                f" outputs {self._outputs}; the export is inconsistent, re-export the model"
            )
        for t in self.spec.inputs:
            ort_dtype = _ORT_TYPES.get(have_in[t.name].type)
            if ort_dtype is not None and ort_dtype != np.dtype(t.dtype).name:
                raise CavmaeError(
                    f"graph {self.spec.name!r}, input {t.name!r}: the ONNX file takes"
                    f" {ort_dtype}, the manifest says {t.dtype}; re-export the model"
                )

    @property
    def providers(self) -> list[str]:
        return list(self._session.get_providers())

    def _run(self, inputs: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
        """Run one checked batch. Inputs/outputs follow ``spec`` (shapes with ``batch`` = B)."""
        # Plain ``run`` copies outputs once into fresh numpy arrays; IO binding saves nothing
        # measurable on CPU for these large compute-bound graphs.
        values = self._session.run(self._outputs, inputs)
        return dict(zip(self._outputs, values, strict=True))

    def close(self) -> None:
        self._session = None


#: ONNX Runtime's session setting for busy-waiting intra-op threads ("1" spin, "0" sleep)
SPIN_CONFIG_KEY = "session.intra_op.allow_spinning"


class OrtEngine(Engine):
    """ONNX Runtime on ``device`` "cpu" (CPUExecutionProvider) or "cuda[:N]" (CUDA provider).

    Options: ``threads`` (intra-op threads; default ``$CAVMAE_THREADS`` or physical cores),
    ``cache`` (save/load optimized models next to the export; default True), ``spin`` (let
    idle intra-op threads busy-wait for the next operator, ONNX Runtime's default; off here,
    see :meth:`_options`).
    """

    name = "ort"

    def __init__(
        self,
        export_dir: str | Path,
        manifest: Manifest,
        device: str = "cpu",
        *,
        threads: int | None = None,
        cache: bool = True,
        spin: bool = False,
    ) -> None:
        kind, index = parse_device(device)
        super().__init__(export_dir, manifest, device)
        self._ort = _import_ort()
        self.threads = hardware.default_threads(threads)
        self.cache = cache
        self.spin = spin
        self.device_kind = kind
        self.device_index = index
        self.provider = _PROVIDERS[kind]
        # on the CPU for the cache; and always for int8, whose dynamic scales must not depend
        # on the other clips of a batch (its quantized products are CPU kernels anyway)
        self.cpu_sized_runs = self.provider == "CPUExecutionProvider" or manifest.precision == "int8"
        #: graph name -> the session validation ran, taken by the graph's first ``_open``
        self._validated: dict[str, Any] = {}
        if kind == "cuda" and hasattr(self._ort, "preload_dlls"):
            # The `gpu` extra brings CUDA and cuDNN as NVIDIA's pip wheels, which are not on the
            # loader's path: ORT >= 1.21 finds them in site-packages (or in torch) when asked.
            self._ort.preload_dlls()
        available = self._ort.get_available_providers()
        if self.provider not in available:
            raise EngineUnavailableError(
                "ONNX Runtime here has no CUDA provider (it offers"
                f" {', '.join(available)}); for device {device!r} install the GPU build:"
                " pip uninstall onnxruntime && pip install 'cavmae[gpu]' (onnxruntime-gpu,"
                " with CUDA and cuDNN), or use device 'cpu'"
            )

    # ---- session construction ----------------------------------------------------------

    def _providers(self) -> list[Any]:
        if self.provider == "CUDAExecutionProvider":
            # CPU stays listed for the few ops the CUDA provider lacks (shape ops etc.).
            return [
                ("CUDAExecutionProvider", {"device_id": self.device_index}),
                "CPUExecutionProvider",
            ]
        return ["CPUExecutionProvider"]

    def _options(self, level: Any) -> Any:
        ort = self._ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        # One request at a time: parallelism lives inside ops, not across graph branches.
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = level
        # Idle intra-op threads sleep instead of spinning between operators. The threads are
        # as many as the cores, so a spinning thread takes a core from the decoding threads
        # and from the other graphs' sessions. Measured side by side on two 2-core hosts
        # (benchmarks/README.md, "Thread spinning"): the folder loop with decoding ahead 2-8%
        # faster at full size, 14% for the tiny model; the model alone 0-7% faster at full
        # size, 1.3-2x for the tiny one.
        so.add_session_config_entry(SPIN_CONFIG_KEY, "1" if self.spin else "0")
        if self.provider == "CPUExecutionProvider":
            # No memory pattern: with it, ONNX Runtime plans one block for all of a run's
            # intermediate tensors after the first run and allocates it on the second, fresh
            # pages the kernel must zero: the joint graph's second run took 1.6 s instead of
            # 0.47 (it holds the attention maps of 10 sequences), and in a first use the real
            # run is the second (validation ran first). The arena keeps what the first run
            # allocated anyway; steady-state runs measured the same either way
            # (benchmarks/README.md, "Memory pattern").
            so.enable_mem_pattern = False
        return so

    def _hardware_tag(self) -> str:
        if self.provider == "CUDAExecutionProvider":
            return "gpu" + (hardware.gpu_fingerprint() or "unknown")
        return "cpu" + hardware.cpu_fingerprint()

    def cache_path(self, spec: GraphSpec) -> Path:
        """Where the optimized model of ``spec`` is cached for this provider and machine."""
        short = _SHORT[self.provider]
        version = self._ort.__version__
        return (
            self.export_dir
            / CACHE_DIRNAME
            / f"{spec.name}.{short}.{version}.{self._hardware_tag()}.onnx"
        )

    def _new_session(self, path: Path, options: Any) -> Any:
        sess = self._ort.InferenceSession(str(path), options, providers=self._providers())
        if self.provider not in sess.get_providers():
            # onnxruntime-gpu falls back to CPU when CUDA/cuDNN libraries fail to load.
            raise EngineUnavailableError(
                f"ONNX Runtime could not start the CUDA provider for {path.name} (it runs on"
                f" {', '.join(sess.get_providers())}); check the CUDA and cuDNN versions"
                " onnxruntime-gpu needs, or use device 'cpu'"
            )
        return sess

    def _source_session(self, spec: GraphSpec, source: Path, options: Any) -> Any:
        """A session of the export's own graph file ``source``; a file ONNX Runtime cannot
        parse (cut short, overwritten, empty) is a one-line ``CavmaeError`` naming it, as a
        missing one is: the export is damaged and only re-exporting mends it."""
        try:
            return self._new_session(source, options)
        except CavmaeError:
            raise
        except Exception as e:
            if not _is_damaged_model(e):
                raise
            reason = str(e).rsplit("failed:", 1)[-1].strip().rstrip(".") or type(e).__name__
            raise CavmaeError(
                f"graph {spec.name!r}: {source} is not a readable ONNX graph ({reason}); the"
                " export directory is damaged, re-export the model"
            ) from None

    def validation_session(self, graph: str, path: Path, optimized: Path | None) -> Any:
        """A session of the new graph file ``path`` of ``graph``, opened as this engine opens
        a graph it optimizes (every optimization on; ``optimized``: where ONNX Runtime saves
        the optimized graph, the copy a later process loads), for the exporter's validation
        to run. The engine keeps it: its first :meth:`session` of ``graph`` is the session
        validation checked, and the graph is not loaded and initialized a second time."""
        options = self._options(self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        options.log_severity_level = 3  # the hardware-specific ENABLE_ALL warning (see _open)
        if optimized is not None:
            options.optimized_model_filepath = str(optimized)
        session = self._new_session(path, options)
        self._validated[graph] = session
        return session

    def _open(self, spec: GraphSpec) -> GraphSession:
        ort = self._ort
        validated = self._validated.pop(spec.name, None)
        if validated is not None:
            return OrtSession(spec, validated, "validation")
        source = self.export_dir / spec.file
        if not source.is_file():
            raise CavmaeError(
                f"graph {spec.name!r}: {source} is missing; the export directory is"
                " incomplete, re-export the model"
            )
        full = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not self.cache:
            return OrtSession(spec, self._source_session(spec, source, self._options(full)), "source")

        cached = self.cache_path(spec)
        if cached.is_file():
            if cached.stat().st_mtime >= source.stat().st_mtime:
                try:
                    sess = self._new_session(
                        cached, self._options(ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
                    )
                    log.debug("graph %s: loaded optimized model %s", spec.name, cached)
                    return OrtSession(spec, sess, "cache")
                except EngineUnavailableError:
                    raise
                except Exception as e:  # corrupt or foreign file: rebuild it below
                    log.warning(
                        "graph %s: cached optimized model %s is unusable (%s); rebuilding it",
                        spec.name,
                        cached,
                        e,
                    )
            else:
                log.debug("graph %s: cached model %s is older than its source", spec.name, cached)
            try:
                cached.unlink()
            except OSError as e:
                log.debug("cannot remove %s: %s", cached, e)

        if not fsio.writable_dir(cached.parent):
            return OrtSession(spec, self._source_session(spec, source, self._options(full)), "source")

        # Save to a private temporary name, then rename: concurrent processes never see a
        # half-written model.
        tmp = fsio.temp_sibling(cached)
        options = self._options(full)
        options.optimized_model_filepath = str(tmp)
        # ORT warns that an ENABLE_ALL model is hardware specific; the cache name already
        # carries the provider, version and hardware, so silence that one warning.
        options.log_severity_level = 3
        try:
            sess = self._source_session(spec, source, options)
        except CavmaeError:  # no CUDA provider, or a damaged graph: not a caching problem
            tmp.unlink(missing_ok=True)
            raise
        except Exception as e:
            tmp.unlink(missing_ok=True)
            log.debug("graph %s: saving the optimized model failed (%s); not caching", spec.name, e)
            return OrtSession(spec, self._source_session(spec, source, self._options(full)), "source")
        try:
            fsio.publish_file(tmp, cached)
            log.debug("graph %s: cached optimized model at %s", spec.name, cached)
        except OSError as e:
            log.debug("graph %s: cannot move optimized model into place: %s", spec.name, e)
            tmp.unlink(missing_ok=True)
        return OrtSession(spec, sess, "source+cached")

    def describe(self) -> str:
        return f"ort on {self.device} ({self.provider}, {self.threads} threads)"
