"""Parallel CPU kernels compiled twice per dtype at most: for C-contiguous arrays, and once for any strides.

numba compiles one machine-code version of a kernel per combination of
argument types, and an array's type includes its layout (C-contiguous or
not) and whether it is read-only.  The attention kernels read their inputs
in place through a row stride, so a transposed ``q`` with a contiguous
``k``, a read-only broadcast ``v`` and so on would each compile their own
version (10-30 s each, then cached): a kernel with five array arguments has
dozens of such combinations.

:func:`kernel` compiles a kernel lazily for the common case, every array
argument C-contiguous and writeable, and sends every other call to one
version per dtype whose array arguments are typed ``'A'`` (any strides;
the read-only ones as read-only), compiled with an explicit signature on
first use.  numba converts C-contiguous and writeable arrays to those types
without a copy, so one general version serves every mix of layouts.  Both
versions are cached on disk like any ``cache=True`` kernel.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from numba import njit, typeof
from numba.core import types

from npsparseattn.cpu._tiles import FASTMATH

__all__ = ["Kernel", "kernel"]


class Kernel:
    """A parallel ``njit`` kernel with one compiled version for C-contiguous arrays and one for any strides."""

    def __init__(self, func: Callable[..., Any], writes: Iterable[str], fastmath: Any) -> None:
        self._options = {"parallel": True, "cache": True, "fastmath": fastmath}
        self.contiguous = njit(**self._options)(func)
        names = list(inspect.signature(func).parameters)
        unknown = set(writes) - set(names)
        if unknown:
            raise TypeError(f"{func.__name__} has no arguments {sorted(unknown)}")
        self._writes = tuple(name in set(writes) for name in names)
        self._func = func
        self._general: dict[tuple[Any, ...], Any] = {}
        self.__doc__ = func.__doc__
        self.__name__ = func.__name__

    def __call__(self, *args: Any) -> Any:
        if all(not isinstance(a, np.ndarray) or (a.flags.c_contiguous and a.flags.writeable) for a in args):
            return self.contiguous(*args)
        return self.general(args)(*args)

    def general(self, args: tuple[Any, ...]) -> Any:
        """The version whose array arguments have any strides, for the dtypes and ranks of ``args``."""
        sig = tuple(self._type(a, writes) for a, writes in zip(args, self._writes, strict=True))
        if sig not in self._general:
            self._general[sig] = njit([sig], **self._options)(self._func)
        return self._general[sig]

    @staticmethod
    def _type(arg: Any, writes: bool) -> Any:
        if isinstance(arg, np.ndarray):
            return types.Array(typeof(arg).dtype, arg.ndim, "A", readonly=not writes)
        return typeof(arg)


def kernel(*, writes: Iterable[str], fastmath: Any = FASTMATH) -> Callable[[Callable[..., Any]], Kernel]:
    """Decorator: ``func`` as a :class:`Kernel`; ``writes`` names the array arguments it writes."""
    return lambda func: Kernel(func, writes, fastmath)
