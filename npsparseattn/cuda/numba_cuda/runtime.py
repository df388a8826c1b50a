"""The ``numba-cuda`` backend's driver: how its kernels are built, launched and recorded.

* **Lazy numba-cuda.**  Nothing here imports ``numba.cuda`` or CuPy at import
  time (the registry may import a module only to ask its reasons): kernels are
  built by factories on first use (:func:`kernel`, :func:`device_function`).
* **Arrays and launches.**  On a GPU the kernels read CuPy arrays through
  ``__cuda_array_interface__``, imported with ``sync=False``: numba would
  otherwise synchronise the exporting stream, a host wait per array.  Every
  launch goes to CuPy's current stream (``numba.cuda.external_stream``), on
  the device that holds the arrays, so the kernels order with the caller's
  CuPy work and nothing waits on the host.  Under the simulator
  (``NUMBA_ENABLE_CUDASIM=1``) the same kernels run on the host on NumPy arrays.
* **Recording.**  :func:`record_launches` collects the launches instead of
  running them; the compile checks use it to compile exactly the kernel
  signatures the backend launches, for compute capability 8.0 and 9.0,
  without a GPU (:mod:`npsparseattn.cuda.numba_cuda.compile`).

The declarations of the kernel contract live in :mod:`npsparseattn.cuda.numba_cuda`.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from types import SimpleNamespace
from typing import Any

import numpy as np

from npsparseattn.cuda import _env

UNBOUNDED = 1 << 40  # a window side without a bound
MAX_GRID = 2**31 - 1  # blocks of a one-dimensional grid

_recorder: list[Launch] | None = None


def window_bound(value: int | None) -> int:
    """A window side for the kernels: ``None`` (unbounded) becomes :data:`UNBOUNDED`."""
    return UNBOUNDED if value is None else int(value)


def cuda() -> Any:
    """The ``numba.cuda`` module, imported on first use."""
    from numba import cuda as module

    return module


def kernel(fn: Callable) -> Any:
    """``fn`` as a numba-cuda kernel (compiled on first launch, per argument types)."""
    return cuda().jit(fn)


def device_function(fn: Callable) -> Callable:
    """``fn`` as a device function that kernels call, inlined into them (the simulator calls it as Python).

    Inlining (``forceinline``) matters: the helpers take the callers'
    register arrays (``cuda.local.array``), which stay in registers only if
    every index is a constant once the call is inlined and its loops
    unrolled.  Helpers take what they need as arguments (thread indices
    included) and never reach ``numba.cuda`` themselves.
    """
    if _env.simulator():
        return fn
    jit = cuda().jit
    if "forceinline" in inspect.signature(jit).parameters:
        return jit(device=True, forceinline=True)(fn)
    return jit(device=True, inline="always")(fn)  # numba-cuda before forceinline: inline in numba's IR


def threads_per_block(gpu: int, simulated: int = 32) -> int:
    """``gpu`` threads per block on a GPU, ``simulated`` under the simulator (a Python thread each)."""
    return simulated if _env.simulator() else gpu


@cache
def storage(bf16: bool) -> tuple[Callable, Callable]:
    """``(widen, narrow)``: a stored element to float32, and a float32 value to what is stored.

    bfloat16 arrays reach the kernels viewed as uint16 (:func:`kernel_view`)
    and are converted with bit operations: numba-cuda's own bfloat16 casts
    call a function through the stack (local memory) at every element.
    ``widen`` puts the 16 bits on top of a float32; ``narrow`` rounds to
    nearest even (NaN stays NaN).  The other storage dtypes convert as numba
    casts them.  The simulator runs the same bit operations in NumPy.
    """
    from numba import float32, int32, uint16, uint32

    if not bf16:

        def widen(v):
            return float32(v)

        def narrow(x):
            return x

    elif _env.simulator():

        def widen(v):
            return np.array(int(v) << 16, np.uint32).view(np.float32)[()]

        def narrow(x):
            bits = int(np.array(x, np.float32).view(np.uint32))
            if x != x:
                return np.uint16(0x7FC0)
            return np.uint16(((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF)

    else:
        from numba.cuda import libdevice

        def widen(v):
            return libdevice.int_as_float(int32(uint32(v) << uint32(16)))

        def narrow(x):
            bits = uint32(libdevice.float_as_int(float32(x)))
            rounded = uint16((bits + uint32(0x7FFF) + ((bits >> uint32(16)) & uint32(1))) >> uint32(16))
            return rounded if x == x else uint16(0x7FC0)

    return device_function(widen), device_function(narrow)


def is_bf16(x: Any) -> bool:
    """``x`` holds bfloat16 values (its kernels take the bit-converting instances)."""
    return x.dtype.name == "bfloat16"


def kernel_view(x: Any) -> Any:
    """``x`` as the kernels read it: a bfloat16 array viewed as uint16 (see :func:`storage`), others as they are."""
    return x.view(np.uint16) if is_bf16(x) else x


def blocks(n: int, size: int) -> int:
    """``ceil(n / size)``."""
    return -(-n // size)


@contextlib.contextmanager
def stand_in_device(cc: tuple[int, int]) -> Iterator[None]:
    """Type device functions for compute capability ``cc`` without a GPU.

    numba-cuda compiles a device function for "the current device" when a
    kernel that calls it is typed, which needs a driver; inside this block
    that device is a stand-in of capability ``cc`` (the PTX is made for the
    capability the compiler is asked for).
    """
    from numba.cuda import dispatcher

    original = dispatcher.get_current_device
    dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=cc)
    try:
        yield
    finally:
        dispatcher.get_current_device = original


# --------------------------------------------------------------------------- arrays


def array_module(x: Any) -> Any:
    """NumPy for a NumPy array (the simulator, recording), CuPy for a CuPy array."""
    if isinstance(x, np.ndarray):
        return np
    import cupy

    return cupy


def empty(like: Any, shape: tuple[int, ...], dtype: Any) -> Any:
    """An uninitialised array of the kind of ``like`` (on its device)."""
    return array_module(like).empty(shape, dtype)


@contextlib.contextmanager
def on_device(x: Any) -> Iterator[None]:
    """Allocate and launch on the device that holds ``x`` (nothing to do for NumPy arrays)."""
    if isinstance(x, np.ndarray):
        yield
        return
    with x.device, cuda().gpus[x.device.id]:
        yield


# --------------------------------------------------------------------------- launches


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the kernel, its grid and block sizes and its arguments."""

    kernel: Any
    grid: int
    block: int
    args: tuple[Any, ...]

    def signature(self) -> tuple[Any, ...]:
        """The numba types of the arguments: the kernel instance this launch compiles."""
        try:
            from numba.cuda.typing.typeof import typeof
        except ImportError:  # numba-cuda before it vendored numba's typing
            from numba import typeof
        return tuple(typeof(a) for a in self.args)


