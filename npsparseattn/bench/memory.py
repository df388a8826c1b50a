"""Peak memory of a call, measured as the operating system sees it.

numba's runtime allocates with ``malloc`` outside Python's tracemalloc, so the
process's resident set is measured instead: on Linux the peak counter
(``VmHWM``) is reset through ``/proc/self/clear_refs`` before the call and
read after it.  Elsewhere the measurement falls back to ``tracemalloc``, which
sees NumPy allocations only, and says so.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class PeakMemory:
    """Bytes the call added at its peak above the memory in use before it."""

    extra_bytes: int
    method: str  # "rss" (whole process) or "tracemalloc" (NumPy allocations only)


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _can_reset_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        _status_kib("VmHWM")
    except (OSError, KeyError):
        return False
    return True


def measure_peak(fn: Callable[[], Any]) -> tuple[Any, PeakMemory]:
    """Run ``fn()`` and return its result with the peak extra memory it used."""
    if _can_reset_peak():
        before = _status_kib("VmRSS")
        _CLEAR_REFS.write_text("5")
        result = fn()
        peak = _status_kib("VmHWM")
        return result, PeakMemory(max(peak - before, 0) * 1024, "rss")
    tracemalloc.start()
    try:
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, PeakMemory(peak, "tracemalloc")
