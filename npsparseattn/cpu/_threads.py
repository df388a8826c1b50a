"""How the CPU kernels use threads: numba's TBB threading layer, and one BLAS thread inside the kernels.

**Threading layer.**  numba runs ``prange`` loops on one of three layers:
GNU OpenMP (thread-safe, but a ``fork``ed child of a process that used it
aborts), workqueue (fork-safe, but two threads launching kernels at once
abort the process) and Intel TBB (both thread- and fork-safe).  numba picks
the first it can load, and the TBB wheel's library is not on the loader's
path, so numba would settle on OpenMP.  :func:`configure` loads the TBB
library that the ``tbb`` wheel installed and asks numba for TBB, before any
kernel starts numba's threads.  It does nothing when the user chose a layer
(``NUMBA_THREADING_LAYER``), when numba's threads are already running, or
when TBB is not installed (then the layer is numba's own choice, and the
caveats above apply: ``docs/threads.md``).  Measured on a 2-core machine,
TBB runs the tiled kernels as fast as OpenMP.

**BLAS inside the kernels.**  The kernels call BLAS on tiles from inside
numba's threads; BLAS threads started there would fight numba's for the same
cores (a silent 2x loss).  :func:`single_threaded_blas` limits every loaded
BLAS to one thread for the duration of a call.  The limit is process-wide,
so it is counted: the first of several concurrent calls sets it, the last
one restores the caller's setting (two threads that each set and restored it
would leave BLAS single-threaded for the rest of the process).  A ``fork``ed
child starts with the count at zero and the caller's setting restored.

threadpoolctl finds the libraries and reads their settings, but OpenBLAS's
count (process-wide, unless OpenBLAS runs on OpenMP) is set here through
OpenBLAS's own ``openblas_set_num_threads``: threadpoolctl 3.8 lets only one
"controlling" Python thread change it and silently ignores the others, and
without its context manager the first thread that ever set a limit keeps
control for good, so a call from any other thread ran BLAS multi-threaded
inside numba's threads (slower, and rounded differently).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_TBB_NAMES = ("libtbb.so.12", "libtbb.12.dylib", "tbb12.dll")


def tbb_library() -> Path | None:
    """The TBB runtime that the ``tbb`` distribution installed, if any."""
    try:
        files = importlib.metadata.files("tbb") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in files:
        if Path(str(entry)).name in _TBB_NAMES:
            path = Path(str(entry.locate())).resolve()
            if path.exists():
                return path
    return None


def configure() -> str:
    """Ask numba for the TBB layer when the user did not choose one; return what was decided.

    Returns ``"tbb"`` (TBB loaded and requested), ``"user"`` (``NUMBA_THREADING_LAYER`` is set),
    ``"running"`` (numba's threads already started with some layer) or ``"unavailable"`` (no TBB).
    """
    import numba
    from numba.np.ufunc import parallel

    if "NUMBA_THREADING_LAYER" in os.environ:
        return "user"
    if parallel._is_initialized:
        return "running"
    library = tbb_library()
    if library is None:
        return "unavailable"
    ctypes.CDLL(str(library), mode=getattr(os, "RTLD_GLOBAL", 0))
    numba.config.THREADING_LAYER = "tbb"
    return "tbb"


_OPENBLAS_AFFIXES = [(prefix, suffix) for prefix in ("", "scipy_") for suffix in ("", "64_", "_64")]


def thread_setter(lib: Any) -> Callable[[int], Any]:
    """A function that sets the thread count of the BLAS library behind threadpoolctl's controller ``lib``.

    For OpenBLAS on its own threads: its process-wide ``openblas_set_num_threads``
    (under the symbol prefix and suffix of its build), whichever Python
    thread calls; for any other library threadpoolctl's setter.
    """
    if lib.internal_api == "openblas" and getattr(lib, "threading_layer", None) != "openmp":
        for prefix, suffix in _OPENBLAS_AFFIXES:
            setter = getattr(lib.dynlib, f"{prefix}openblas_set_num_threads{suffix}", None)
            if setter is not None:
                return setter
    return lib.set_num_threads


class _BlasLimit:
    """A counted, process-wide limit of BLAS to one thread (see the module docstring)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.depth = 0
        self.libraries: list[tuple[Callable[[], Any], Callable[[int], Any]]] | None = None  # (get, set) per BLAS
        self.saved: list[Any] = []  # the caller's counts, while limited

    def _find(self) -> list[tuple[Callable[[], Any], Callable[[int], Any]]]:
        import scipy.linalg.cython_blas  # noqa: F401  (load SciPy's BLAS so that it is limited too)
        from threadpoolctl import ThreadpoolController

        libs = ThreadpoolController().select(user_api="blas").lib_controllers
        return [(lib.get_num_threads, thread_setter(lib)) for lib in libs]

    def enter(self) -> None:
        with self.lock:
            if self.libraries is None:
                self.libraries = self._find()
            if self.depth == 0:
                self.saved = [get() for get, _ in self.libraries]
                for _, setter in self.libraries:
                    setter(1)
            self.depth += 1

    def _restore(self) -> None:
        for (_, setter), count in zip(self.libraries or (), self.saved):
            if count is not None:
                setter(count)
        self.saved = []

    def exit(self) -> None:
        with self.lock:
            self.depth -= 1
            if self.depth == 0:
                self._restore()

    def after_fork_in_child(self) -> None:
        self.lock = threading.Lock()
        if self.depth:
            self._restore()
        self.depth = 0


_LIMIT = _BlasLimit()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_LIMIT.after_fork_in_child)


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Limit every loaded BLAS to one thread while numba threads run tiles (counted across threads)."""
    _LIMIT.enter()
    try:
        yield
    finally:
        _LIMIT.exit()
