"""The CPU's feature flags, and what they mean for int8 matrix products. No torch."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

_PROC_CPUINFO = Path("/proc/cpuinfo")
#: instructions that multiply uint8 by int8 with 32-bit sums (no 16-bit intermediate)
_INT8_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The first CPU's flags from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        text = _PROC_CPUINFO.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def int8_products_saturate(flags: frozenset[str] | None = None, machine: str | None = None) -> bool:
    """True on an x86 CPU without VNNI or AMX: there ONNX Runtime multiplies uint8 activations
    by int8 weights with ``vpmaddubsw``, whose pairwise sums saturate at 16 bits (255 * 127 * 2
    > 32767), and int8 results drift (a tiny test model's embedding cosine to fp32 fell to 0.990
    on a 2-core AVX2 EPYC). Weights in 7 bits (-64..64, "reduced range") keep every pair sum in
    range."""
    arch = (machine or platform.machine()).lower()
    if arch not in ("x86_64", "amd64", "i686", "x86"):
        return False
    have = cpu_flags() if flags is None else flags
    return not (have & _INT8_DOT_FLAGS)
