"""Helpers shared by the tests of the ``cupy`` backend (``tests/test_raw_*.py``)."""

from __future__ import annotations

import shutil

import ml_dtypes
import numpy as np
import pytest

from npsparseattn.cuda.emulate import build

DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def require_host_compiler() -> None:
    """Skip unless the host C++ compiler that builds the emulation is installed."""
    if shutil.which(build.compiler()[0]) is None:
        pytest.skip(f"host C++ compiler {build.compiler()[0]!r} not found (needed to build the emulation)")


def host_library():
    """The emulated host build of the kernels (built on first use)."""
    require_host_compiler()
    from npsparseattn.cuda.emulate.host import library

    return library()


def bits(x: np.ndarray) -> np.ndarray:
    """The 16-bit patterns of a float16/bfloat16 array as uint16."""
    return np.ascontiguousarray(x).view(np.uint16)
