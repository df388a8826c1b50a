"""What the machine offers the GPU backends, as reasons a backend cannot run (empty: it can).

Checked lazily and cached: a package is looked up with ``importlib.util.find_spec``
(not imported) until a GPU backend is actually consulted, and the device query
runs once per process.  The two host-side modes are switched by environment
variables read when asked, so a test can set them:

* ``NUMBA_ENABLE_CUDASIM=1`` (set before numba is imported): numba-cuda's
  simulator runs its kernels on the host, and the ``numba-cuda`` backend takes
  NumPy arrays;
* ``NPSPARSEATTN_CUDA_EMULATE=1``: the ``cupy`` backend runs its CUDA C++
  sources compiled for the host on NumPy arrays.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

INSTALL_HINT = "pip install 'npsparseattn[cuda]'"
MIN_COMPUTE_CAPABILITY = (8, 0)  # Ampere: mma.sync m16n8k16 for float16/bfloat16, cp.async


def simulator() -> bool:
    """True when numba-cuda's simulator is on (``NUMBA_ENABLE_CUDASIM=1``)."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"


def emulation() -> bool:
    """True when the ``cupy`` backend runs its sources on the host (``NPSPARSEATTN_CUDA_EMULATE=1``)."""
    return os.environ.get("NPSPARSEATTN_CUDA_EMULATE", "0") == "1"


def missing_package(module: str, package: str) -> str | None:
    """A reason naming ``package`` and the install command if ``module`` cannot be imported, else ``None``."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"{package} is not installed ({INSTALL_HINT})"


@lru_cache(maxsize=1)
def _device() -> tuple[str | None, tuple[int, int] | None]:
    """``(reason, compute capability)`` of CuPy's current device; the reason is ``None`` when there is one."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA GPU found", None
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        return None, (int(props["major"]), int(props["minor"]))
    except Exception as err:  # no driver, no device, a broken install: all mean "no GPU here"
        return f"no usable CUDA GPU ({type(err).__name__}: {err})", None


def device_reasons(minimum: tuple[int, int] = MIN_COMPUTE_CAPABILITY) -> list[str]:
    """Reasons the current CUDA device cannot run a kernel that needs compute capability ``minimum``."""
    reason, capability = _device()
    if reason is not None:
        return [reason]
    if capability < minimum:
        return [
            f"the GPU has compute capability {capability[0]}.{capability[1]}; "
            f"{minimum[0]}.{minimum[1]} or newer is needed"
        ]
    return []


def cupy_reasons(minimum: tuple[int, int] = MIN_COMPUTE_CAPABILITY) -> list[str]:
    """Reasons CuPy arrays cannot be computed on here: CuPy missing, no GPU, or one too old."""
    missing = missing_package("cupy", "CuPy (cupy-cuda13x)")
    return [missing] if missing else device_reasons(minimum)


def numba_cuda_reasons(minimum: tuple[int, int] = MIN_COMPUTE_CAPABILITY) -> list[str]:
    """Reasons the ``numba-cuda`` backend cannot run here.

    numba-cuda missing; under the simulator nothing else is needed (it runs on
    the host); otherwise CuPy missing, no GPU or one too old
    (:func:`cupy_reasons`), or numba-cuda unable to use the driver or to find
    NVVM (:func:`_numba_gpu_reasons`).
    """
    missing = missing_package("numba_cuda", "numba-cuda")
    if missing:
        return [missing]
    if simulator():
        return []
    return cupy_reasons(minimum) or list(_numba_gpu_reasons())


@lru_cache(maxsize=1)
def _numba_gpu_reasons() -> tuple[str, ...]:
    """Why numba-cuda cannot compile for and launch on the GPU that CuPy found (checked once per process)."""
    try:
        from numba import cuda
        from numba.cuda.cudadrv import nvvm

        if not cuda.is_available():
            return ("numba-cuda cannot use the CUDA driver (numba.cuda.is_available() is False)",)
        nvvm.NVVM()
    except Exception as err:  # a missing NVVM wheel or a broken driver both mean "cannot compile here"
        return (f"numba-cuda cannot compile for this GPU ({type(err).__name__}: {err}; {INSTALL_HINT})",)
    return ()
