"""Load and launch the ``cupy`` backend's kernels: ``cupy.RawModule`` on a GPU, the host build under emulation.

:func:`launcher` returns the object the backend modules launch through, with
one method, ``launch(name, grid, block, shared_bytes, args)``, the shape of a
CuPy ``RawKernel`` call (``args``: arrays, ``numpy.int32``/``int64``/``float32``
scalars):

* on a GPU, :class:`DeviceKernels` for CuPy's current device: the translation
  unit of the instance's source (:mod:`npsparseattn.cuda.cupy_raw.sources`) is
  compiled lazily by ``RawModule`` with ``name_expressions``, one module per
  (source, element type, head dimension) so a first call compiles a few
  instances rather than all of them, cached per device (and on disk by CuPy,
  keyed by the source text and the options, which carry the source version);
  kernels that need more than 48 KiB of dynamic shared memory get the opt-in
  attribute set once;
* with ``NPSPARSEATTN_CUDA_EMULATE=1``, the host build of the same sources
  (:mod:`npsparseattn.cuda.cupy_raw.emulate.host`), on NumPy arrays.

Nothing here imports CuPy until a GPU launch needs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from npsparseattn.cuda import _env
from npsparseattn.cuda.cupy_raw import nvrtc, sources
from npsparseattn.cuda.cupy_raw.limits import check_launch

PORTABLE_SHARED_BYTES = 48 * 1024


class DeviceKernels:
    """The kernels of one CUDA device, compiled on first use through ``cupy.RawModule``."""

    def __init__(self, device_id: int):
        self.device_id = device_id
        self._modules: dict[tuple[str, tuple[str, ...]], Any] = {}
        self._functions: dict[str, Any] = {}
        self._shared: dict[str, int] = {}

    def function(self, name: str):
        """The ``cupy.RawKernel`` of instance ``name`` (its module compiled now if it was not yet)."""
        fn = self._functions.get(name)
        if fn is None:
            import cupy

            source = sources.source_of(name)
            group = sources.module_group(name)
            module = self._modules.get((source, group))
            if module is None:
                module = cupy.RawModule(
                    code=sources.translation_unit(source),
                    options=tuple(nvrtc.options()),
                    name_expressions=list(group),
                )
                self._modules[(source, group)] = module
            fn = self._functions[name] = module.get_function(name)
        return fn

    def launch(self, name: str, grid: Sequence[int], block: Sequence[int], shared_bytes: int, args: Sequence[Any]):
        """Launch instance ``name`` on CuPy's current stream (:class:`~.limits.LaunchError` if a GPU would refuse
        it: a grid dimension of 0, too many threads, too much shared memory).  Pointer arguments given as
        ``None`` are passed as null pointers."""
        check_launch(name, grid, block, shared_bytes)
        fn = self.function(name)
        if shared_bytes > PORTABLE_SHARED_BYTES and self._shared.get(name, 0) < shared_bytes:
            fn.max_dynamic_shared_size_bytes = shared_bytes
            self._shared[name] = shared_bytes
        values = tuple(np.uint64(0) if a is None else a for a in args)
        fn(tuple(grid), tuple(block), values, shared_mem=shared_bytes)


_DEVICES: dict[int, DeviceKernels] = {}


def launcher():
    """What the backend modules launch through: the host build under emulation, else the current device's kernels."""
    if _env.emulation():
        from npsparseattn.cuda.cupy_raw.emulate.host import library

        return library()
    import cupy

    device_id = cupy.cuda.Device().id
    kernels = _DEVICES.get(device_id)
    if kernels is None:
        kernels = _DEVICES[device_id] = DeviceKernels(device_id)
    return kernels
