"""Helpers shared by the tests of the ``cupy`` backend (``tests/test_raw_*.py``)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from npsparseattn.cuda.cupy_raw.emulate import build

try:
    import ml_dtypes
except ImportError:  # NumPy has no bfloat16 of its own
    ml_dtypes = None


class _Dtypes(dict):
    """NumPy dtypes by name; asking for bfloat16 without ml_dtypes skips the test with the reason."""

    def __missing__(self, name):
        pytest.skip(f"{name} arrays need ml_dtypes, which is not installed")


DTYPES = _Dtypes(float16=np.dtype(np.float16))
if ml_dtypes is not None:
    DTYPES["bfloat16"] = np.dtype(ml_dtypes.bfloat16)
DTYPE_NAMES = ("float16", "bfloat16")


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (nearest even; NaN stays NaN) as their uint16 bits, without ml_dtypes."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bits as float32 values."""
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def require_host_compiler() -> None:
    """Skip unless the host C++ compiler that builds the emulation is installed."""
    if shutil.which(build.compiler()[0]) is None:
        pytest.skip(f"host C++ compiler {build.compiler()[0]!r} not found (needed to build the emulation)")


def host_library():
    """The emulated host build of the kernels (built on first use)."""
    require_host_compiler()
    from npsparseattn.cuda.cupy_raw.emulate.host import library

    return library()


def bits(x: np.ndarray) -> np.ndarray:
    """The 16-bit patterns of a float16/bfloat16 array as uint16."""
    return np.ascontiguousarray(x).view(np.uint16)


class RawMode:
    """Where a test runs the ``cupy`` backend: ``"emulated"`` (the host build, NumPy arrays, every CI run)
    or ``"gpu"`` (CuPy arrays on a CUDA GPU; the test carries the ``gpu`` marker and skips without one)."""

    def __init__(self, name: str, monkeypatch):
        self.name = name
        if name == "emulated":
            require_host_compiler()
            monkeypatch.setenv("NPSPARSEATTN_CUDA_EMULATE", "1")
            self.xp = np
        else:
            from npsparseattn.cuda import _env

            monkeypatch.delenv("NPSPARSEATTN_CUDA_EMULATE", raising=False)
            reasons = _env.cupy_reasons()
            if reasons:
                pytest.skip("no GPU for the cupy backend: " + "; ".join(reasons))
            import cupy

            self.xp = cupy

    def put(self, *arrays):
        """NumPy test inputs as this mode's arrays, as a tuple."""
        if self.xp is np:
            return arrays
        try:
            return tuple(self.xp.asarray(a) for a in arrays)
        except (TypeError, ValueError) as err:
            pytest.skip(f"CuPy cannot hold these arrays ({err})")

    def get(self, x) -> np.ndarray:
        """A result as a NumPy array."""
        return x if isinstance(x, np.ndarray) else self.xp.asnumpy(x)


MODES = ["emulated", pytest.param("gpu", marks=pytest.mark.gpu)]


def naive_attention(q, k, v, dout, mask, scale, dtype):
    """Attention and its gradients computed naively in ``dtype``: every intermediate rounded to ``dtype``, matrix
    products accumulated in float32 (what a plain framework implementation does).  ``mask`` (Lq, Lk) bool.

    Returns ``(out, dq, dk, dv)`` as float32 arrays holding ``dtype`` values; flash-attn's test rule bounds a
    kernel's error against the float64 reference by twice this implementation's.
    """
    if q.ndim == 2:
        return tuple(x[0] for x in naive_attention(q[None], k[None], v[None], dout[None], mask, scale, dtype))
    f32 = np.float32

    def r(x):
        return np.asarray(x, f32).astype(dtype).astype(f32)

    group = q.shape[-3] // k.shape[-3]
    kk, vv = (np.repeat(x.astype(f32), group, axis=-3) for x in (k, v))
    qq, do = q.astype(f32), dout.astype(f32)
    s = np.where(mask, r(r(qq @ kk.swapaxes(-1, -2)) * f32(scale)), -np.inf)
    top = s.max(-1, keepdims=True)
    e = r(np.exp(s - np.where(np.isfinite(top), top, 0)))
    den = r(e.sum(-1, keepdims=True))
    p = r(np.where(den > 0, e / np.where(den > 0, den, 1), 0))
    out = r(p @ vv)
    ds = r(p * r(r(do @ vv.swapaxes(-1, -2)) - r((do * out).sum(-1, keepdims=True))))
    dq = r(r(ds @ kk) * f32(scale))
    grouped = k.shape[:-3] + (k.shape[-3], group) + k.shape[-2:]
    dk = r(r(r(ds.swapaxes(-1, -2) @ qq) * f32(scale)).reshape(grouped).sum(-3))
    dv = r(r(p.swapaxes(-1, -2) @ do).reshape(grouped).sum(-3))
    return out, dq, dk, dv


def assert_within_twice_naive(results, naive, reference, labels=("out", "dq", "dk", "dv"), eps=1e-4):
    """flash-attn's rule: max |result - reference| <= 2 * max |naive - reference| + eps, per output."""
    for label, got, low, ref in zip(labels, results, naive, reference):
        ref = np.asarray(ref, np.float64)
        err = np.abs(np.asarray(got, np.float64) - ref).max(initial=0.0)
        bound = 2 * np.abs(np.asarray(low, np.float64) - ref).max(initial=0.0) + eps
        assert err <= bound, f"{label}: error {err:.3g} > 2 x the naive error + eps = {bound:.3g}"


class KernelRunner:
    """Launches single kernel instances on NumPy arrays: on the host build (``"emulated"``) or, copying the
    arrays to the GPU and back, on a CUDA device (``"gpu"``)."""

    def __init__(self, name: str, monkeypatch):
        self.mode = RawMode(name, monkeypatch)
        self.name = name

    def launch(self, kernel, grid, block, shared_bytes, args, schedule=None):
        if self.name == "emulated":
            host_library().launch(kernel, grid, block, shared_bytes, args, schedule=schedule)
            return
        from npsparseattn.cuda.cupy_raw import loader

        on_device = [self.mode.put(a)[0] if isinstance(a, np.ndarray) else a for a in args]
        loader.launcher().launch(kernel, grid, block, shared_bytes, on_device)
        for a, d in zip(args, on_device):
            if isinstance(a, np.ndarray):
                a[...] = self.mode.get(d)
