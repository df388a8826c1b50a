"""Arrays from other frameworks in, the caller's kind out: the :func:`accepts_dlpack` decorator.

Every public operation is wrapped once with :func:`accepts_dlpack`.  An
argument that implements DLPack (``__dlpack__``) and is neither a NumPy nor a
CuPy array is *foreign*: a PyTorch tensor, a JAX array, any array-API array.
The wrapper converts foreign arguments (lists and tuples of them included),
calls the function on NumPy/CuPy arrays, and converts the array results back
to the framework of the foreign arguments:

=====================  ==========================================  ======================================
input                  read as                                     result
=====================  ==========================================  ======================================
PyTorch tensor, CPU    ``np.from_dlpack`` (zero-copy, writeable)   ``torch.from_dlpack`` (zero-copy)
PyTorch tensor, CUDA   ``cupy.from_dlpack`` (zero-copy)            ``torch.from_dlpack`` (zero-copy)
JAX array, CPU         ``np.from_dlpack`` (zero-copy, read-only)   ``jax.numpy.from_dlpack``
JAX array, GPU         ``cupy.from_dlpack`` (zero-copy)            ``jax.numpy.from_dlpack``
other ``__dlpack__``   by ``__dlpack_device__``: NumPy or CuPy     its ``__array_namespace__().from_dlpack``
=====================  ==========================================  ======================================

bfloat16 has no DLPack code that NumPy reads, so bfloat16 CPU tensors travel
as their int16 bits and are viewed as ``ml_dtypes.bfloat16`` (PyTorch:
zero-copy both ways; JAX: through ``numpy.asarray``).  NumPy and CuPy
arguments mixed with foreign ones are taken as they are (index arrays, say).

This module never imports PyTorch or JAX: an argument's framework is already
in ``sys.modules`` when the caller holds one of its arrays.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from npsparseattn._arrays import is_cupy_array

F = TypeVar("F", bound=Callable[..., Any])

_CPU = 1  # DLPack device types (dlpack.h: kDLCPU, kDLCUDA, kDLCUDAHost, kDLCUDAManaged)
_CUDA = (2, 13)
_CUDA_HOST = 3


def is_foreign(x: Any) -> bool:
    """True for an object that implements DLPack and is not a NumPy or CuPy array (nor a NumPy scalar)."""
    if isinstance(x, (np.ndarray, np.generic)) or is_cupy_array(x):
        return False
    return hasattr(type(x), "__dlpack__")


def _root(x: Any) -> str:
    return type(x).__module__.split(".", 1)[0]


def _cupy() -> Any:
    try:
        import cupy
    except ImportError as err:  # pragma: no cover - depends on the installation
        raise TypeError("GPU arrays from other frameworks are read through CuPy, which is not installed") from err
    return cupy


def _bfloat16() -> np.dtype:
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def _device_type(x: Any) -> int:
    return int(x.__dlpack_device__()[0])


def _generic_native(x: Any, name: str) -> Any:
    device = _device_type(x)
    if device in (_CPU, _CUDA_HOST):
        return np.from_dlpack(x)
    if device in _CUDA:
        return _cupy().from_dlpack(x)
    raise TypeError(f"{name} is on DLPack device type {device}; arrays on the CPU and CUDA GPUs are supported")


def _generic_back(a: Any, like: Any) -> Any:
    namespace = getattr(like, "__array_namespace__", None)
    return namespace().from_dlpack(a) if namespace is not None else a


# --------------------------------------------------------------------------- PyTorch


def _torch_native(x: Any, name: str) -> Any:
    torch = sys.modules["torch"]
    if x.requires_grad:
        raise TypeError(
            f"{name} requires grad; npsparseattn's functions take plain arrays: pass {name}.detach(), or use "
            f"npsparseattn.interop.torch.attention for gradients"
        )
    if x.dtype == torch.bfloat16:
        if x.device.type != "cpu":
            raise TypeError(f"{name} is a bfloat16 GPU tensor; CuPy has no bfloat16 dtype to read it as")
        return np.from_dlpack(x.view(torch.int16)).view(_bfloat16())
    return _generic_native(x, name)


def _torch_back(a: Any, like: Any) -> Any:
    torch = sys.modules["torch"]
    if a.dtype == _bfloat16():
        return torch.from_dlpack(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_dlpack(a)


# --------------------------------------------------------------------------- JAX


def _jax_native(x: Any, name: str) -> Any:
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(x, jax.core.Tracer):
        raise TypeError(
            f"{name} is a JAX tracer (inside jax.jit, grad or vmap); npsparseattn's functions need concrete "
            f"arrays: use npsparseattn.interop.jax.attention, which runs as a host callback"
        )
    if x.dtype == _bfloat16() and _device_type(x) == _CPU:
        return np.asarray(x)
    return _generic_native(x, name)


def _jax_back(a: Any, like: Any) -> Any:
    jnp = sys.modules["jax.numpy"]
    if a.dtype == _bfloat16():
        return jnp.asarray(a)
    return jnp.from_dlpack(a)


@dataclass(frozen=True)
class Framework:
    """How arrays of one framework are read (``native``) and given back (``back``)."""

    name: str
    native: Callable[[Any, str], Any]
    back: Callable[[Any, Any], Any]


FRAMEWORKS = {
    "torch": Framework("PyTorch", _torch_native, _torch_back),
    "jax": Framework("JAX", _jax_native, _jax_back),
    "jaxlib": Framework("JAX", _jax_native, _jax_back),
}


def framework_of(x: Any) -> Framework:
    """The :class:`Framework` of a foreign array (a generic DLPack one if its package is not known)."""
    root = _root(x)
    return FRAMEWORKS.get(root) or Framework(root, _generic_native, _generic_back)


def _device(x: Any) -> tuple[int, int]:
    device_type, device_id = x.__dlpack_device__()
    return (_CPU, 0) if int(device_type) in (_CPU, _CUDA_HOST) else (int(device_type), int(device_id))


def _device_name(device: tuple[int, int]) -> str:
    return "the CPU" if device[0] == _CPU else f"GPU {device[1]}" if device[0] in _CUDA else f"device {device}"


@dataclass
class _Caller:
    """The framework, device and one example of the foreign arrays of a call."""

    framework: Framework | None = None
    like: Any = None
    name: str = ""
    device: tuple[int, int] | None = None

    def native(self, x: Any, name: str) -> Any:
        framework = framework_of(x)
        array = framework.native(x, name)
        if self.framework is None:
            self.framework, self.like, self.name, self.device = framework, x, name, _device(x)
        elif framework.name != self.framework.name:
            raise TypeError(
                f"{self.name} is a {self.framework.name} array but {name} is a {framework.name} array; "
                f"pass arrays of one framework"
            )
        elif _device(x) != self.device:
            raise TypeError(
                f"{self.name} is on {_device_name(self.device)} but {name} is on {_device_name(_device(x))}; "
                f"pass all arrays on one device"
            )
        return array

    def back(self, result: Any) -> Any:
        if isinstance(result, np.ndarray) or is_cupy_array(result):
            return self.framework.back(result, self.like)
        if isinstance(result, tuple):
            return tuple(self.back(r) for r in result)
        if isinstance(result, list):
            return [self.back(r) for r in result]
        return result


def _convert(caller: _Caller, value: Any, name: str) -> Any:
    if is_foreign(value):
        return caller.native(value, name)
    if isinstance(value, (list, tuple)) and any(is_foreign(v) for v in value):
        return type(value)(caller.native(v, f"{name}[{i}]") if is_foreign(v) else v for i, v in enumerate(value))
    return value


def _has_foreign(values: Any) -> bool:
    for value in values:
        if is_foreign(value) or (isinstance(value, (list, tuple)) and any(is_foreign(v) for v in value)):
            return True
    return False


def accepts_dlpack(fn: F) -> F:
    """Let ``fn`` take DLPack arrays of other frameworks and give back that framework's arrays.

    Calls with NumPy/CuPy arrays only go straight to ``fn``.  Otherwise every
    foreign argument is read as a NumPy (CPU) or CuPy (GPU) array, zero-copy,
    and every array in the result (alone, or in a tuple or list) is handed
    back to the framework of the first foreign argument.  Foreign arrays of
    two frameworks, or on two devices, are a ``TypeError`` naming both.

    >>> import numpy as np
    >>> @accepts_dlpack
    ... def double(x):
    ...     return 2 * x
    >>> double(np.ones(2))            # NumPy in, NumPy out (no conversion)
    array([2., 2.])
    """
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not _has_foreign(args) and not _has_foreign(kwargs.values()):
            return fn(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        caller = _Caller()
        for name, value in bound.arguments.items():
            bound.arguments[name] = _convert(caller, value, name)
        return caller.back(fn(*bound.args, **bound.kwargs))

    return wrapper  # type: ignore[return-value]
