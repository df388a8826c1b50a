"""Parallel CPU kernels with one compiled version per dtype (two for kernels that read strided rows).

numba compiles one machine-code version of a kernel per combination of
argument types, and an array's type includes its layout (C-contiguous or
not) and whether it is read-only.  Left to itself it would compile a
version for every mix of contiguous, strided, read-only (a JAX array, a
broadcast) and writeable arguments a caller happens to pass: 10-30 s each
on first use, and dozens of mixes for a kernel with five array arguments.

:func:`kernel` compiles each kernel with explicit signatures, on first use:
every array argument typed C-contiguous, and the arguments the kernel does
not write typed read-only.  numba converts writeable arrays to read-only
types without a copy, so one version per dtype serves them all.  A kernel
declared ``strided=True`` (one that reads row-strided views in place, such
as the KV cache's pages) has a second version per dtype whose arrays are all
typed ``'A'`` (any strides), used when any argument is not C-contiguous; the
others refuse such arguments (their public layer copies them first).  Every
version is cached on disk like any ``cache=True`` kernel.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from numba import njit, typeof
from numba.core import types
from numba.np.numpy_support import from_dtype

from npsparseattn.cpu._tiles import FASTMATH

__all__ = ["Kernel", "kernel"]


class Kernel:
    """A parallel ``njit`` kernel compiled for C-contiguous arrays (and, if ``strided``, once for any strides)."""

    def __init__(self, func: Callable[..., Any], writes: Iterable[str], fastmath: Any, strided: bool) -> None:
        names = list(inspect.signature(func).parameters)
        unknown = set(writes) - set(names)
        if unknown:
            raise TypeError(f"{func.__name__} has no arguments {sorted(unknown)}")
        self._writes = tuple(name in set(writes) for name in names)
        self._func = func
        self.strided = strided
        self._options = {"parallel": True, "cache": True, "fastmath": fastmath}
        self.versions: dict[tuple[Any, ...], Any] = {}
        self.__doc__ = func.__doc__
        self.__name__ = func.__name__

    def __call__(self, *args: Any) -> Any:
        return self.version(args)(*args)

    def version(self, args: tuple[Any, ...]) -> Any:
        """The compiled version for the dtypes, ranks and layouts of ``args`` (compiled or loaded on first use)."""
        arrays = [a for a in args if isinstance(a, np.ndarray)]  # not those inside tuples: typed 'A' (_type)
        layout = "C" if all(a.flags.c_contiguous for a in arrays) else "A"
        if layout == "A" and not self.strided:
            raise TypeError(f"{self.__name__} reads C-contiguous arrays only (its public layer copies others)")
        sig = tuple(self._type(a, writes, layout) for a, writes in zip(args, self._writes, strict=True))
        if sig not in self.versions:
            self.versions[sig] = njit([sig], **self._options)(self._func)
        return self.versions[sig]

    @staticmethod
    def _type(arg: Any, writes: bool, layout: str) -> Any:
        if isinstance(arg, np.ndarray):
            return types.Array(from_dtype(arg.dtype), arg.ndim, layout, readonly=not writes)
        if isinstance(arg, tuple):  # arrays in a tuple (score modifications): any strides, read-only unless writeable
            return types.Tuple(
                [
                    types.Array(from_dtype(a.dtype), a.ndim, "A", readonly=not a.flags.writeable)
                    if isinstance(a, np.ndarray)
                    else typeof(a)
                    for a in arg
                ]
            )
        return typeof(arg)


def kernel(
    *, writes: Iterable[str], fastmath: Any = FASTMATH, strided: bool = False
) -> Callable[[Callable[..., Any]], Kernel]:
    """Decorator: ``func`` as a :class:`Kernel`; ``writes`` names the array arguments it writes."""
    return lambda func: Kernel(func, writes, fastmath, strided)
