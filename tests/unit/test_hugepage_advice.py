"""The seccomp filter that keeps QEMU's RAM in small pages, in a real child process."""

from __future__ import annotations

import subprocess
import sys

import pytest

from wrenn.agent.vmm.qemu import hugepage_advice

pytestmark = pytest.mark.skipif(not hugepage_advice.supported(), reason="x86-64 Linux only")

#: Maps 4 MiB, advises MADV_HUGEPAGE (and MADV_DONTDUMP, which must still work) and prints the
#: advice's result and the mapping's VmFlags.
_CHILD = """
import ctypes, mmap
libc = ctypes.CDLL(None, use_errno=True)
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
m = mmap.mmap(-1, 4 << 20)
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
print(libc.madvise(addr, 4 << 20, mmap.MADV_HUGEPAGE), libc.madvise(addr, 4 << 20, 16))
start = f"{addr:x}-"
lines = open("/proc/self/smaps").read().splitlines()
at = next(i for i, line in enumerate(lines) if line.startswith(start))
print(next(line for line in lines[at:] if line.startswith("VmFlags")))
"""


def _run(preexec: object) -> tuple[str, list[str]]:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD],
        preexec_fn=preexec,  # type: ignore[arg-type]
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.splitlines()
    return out[0], out[1].split()[1:]


def test_without_the_filter_the_advice_marks_the_mapping() -> None:
    results, flags = _run(None)
    assert results == "0 0"
    assert "hg" in flags and "dd" in flags


def test_the_filter_answers_the_advice_without_running_it_and_lets_the_rest_through() -> None:
    results, flags = _run(hugepage_advice.installer())
    assert results == "0 0"
    assert "hg" not in flags
    assert "dd" in flags  # MADV_DONTDUMP went through