def launch(fn: Any, grid: int, block: int, *args: Any) -> None:
    """Run kernel ``fn`` on ``grid`` blocks of ``block`` threads (nothing for an empty grid).

    CuPy arguments go to the kernel as numba device arrays on CuPy's current
    stream (see the module docstring); NumPy arguments run under the simulator.
    """
    if grid <= 0:
        return
    if grid > MAX_GRID:
        raise ValueError(f"the problem needs {grid} thread blocks, more than a CUDA grid holds ({MAX_GRID})")
    if _recorder is not None:
        _recorder.append(Launch(fn, grid, block, args))
        return
    device_args = [_kernel_arg(a) for a in args]
    if any(isinstance(a, np.ndarray) for a in args):
        if not _env.simulator():
            raise TypeError("numba-cuda kernels take CuPy arrays on a GPU (NumPy arrays only under the simulator)")
        fn[grid, block](*device_args)
        return
    import cupy

    stream = cuda().external_stream(cupy.cuda.get_current_stream().ptr)
    fn[grid, block, stream](*device_args)


def _kernel_arg(a: Any) -> Any:
    """A CuPy array as a numba device array (no stream synchronisation); anything else as it is."""
    if isinstance(a, np.ndarray) or not hasattr(a, "__cuda_array_interface__"):
        return a
    return cuda().as_cuda_array(a, sync=False)


@contextlib.contextmanager
def record_launches() -> Iterator[list[Launch]]:
    """Collect the launches made inside the block instead of running them (NumPy stand-ins for the arrays).

    >>> with record_launches() as launches:
    ...     pass
    >>> launches
    []
    """
    global _recorder
    previous, _recorder = _recorder, []
    try:
        yield _recorder
    finally:
        _recorder = previous
