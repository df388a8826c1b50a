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
zero-copy both ways; JAX: through ``numpy.asarray``); ``ml_dtypes`` is
imported for bfloat16 arrays only.  NumPy and CuPy arguments mixed with
foreign ones are taken as they are (index arrays, say).

Every conversion that can fail happens before ``fn`` runs: the arguments are
read, and the way back is tried on an empty array of every float dtype a
result can have (the arguments' float dtypes, and float32 for ``lse``), so a
function that writes into an argument (the KV cache) never writes and then
fails.

PyTorch tensors with a lazy negation or conjugation (``z.conj().imag``,
``torch._neg_view``) are resolved into a copy first, as DLPack carries no such
flag; an argument the function writes into (``writes=``) is refused instead,
since a copy would not receive the writes.  Under ``torch.compile`` the
conversion and the call run outside the compiler (``torch.compiler.disable``):
a graph break, not an error inside PyTorch's tracer.

This module never imports PyTorch or JAX: an argument's framework is already
in ``sys.modules`` when the caller holds one of its arrays.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from npsparseattn._arrays import array_module, is_cupy_array

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
    """NumPy's bfloat16 dtype (``ml_dtypes``), imported only when a bfloat16 array is converted."""
    try:
        import ml_dtypes
    except ImportError as err:
        raise TypeError(
            "bfloat16 arrays are read as ml_dtypes.bfloat16, and ml_dtypes is not installed: "
            "pip install ml_dtypes (or pip install 'npsparseattn[interop]')"
        ) from err
    return np.dtype(ml_dtypes.bfloat16)


def _is_bfloat16(dtype: Any) -> bool:
    """True for a NumPy/JAX bfloat16 dtype, told by its name (no import of ml_dtypes)."""
    return getattr(dtype, "name", None) == "bfloat16"


def _device_type(x: Any) -> int:
    return int(x.__dlpack_device__()[0])


def _generic_native(x: Any, name: str, written: bool = False) -> Any:
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


def _torch_native(x: Any, name: str, written: bool = False) -> Any:
    torch = sys.modules["torch"]
    if x.requires_grad:
        raise TypeError(
            f"{name} requires grad; npsparseattn's functions take plain arrays: pass {name}.detach(), or use "
            f"npsparseattn.interop.torch.attention for gradients"
        )
    if x.layout != torch.strided:
        raise TypeError(f"{name} is a {x.layout} tensor; pass a dense one ({name}.to_dense())")
    if x.is_conj() or x.is_neg():
        # DLPack has no flag for PyTorch's lazy conjugation/negation: read as is, the values would be wrong
        view = "conjugated" if x.is_conj() else "negated"
        if written:
            raise TypeError(
                f"{name} is a lazily {view} view (PyTorch applies the flag when reading it; DLPack would hand "
                f"over the stored values), and {name} is written in place: pass a tensor without the flag "
                f"({name}.resolve_neg() and .resolve_conj() make copies)"
            )
        x = x.resolve_conj().resolve_neg()
    if x.dtype == torch.bfloat16:
        if x.device.type != "cpu":
            raise TypeError(f"{name} is a bfloat16 GPU tensor; CuPy has no bfloat16 dtype to read it as")
        return np.from_dlpack(x.view(torch.int16)).view(_bfloat16())
    return _generic_native(x, name)


def _torch_back(a: Any, like: Any) -> Any:
    torch = sys.modules["torch"]
    if _is_bfloat16(a.dtype):
        return torch.from_dlpack(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_dlpack(a)


# --------------------------------------------------------------------------- JAX


def _jax_native(x: Any, name: str, written: bool = False) -> Any:
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(x, jax.core.Tracer):
        raise TypeError(
            f"{name} is a JAX tracer (inside jax.jit, grad or vmap); npsparseattn's functions need concrete "
            f"arrays: use npsparseattn.interop.jax.attention, which runs as a host callback"
        )
    if _is_bfloat16(x.dtype) and _device_type(x) == _CPU:
        return np.asarray(x)
    return _generic_native(x, name)


def _jax_back(a: Any, like: Any) -> Any:
    jnp = sys.modules["jax.numpy"]
    if _is_bfloat16(a.dtype):
        return jnp.asarray(a)
    return jnp.from_dlpack(a)


@dataclass(frozen=True)
class Framework:
    """How arrays of one framework are read (``native(x, name, written)``) and given back (``back``)."""

    name: str
    native: Callable[[Any, str, bool], Any]
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
    arrays: list[Any] = field(default_factory=list)

    def native(self, x: Any, name: str, written: bool) -> Any:
        framework = framework_of(x)
        array = framework.native(x, name, written)
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
        self.arrays.append(array)
        return array

    def check_back(self) -> None:
        """Give back an empty array of every float dtype a result can have, so that the way back cannot fail later.

        Results have the float dtypes of the arguments (outputs, gradients),
        or float32 (``lse`` of inputs narrower than float64).
        """
        dtypes = {a.dtype for a in self.arrays if a.dtype.kind == "f" or _is_bfloat16(a.dtype)}
        if any(dtype.name != "float64" for dtype in dtypes):
            dtypes.add(np.dtype(np.float32))
        xp = array_module("cupy" if is_cupy_array(self.arrays[0]) else "numpy")
        for dtype in dtypes:
            self.back(xp.empty(0, dtype))

    def back(self, result: Any) -> Any:
        if isinstance(result, np.ndarray) or is_cupy_array(result):
            return self.framework.back(result, self.like)
        if isinstance(result, tuple):
            return tuple(self.back(r) for r in result)
        if isinstance(result, list):
            return [self.back(r) for r in result]
        return result


def _convert(caller: _Caller, value: Any, name: str, written: bool) -> Any:
    if is_foreign(value):
        return caller.native(value, name, written)
    if isinstance(value, (list, tuple)) and any(is_foreign(v) for v in value):
        return type(value)(
            caller.native(v, f"{name}[{i}]", written) if is_foreign(v) else v for i, v in enumerate(value)
        )
    return value


def _has_foreign(values: Any) -> bool:
    for value in values:
        if is_foreign(value) or (isinstance(value, (list, tuple)) and any(is_foreign(v) for v in value)):
            return True
    return False


def _call_converted(
    fn: Callable[..., Any], signature: inspect.Signature, written: frozenset[str], args: Any, kwargs: Any
) -> Any:
    """Read the foreign arguments, check the way back, call ``fn``, give its arrays back."""
    bound = signature.bind(*args, **kwargs)
    caller = _Caller()
    for name, value in bound.arguments.items():
        bound.arguments[name] = _convert(caller, value, name, name in written)
    caller.check_back()
    return caller.back(fn(*bound.args, **bound.kwargs))


def _torch_compiling() -> bool:
    """True while ``torch.compile`` traces the caller (PyTorch is loaded whenever a caller holds a tensor)."""
    torch = sys.modules.get("torch")
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling is not None and is_compiling())


def accepts_dlpack(fn: F | None = None, *, writes: Iterable[str] = ()) -> Any:
    """Let ``fn`` take DLPack arrays of other frameworks and give back that framework's arrays.

    Calls with NumPy/CuPy arrays only go straight to ``fn``.  Otherwise every
    foreign argument is read as a NumPy (CPU) or CuPy (GPU) array, zero-copy,
    and every array in the result (alone, or in a tuple or list) is handed
    back to the framework of the first foreign argument.  Foreign arrays of
    two frameworks, or on two devices, are a ``TypeError`` naming both.
    ``writes`` names the arguments ``fn`` writes into (they must be read
    zero-copy, so a tensor that would need a copy is refused).  With PyTorch
    loaded, the conversion and the call run outside ``torch.compile``.

    >>> import numpy as np
    >>> @accepts_dlpack
    ... def double(x):
    ...     return 2 * x
    >>> double(np.ones(2))            # NumPy in, NumPy out (no conversion)
    array([2., 2.])
    """
    if fn is None:
        return functools.partial(accepts_dlpack, writes=writes)
    written = frozenset(writes)
    signature = inspect.signature(fn)
    unknown = written - set(signature.parameters)
    if unknown:
        raise TypeError(f"{fn.__name__} has no arguments {sorted(unknown)}")

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not _has_foreign(args) and not _has_foreign(kwargs.values()):
            return fn(*args, **kwargs)
        if _torch_compiling():  # run eagerly: a graph break instead of tracing DLPack's device enums
            return sys.modules["torch"].compiler.disable(_call_converted)(fn, signature, written, args, kwargs)
        return _call_converted(fn, signature, written, args, kwargs)

    return wrapper
