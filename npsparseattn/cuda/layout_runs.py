"""The one device cache of block-sparse layout runs, shared by both GPU backends.

The kernels walk a :class:`~npsparseattn.layouts.BlockLayout` row as *runs*
of consecutive stored blocks (:meth:`~npsparseattn.layouts.BlockLayout.runs`):
int32 ``(ptr, start, stop)`` arrays, of the layout for the forward and of its
transpose for the key side of the backward.  They are made once per layout
object, transposition and device, uploaded to the device that holds the
call's arrays (allocated there, whatever CuPy's current device is), and kept
while the layout is among the :data:`CACHED` most recently used.  A cache
entry holds its layout, so the ``id`` in its key is not reused while it
lives.  Dense attention is one run covering every key (:func:`single_run`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np

CACHED = 32
_CACHE: OrderedDict[tuple[int, bool, int | None], tuple[Any, tuple[Any, Any, Any]]] = OrderedDict()
_SINGLE: dict[int | None, tuple[Any, Any, Any]] = {}


def device_key(x: Any) -> int | None:
    """The CUDA device that holds ``x``; ``None`` for a NumPy array (the simulator, the host emulation)."""
    return None if isinstance(x, np.ndarray) else int(x.device.id)


def upload(like: Any, x: np.ndarray) -> Any:
    """The host array ``x`` as an array of the kind of ``like``: a copy allocated on the device that holds it."""
    if isinstance(like, np.ndarray):
        return np.asarray(x)
    import cupy

    with like.device:
        return cupy.asarray(x)


def device_runs(layout: Any, like: Any, transposed: bool = False) -> tuple[Any, Any, Any]:
    """int32 ``(ptr, start, stop)`` of the runs of ``layout`` (of its transpose if ``transposed``), on the device
    of ``like``.  ``ValueError`` if they do not fit int32."""
    key = (id(layout), transposed, device_key(like))
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is layout:
        _CACHE.move_to_end(key)
        return hit[1]
    runs = (layout.transpose() if transposed else layout).runs()
    if int(runs[0][-1]) >= 2**31:
        raise ValueError(f"layout has {int(runs[0][-1])} runs; the GPU kernels index them with int32")
    arrays = tuple(upload(like, np.ascontiguousarray(a, dtype=np.int32)) for a in runs)
    _CACHE[key] = (layout, arrays)
    while len(_CACHE) > CACHED:
        _CACHE.popitem(last=False)
    return arrays


def single_run(like: Any) -> tuple[Any, Any, Any]:
    """The runs of a one-block layout (every key of every query), on the device of ``like``; uploaded once."""
    key = device_key(like)
    if key not in _SINGLE:
        _SINGLE[key] = tuple(upload(like, np.array(a, np.int32)) for a in ([0, 1], [0], [1]))
    return _SINGLE[key]


def clear() -> None:
    """Drop every cached run (tests; or to free device memory)."""
    _CACHE.clear()
    _SINGLE.clear()
