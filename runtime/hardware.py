"""Cheap, cached probes of the machine: CPU cores, CUDA GPUs, TensorRT, ONNX Runtime providers.

Nothing here imports torch (the runtime must work where torch is absent) and nothing imports
TensorRT or CUDA libraries: availability is decided from ``importlib.util.find_spec``, the
ONNX Runtime provider list, the NVIDIA driver's ``/proc`` entries and, only when those are
missing, one ``nvidia-smi -L`` call. Every probe is cached for the life of the process;
``clear_caches()`` resets them (tests).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import math
import os
import platform
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

from cavmae.errors import CavmaeError

log = logging.getLogger(__name__)

#: Environment variable that overrides the number of CPU threads an engine uses.
THREADS_ENV = "CAVMAE_THREADS"

_PROC_CPUINFO = Path("/proc/cpuinfo")
_PROC_NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")


# --------------------------------------------------------------------------------------------
# CPU
# --------------------------------------------------------------------------------------------


def count_physical_cores(cpuinfo: str, allowed: Iterable[int]) -> int | None:
    """Physical cores among the logical CPUs ``allowed``, read from ``/proc/cpuinfo`` text.

    Two logical CPUs (hyperthreads) on the same core share ``physical id`` and ``core id``,
    so the answer is the number of distinct pairs. Returns None when the text does not carry
    that topology (some ARM kernels, some VMs), so the caller can fall back to logical CPUs.
    """
    allowed_set = set(allowed)
    pairs: set[tuple[str, str]] = set()
    for block in cpuinfo.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        if "processor" not in fields:
            continue
        try:
            cpu = int(fields["processor"])
        except ValueError:
            return None
        if cpu not in allowed_set:
            continue
        if "core id" not in fields:
            return None
        pairs.add((fields.get("physical id", "0"), fields["core id"]))
    return len(pairs) or None


def parse_cgroup_cpu_max(text: str) -> float | None:
    """CPUs granted by a cgroup v2 ``cpu.max`` line (``"200000 100000"`` -> 2.0; ``"max ..."`` -> None)."""
    parts = text.split()
    if len(parts) < 1 or parts[0] == "max":
        return None
    try:
        quota = float(parts[0])
        period = float(parts[1]) if len(parts) > 1 else 100000.0
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def _cgroup_cpu_limit() -> float | None:
    """CPU quota of this container, if any (cgroup v2, then v1)."""
    try:
        return parse_cgroup_cpu_max(Path("/sys/fs/cgroup/cpu.max").read_text())
    except OSError:
        pass
    try:
        quota = float(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = float(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def _allowed_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


@functools.cache
def physical_cores() -> int:
    """Physical cores this process may run on (not hyperthreads), at least 1.

    Compute-bound kernels (GEMMs in ONNX Runtime's MLAS) gain nothing from a second
    hyperthread on a busy core and lose to contention, hence physical cores. The count is
    limited to the CPU affinity mask and to a container's cgroup CPU quota.
    """
    allowed = _allowed_cpus()
    try:
        cores = count_physical_cores(_PROC_CPUINFO.read_text(), allowed)
    except OSError:
        cores = None
    n = cores if cores is not None else len(allowed)
    quota = _cgroup_cpu_limit()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def default_threads(override: int | None = None) -> int:
    """Threads for intra-op parallelism: ``override``, else ``$CAVMAE_THREADS``, else physical cores."""
    if override is not None:
        if int(override) < 1:
            raise CavmaeError(f"the number of threads must be at least 1, got {override}")
        return int(override)
    env = os.environ.get(THREADS_ENV, "").strip()
    if env:
        try:
            value = int(env)
        except ValueError:
            value = 0
        if value < 1:
            raise CavmaeError(f"{THREADS_ENV} must be a positive integer, got {env!r}")
        return value
    return physical_cores()


@functools.cache
def cpu_fingerprint() -> str:
    """A short hash of the CPU model and its feature flags.

    ONNX Runtime's layout optimizations (e.g. NCHWc for AVX-512) are baked into a saved
    optimized model, which is then only valid on CPUs with the same features: the cache
    name of such a model carries this fingerprint.
    """
    model, flags = "", ""
    try:
        for line in _PROC_CPUINFO.read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model", "CPU part") and not model:
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = " ".join(sorted(value.split()))
            if model and flags:
                break
    except OSError:
        pass
    text = "|".join((platform.machine(), model or platform.processor(), flags))
    return hashlib.sha256(text.encode()).hexdigest()[:8]


# --------------------------------------------------------------------------------------------
# GPU, TensorRT, ONNX Runtime
# --------------------------------------------------------------------------------------------


def _gpus_hidden() -> bool:
    """True when CUDA_VISIBLE_DEVICES hides every GPU ("" or "-1")."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    return value is not None and value.strip() in ("", "-1")


@functools.cache
def gpu_names() -> tuple[str, ...]:
    """Names of the NVIDIA GPUs this process may use, in CUDA's numbering: those the driver
    reports, narrowed to ``CUDA_VISIBLE_DEVICES`` when it is set (empty when there are none)."""
    if _gpus_hidden():
        return ()
    return _visible(_driver_gpu_names(), os.environ.get("CUDA_VISIBLE_DEVICES"))


def _visible(names: tuple[str, ...], visible: str | None) -> tuple[str, ...]:
    """The GPUs ``CUDA_VISIBLE_DEVICES`` lets a process see: its entries up to the first one
    that names no GPU (CUDA ignores the rest), none when one is named twice; an entry by UUID is
    taken on trust."""
    if visible is None or not names:
        return names
    seen: list[str] = []
    entries = [e.strip() for e in visible.split(",")]
    if len(set(entries)) < len(entries):  # CUDA shows no GPU when one is named twice
        return ()
    for entry in entries:
        if entry.isdigit() and int(entry) < len(names):
            seen.append(names[int(entry)])
        elif entry.startswith(("GPU-", "MIG-")):
            seen.append("NVIDIA GPU")
        else:
            break
    return tuple(seen)


def _driver_gpu_names() -> tuple[str, ...]:
    """Names of the NVIDIA GPUs the driver reports, in its order."""
    names: list[str] = []
    try:
        for info in sorted(_PROC_NVIDIA_GPUS.glob("*/information")):
            for line in info.read_text().splitlines():
                if line.startswith("Model:"):
                    names.append(line.partition(":")[2].strip())
                    break
            else:
                names.append("NVIDIA GPU")
    except OSError:
        names = []
    if names:
        return tuple(names)
    # No /proc entries (not Linux, or the driver mounted differently): ask nvidia-smi once.
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ()
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        log.debug("nvidia-smi failed: %s", e)
        return ()
    if out.returncode != 0:
        return ()
    # Lines look like "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-...)".
    for line in out.stdout.splitlines():
        if line.startswith("GPU "):
            name = line.partition(":")[2].split("(UUID")[0].strip()
            names.append(name or "NVIDIA GPU")
    return tuple(names)


def cuda_available() -> bool:
    """True when an NVIDIA GPU with a loaded driver is visible to this process."""
    return bool(gpu_names())


def gpu_fingerprint() -> str:
    """A short hash of the visible GPU models ("" when there is none)."""
    names = gpu_names()
    return hashlib.sha256("|".join(names).encode()).hexdigest()[:8] if names else ""


@functools.cache
def tensorrt_importable() -> bool:
    """True when the ``tensorrt`` package is installed (it is not imported here)."""
    try:
        return importlib.util.find_spec("tensorrt") is not None
    except (ImportError, ValueError):
        return False


@functools.cache
def ort_providers() -> tuple[str, ...]:
    """Execution providers this ONNX Runtime build offers (empty if onnxruntime is missing)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return ()
    return tuple(ort.get_available_providers())


def ort_cuda_available() -> bool:
    """True when ONNX Runtime has the CUDA provider and a GPU is present."""
    return "CUDAExecutionProvider" in ort_providers() and cuda_available()


def tensorrt_available() -> bool:
    """True when TensorRT is installed and a GPU is present (what ``engine='auto'`` asks)."""
    return tensorrt_importable() and cuda_available()


def clear_caches() -> None:
    """Forget every cached probe (for tests, or after changing the environment)."""
    for fn in (physical_cores, cpu_fingerprint, gpu_names, tensorrt_importable, ort_providers):
        fn.cache_clear()
