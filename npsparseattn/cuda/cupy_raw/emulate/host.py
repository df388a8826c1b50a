"""Launch kernel instances of the host build on NumPy arrays, through ctypes.

A launch looks like a CuPy ``RawKernel`` call: ``launch(name, grid, block,
shared_bytes, args)`` with ``args`` a sequence of C-contiguous NumPy arrays
(passed as pointers; ``None`` is a null pointer) and ``numpy.int32``, ``uint32``,
``int64``, ``float32`` scalars.  A launch a GPU would refuse (a grid dimension of 0,
too many threads, too much shared memory) raises
:class:`~npsparseattn.cuda.cupy_raw.limits.LaunchError` first, as the GPU loader
does.  The parameter types are checked against the instance's C++ signature (the
library reports it), every array's bytes are registered as the global memory the
kernel may touch, and an emulator failure (an access outside those arrays, a
deadlock, warp divergence in a collective) raises :class:`EmulationError` with its
message.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from npsparseattn.cuda.cupy_raw.emulate.build import library_path
from npsparseattn.cuda.cupy_raw.limits import STRICTEST, Limits, check_launch

_LOCK = threading.Lock()  # the emulator keeps one launch state: one launch at a time
REVERSE, GREEDY, EAGER_COPIES, RELAXED, REVERSE_BLOCKS = 1, 2, 4, 8, 16
"""Schedule flags (``npsa_emu::ScheduleFlags``, see ``npsa_host.h``): threads last-first; always resume the
first ready thread (warps run ahead of each other from barrier to barrier); cp.async copies land at issue;
RELAXED: without the strict checks (races, uninitialised shared reads, barrier divergence); REVERSE_BLOCKS:
the grid's blocks last-first (atomic additions from different blocks in another order)."""
SCHEDULE = 0
"""Default schedule of :meth:`HostLibrary.launch`: strict, threads in order (tests set it to run every kernel
under another schedule)."""


class EmulationError(RuntimeError):
    """A kernel broke a rule the emulator checks (like a CUDA launch error on a GPU)."""


def _code(arg: Any) -> str:
    if arg is None or isinstance(arg, np.ndarray):
        return "p"
    if isinstance(arg, np.int32):
        return "i"
    if isinstance(arg, np.uint32):
        return "u"
    if isinstance(arg, np.int64):
        return "l"
    if isinstance(arg, np.float32):
        return "f"
    raise TypeError(f"kernel arguments are NumPy arrays and numpy int32, uint32, int64 or float32 scalars; got {arg!r}")


class HostLibrary:
    """The loaded host build: instance names, their signatures, and :meth:`launch`."""

    def __init__(self, path: str | os.PathLike):
        lib = ctypes.CDLL(str(path))
        lib.npsa_emu_count.restype = ctypes.c_int
        lib.npsa_emu_name.restype = ctypes.c_char_p
        lib.npsa_emu_name.argtypes = [ctypes.c_int]
        lib.npsa_emu_signature.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.npsa_emu_launch.restype = ctypes.c_int
        lib.npsa_emu_launch.argtypes = [
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_uint),
            ctypes.POINTER(ctypes.c_uint),
            ctypes.c_uint,
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.POINTER(ctypes.c_ulonglong),
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_char_p,
            ctypes.c_int,
        ]
        self._lib = lib
        self.index = {lib.npsa_emu_name(i).decode(): i for i in range(lib.npsa_emu_count())}
        self.path = str(path)

    def signature(self, name: str) -> str:
        """Parameter types of instance ``name``, a letter each: p pointer, i int, u unsigned, l long long, f float."""
        buf = ctypes.create_string_buffer(256)
        self._lib.npsa_emu_signature(self._find(name), buf, 256)
        return buf.value.decode()

    def _find(self, name: str) -> int:
        try:
            return self.index[name]
        except KeyError:
            raise KeyError(f"the host build has no kernel instance {name!r}") from None

    def launch(
        self,
        name: str,
        grid: Sequence[int],
        block: Sequence[int],
        shared_bytes: int,
        args: Sequence[Any],
        *,
        schedule: int | None = None,
        limits: Limits = STRICTEST,
    ) -> None:
        """Run instance ``name`` on the host under ``schedule`` (flags :data:`REVERSE`, :data:`GREEDY`,
        :data:`EAGER_COPIES`, :data:`RELAXED`; default :data:`SCHEDULE`), within the launch ``limits`` of
        an architecture (default: the stricter of sm_80 and sm_90)."""
        index = self._find(name)
        check_launch(name, grid, block, shared_bytes, limits=limits)
        schedule = SCHEDULE if schedule is None else schedule
        codes = "".join(_code(a) for a in args)
        expected = self.signature(name)
        if codes != expected:
            raise TypeError(f"{name} takes parameters {expected!r}, got {codes!r}")
        holders, ranges = [], []
        for arg in args:
            if arg is None:
                holders.append(ctypes.c_void_p(0))
            elif isinstance(arg, np.ndarray):
                if not arg.flags.c_contiguous:
                    raise ValueError(f"{name}: array arguments must be C-contiguous")
                ptr = arg.ctypes.data
                holders.append(ctypes.c_void_p(ptr))
                ranges += [ptr, ptr + arg.nbytes]
            else:
                kind = {"i": ctypes.c_int32, "u": ctypes.c_uint32, "l": ctypes.c_int64, "f": ctypes.c_float}[_code(arg)]
                holders.append(kind(arg))
        pointers = (ctypes.c_void_p * max(1, len(holders)))(*[ctypes.addressof(h) for h in holders])
        dims = [(list(d) + [1, 1, 1])[:3] for d in (grid, block)]
        err = ctypes.create_string_buffer(1024)
        with _LOCK:
            rc = self._lib.npsa_emu_launch(
                index,
                (ctypes.c_uint * 3)(*dims[0]),
                (ctypes.c_uint * 3)(*dims[1]),
                int(shared_bytes),
                pointers,
                (ctypes.c_ulonglong * max(1, len(ranges)))(*ranges),
                len(ranges) // 2,
                int(schedule),
                limits.max_shared,
                err,
                len(err),
            )
        if rc != 0:
            raise EmulationError(f"{name}: {err.value.decode(errors='replace')}")


@lru_cache(maxsize=1)
def library() -> HostLibrary:
    """The host build for the current sources (built on first use, then cached on disk)."""
    return HostLibrary(library_path())


def library_of(names: tuple[str, ...]) -> HostLibrary:
    """A host build of the instances ``names`` only (seconds instead of a minute: tests of edited sources)."""
    return HostLibrary(library_path(tuple(names)))
