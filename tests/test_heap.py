"""cavmae.heap: the two glibc heap policies, observed through mallinfo2 in a fresh process."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import subprocess
import sys
import textwrap

import pytest

from cavmae import heap

_LIBC = ctypes.util.find_library("c")
pytestmark = pytest.mark.skipif(
    _LIBC is None or not hasattr(ctypes.CDLL(_LIBC), "mallinfo2"), reason="needs glibc >= 2.33 (mallinfo2)"
)

# A 64 MB buffer allocated, measured, freed, measured: before and after a policy is set.
_PROBE = textwrap.dedent("""
    import ctypes, ctypes.util, json, sys
    import numpy as np
    from cavmae import heap

    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                    "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = Info

    def probe():
        a = np.ones(64 << 17)  # 64 MB of float64
        held = libc.mallinfo2()
        del a
        freed = libc.mallinfo2()
        return {"mmapped_while_held": held.hblkhd, "heap_free_after": freed.fordblks}

    out = {"default": probe(), "took": getattr(heap, sys.argv[1])()}
    out["after"] = probe()
    print(json.dumps(out))
""")

MB64 = 64 << 20


def _run(policy: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _PROBE, policy], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_keep_freed_memory_serves_large_buffers_from_the_heap_and_keeps_them() -> None:
    out = _run("keep_freed_memory")
    assert out["took"] is True
    # glibc's default: a 64 MB buffer is its own mapping, handed back when freed
    assert out["default"]["mmapped_while_held"] >= MB64
    assert out["default"]["heap_free_after"] < MB64
    # kept: it comes from the heap, and the heap keeps it for the next allocation
    assert out["after"]["mmapped_while_held"] < MB64
    assert out["after"]["heap_free_after"] >= MB64


def test_steady_heap_gives_large_buffers_back() -> None:
    out = _run("steady_heap")
    assert out["took"] is True
    assert out["after"]["mmapped_while_held"] >= MB64
    assert out["after"]["heap_free_after"] < MB64


def test_policies_are_no_ops_without_mallopt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap, "_mallopt", lambda: None)
    assert heap.keep_freed_memory() is False
    assert heap.steady_heap() is False


def test_a_one_shot_command_ends_with_its_output_and_exit_status(tmp_path):
    """The console script ends a one-shot process (keep_freed_memory) without the interpreter's
    teardown: what the command printed still arrives, through a pipe, with its exit status."""
    script = textwrap.dedent("""
        import sys, click
        from cavmae.cli import main as entry
        from cavmae.heap import is_one_shot, keep_freed_memory

        @click.command()
        @click.argument("code", type=int)
        def once(code):
            assert not is_one_shot()
            keep_freed_memory()
            print("x" * 100000)  # more than a pipe buffer: must be flushed, not lost
            sys.stderr.write("done\\n")
            sys.exit(code)

        entry.cli = once
        entry.main()
        print("not reached", file=sys.stderr)
    """)
    for code in (0, 3):
        out = subprocess.run([sys.executable, "-c", script, str(code)], capture_output=True, text=True, timeout=60)
        assert out.returncode == code and out.stdout == "x" * 100000 + "\n" and out.stderr == "done\n", out.stderr
