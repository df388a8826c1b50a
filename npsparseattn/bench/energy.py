"""GPU energy of a call, from NVML's energy counter (``nvidia-ml-py``).

NVML reports the energy a GPU has used since the driver loaded
(``nvmlDeviceGetTotalEnergyConsumption``, millijoules, Volta and newer).
Reading it before and after a call gives the call's energy, including idle
power for its duration.  Without a GPU, NVML or the package, nothing is
measured and the reason is returned instead: a benchmark prints it in place
of the number, e.g. ``n/a (no GPU)``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any


@cache
def _nvml() -> tuple[Any, str | None]:
    """``(pynvml, None)`` once NVML is initialised, else ``(None, reason)``."""
    try:
        import pynvml
    except ImportError:
        return None, "no GPU energy: nvidia-ml-py not installed"
    try:
        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() == 0:
            return None, "no GPU"
        pynvml.nvmlDeviceGetTotalEnergyConsumption(pynvml.nvmlDeviceGetHandleByIndex(0))
    except pynvml.NVMLError_NotSupported:
        return None, "GPU does not report energy"
    except pynvml.NVMLError:
        return None, "no GPU"
    return pynvml, None


def energy_unavailable(kind: str = "cupy") -> str | None:
    """Why the energy of a call on arrays of ``kind`` cannot be measured (``None``: it can).

    Only GPU runs are measured: NVML sees the GPU, not the CPU that runs
    the ``numba`` kernels.

    >>> energy_unavailable("numpy") is not None  # CPU arrays: never measured
    True
    """
    _, reason = _nvml()
    if reason is not None:
        return reason
    return "CPU run" if kind == "numpy" else None


def measure_energy(fn: Callable[[], Any], device: int = 0) -> tuple[Any, float]:
    """Run ``fn()`` and return ``(result, joules)`` used by GPU ``device`` meanwhile.

    ``fn`` must synchronise the GPU before returning, or the energy of work
    still queued is missed.  Raises ``RuntimeError`` with the reason when
    :func:`energy_unavailable` gives one.
    """
    pynvml, reason = _nvml()
    if reason is not None:
        raise RuntimeError(f"cannot measure GPU energy: {reason}")
    handle = pynvml.nvmlDeviceGetHandleByIndex(device)
    start = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    result = fn()
    end = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    return result, (end - start) / 1e3


def energy_per_token(fn: Callable[[], Any], kind: str, tokens: int) -> tuple[float | None, str | None]:
    """``(joules per token, None)`` for one call of ``fn`` on ``kind`` arrays, or ``(None, reason)``.

    >>> energy_per_token(lambda: None, "numpy", 1024)[0] is None
    True
    """
    reason = energy_unavailable(kind)
    if reason is not None:
        return None, reason
    _, joules = measure_energy(fn)
    return joules / tokens, None


def format_energy_per_token(joules_per_token: float | None, reason: str | None) -> str:
    """``'2.1 mJ'`` or ``'n/a (no GPU)'`` for a table cell.

    >>> format_energy_per_token(None, "no GPU")
    'n/a (no GPU)'
    >>> format_energy_per_token(2.1e-3, None)
    '2.1 mJ'
    """
    if joules_per_token is None:
        return f"n/a ({reason})"
    for unit, factor in (("J", 1.0), ("mJ", 1e-3), ("µJ", 1e-6)):
        if joules_per_token >= factor:
            return f"{joules_per_token / factor:.3g} {unit}"
    return f"{joules_per_token / 1e-9:.3g} nJ"
