#!/usr/bin/env python3
"""The cupy backend's first-GPU probes, run by ``make gpu-check`` (``tools/gpu_check.py``) as separate steps.

    python3 tools/gpu_probes.py kernels            # registers, spills, shared memory, occupancy per hot kernel
    python3 tools/gpu_probes.py tiny [--quick]     # small cases: dense, block-sparse, bfloat16 bits, B = 0,
                                                   # misaligned views, deterministic dQ; vs float64 reference
    python3 tools/gpu_probes.py large [--seq L]    # a windowed case over 2^31 elements (64-bit offsets),
                                                   # checked at its far end; dK/dV run to run

``tiny`` is what ``compute-sanitizer`` (memcheck, racecheck, synccheck) runs:
CuPy's memory pool is switched off so that every array is an allocation of
its own and an access past one is seen.  ``tiny`` and ``large`` also run on
the CPU under ``NPSPARSEATTN_CUDA_EMULATE=1`` (NumPy arrays, the host build
of the same sources; ``large`` then at a small ``--seq``), which is how their
plumbing is tested without a GPU.  Each exits with status 1 on a wrong
result; the last line says what was checked.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from npsparseattn import layouts, reference  # noqa: E402
from npsparseattn.cuda import _env  # noqa: E402
from npsparseattn.cuda.cupy_raw import block_sparse, driver, exact, loader, sources  # noqa: E402

HOT = ("npsa_attn_fwd", "npsa_attn_bwd", "npsa_attn_dq", "npsa_bsa_fwd", "npsa_bsa_bwd", "npsa_bsa_dq")
TOLERANCE = {"float16": exact.TOLERANCE["float16"], "bfloat16": exact.TOLERANCE["bfloat16"]}


def array_module():
    """CuPy on a GPU; NumPy under the emulation."""
    if _env.emulation():
        return np
    import cupy

    return cupy


def to_host(x) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else x.get()


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (nearest even), without ml_dtypes."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_values(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


class Failures:
    """Collects failed checks; prints each check as it goes."""

    def __init__(self):
        self.failed: list[str] = []
        self.count = 0

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        self.count += 1
        print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)
        if not ok:
            self.failed.append(name)


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if want.size == 0:
        return 0.0
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


# --------------------------------------------------------------------------- kernels


def kernels() -> int:
    """Registers, local memory, static/dynamic shared memory and active CTAs per SM of every hot kernel (float16,
    D 64 and 128, masked), as the driver compiled them for this GPU."""
    import cupy

    device = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(device.id)
    print(f"{props['name'].decode()}: compute capability {props['major']}.{props['minor']}, "
          f"{props.get('multiProcessorCount')} SMs, {props.get('sharedMemPerMultiprocessor')} B shared memory "
          f"per SM, {props.get('regsPerMultiprocessor')} registers per SM")  # fmt: skip
    kernels = loader.launcher()
    shared = {
        "npsa_attn_fwd": driver.fwd_shared_bytes,
        "npsa_bsa_fwd": lambda d: driver.fwd_shared_bytes(d, sparse=True),
        "npsa_attn_bwd": driver.bwd_shared_bytes,
        "npsa_bsa_bwd": driver.bwd_shared_bytes,
        "npsa_attn_dq": driver.dq_shared_bytes,
        "npsa_bsa_dq": driver.dq_shared_bytes,
    }
    print(f"{'instance':<42} {'regs':>5} {'local':>6} {'dyn smem':>9} {'CTAs/SM':>8} {'compile s':>9}")
    bad = 0
    for d in (64, 128):
        for name in HOT:
            instance = sources.instance(name, "float16", d, True)
            start = time.perf_counter()
            fn = kernels.function(instance)
            seconds = time.perf_counter() - start
            smem = shared[name](d)
            if smem > loader.PORTABLE_SHARED_BYTES:
                fn.max_dynamic_shared_size_bytes = smem
            try:
                from cupy_backends.cuda.api import driver as cuda_driver

                ctas = cuda_driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.kernel.ptr, driver.NTHREADS, smem)
            except Exception as err:  # an older or newer CuPy without this call: say so, keep going
                ctas = f"n/a ({type(err).__name__})"
            bad += fn.local_size_bytes > 0
            print(f"{instance:<42} {fn.num_regs:>5} {fn.local_size_bytes:>6} {smem:>9} {ctas!s:>8} {seconds:>9.1f}")
    print(f"{2 * len(HOT)} hot kernels: {bad} with local memory (spills)")
    return 1 if bad else 0


# --------------------------------------------------------------------------- tiny


def _inputs(xp, rng, shapes, dtype):
    """Random arrays of ``shapes`` as the kernels read them (uint16 bits for bfloat16), and their float64 values."""
    host = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    if dtype == "bfloat16":
        bits = [bf16_bits(x) for x in host]
        return [xp.asarray(b) for b in bits], [bf16_values(b).astype(np.float64) for b in bits], "bfloat16"
    half = [x.astype(np.float16) for x in host]
    return [xp.asarray(h) for h in half], [h.astype(np.float64) for h in half], None


def _values(x, element) -> np.ndarray:
    x = to_host(x)
    return bf16_values(x).astype(np.float64) if element == "bfloat16" else x.astype(np.float64)


def _case(f: Failures, xp, rng, name, *, b, hq, hk, lq, lk, d, dtype, layout=None, window=(None, None),
          deterministic=False, misaligned=False) -> None:  # fmt: skip
    """Forward and backward of one case through the kernel-level modules, against the float64 reference."""
    shapes = [(b, hq, lq, d), (b, hk, lk, d), (b, hk, lk, d), (b, hq, lq, d)]
    arrays, values, element = _inputs(xp, rng, shapes, dtype)
    if misaligned:  # each array a view 1, 3, 5, 7 elements into a buffer: not on a 16-byte boundary
        shifted = []
        for x, offset in zip(arrays, (1, 3, 5, 7)):
            flat = xp.empty(x.size + 16, x.dtype)
            start = (-driver.address(flat) % 16) // x.itemsize + offset
            view = flat[start : start + x.size].reshape(x.shape)
            view[...] = x
            shifted.append(view)
        arrays = shifted
    q, k, v, dout = arrays
    left, right = window
    mask = dict(scale=d**-0.5, offset=lk - lq, left=left, right=right)
    module, args = (block_sparse, (layout,)) if layout is not None else (exact, ())
    out, lse = module.forward(q, k, v, *args, **mask, element=element)
    grads = module.backward(dout, q, k, v, out, lse, *args, **mask, element=element, deterministic=deterministic)
    q64, k64, v64, do64 = values
    kw = dict(window=window, scale=d**-0.5)
    if layout is not None:
        ref_out, ref_lse = reference.block_sparse_attention(q64, k64, v64, layout, **kw)
        ref_grads = reference.block_sparse_attention_backward(do64, q64, k64, v64, layout, **kw)
    else:
        ref_out, ref_lse = reference.attention(q64, k64, v64, **kw)
        ref_grads = reference.attention_backward(do64, q64, k64, v64, **kw)
    errors = [rel_error(_values(x, element), r) for x, r in zip((out, *grads), (ref_out, *ref_grads))]
    lse_h = to_host(lse)
    finite = np.isfinite(ref_lse)
    lse_ok = np.array_equal(np.isneginf(lse_h), ~finite) and (
        not finite.any() or np.abs(lse_h[finite] - ref_lse[finite]).max() < 1e-3
    )
    tol = TOLERANCE[dtype]
    detail = "rel err out/dq/dk/dv " + "/".join(f"{e:.1e}" for e in errors) + f" (bound {tol})"
    f.check(name, lse_ok and all(e <= tol for e in errors), detail)


def tiny(quick: bool) -> int:
    """Small cases of every launch path; under compute-sanitizer with ``quick``."""
    xp = array_module()
    if xp is not np:
        xp.cuda.set_allocator(None)  # every array its own allocation: memcheck sees an access past one
    rng = np.random.default_rng(0)
    f = Failures()
    dims = dict(b=1, hq=2, hk=1, lq=70, lk=90, d=64)
    window_layout = layouts.sliding_window((70, 90), 32, (1, 0))
    _case(f, xp, rng, "dense causal float16", **dims, dtype="float16", window=(None, 0))
    _case(f, xp, rng, "block-sparse float16", **dims, dtype="float16", layout=window_layout, window=(40, 10))
    _case(f, xp, rng, "dense bfloat16 bits (uint16 buffers)", **dims, dtype="bfloat16", window=(30, 5))
    _case(f, xp, rng, "dense deterministic dQ", **dims, dtype="float16", window=(None, 0), deterministic=True)
    _case(f, xp, rng, "block-sparse deterministic dQ", **dims, dtype="float16", layout=window_layout,
          deterministic=True)  # fmt: skip
    _case(f, xp, rng, "misaligned views", **dims, dtype="float16", window=(None, 0), misaligned=True)
    _case(f, xp, rng, "empty batch (B = 0)", **{**dims, "b": 0}, dtype="float16", window=(None, 0))
    if not quick:
        for d in (32, 96, 128):
            _case(f, xp, rng, f"dense D={d} window", **{**dims, "d": d}, dtype="float16", window=(50, 0))
    if xp is not np:
        xp.cuda.Device().synchronize()
    print(f"tiny: {f.count - len(f.failed)} of {f.count} cases right" + (f"; FAILED: {f.failed}" if f.failed else ""))
    return 1 if f.failed else 0


# --------------------------------------------------------------------------- large


def large(seq: int, heads: int, kv_heads: int, d: int, window: int) -> int:
    """Windowed causal attention over more than 2^31 elements of q (64-bit offsets): the far end of the last
    head against the float64 reference, and run-to-run equality of dK/dV (and of the deterministic dQ)."""
    xp = array_module()
    f = Failures()
    elements = heads * seq * d
    print(f"large: B=1 Hq={heads} Hk={kv_heads} L={seq} D={d} window ({window}, 0): {elements} elements in q "
          f"({elements / 2**31:.2f} x 2^31), float16")  # fmt: skip
    start = time.perf_counter()
    if xp is np:
        rng = np.random.default_rng(0)
        q, k, v, dout = (rng.standard_normal((1, h, seq, d), np.float32).astype(np.float16)
                         for h in (heads, kv_heads, kv_heads, heads))  # fmt: skip
    else:
        gen = xp.random.default_rng(0)
        q, k, v, dout = (gen.standard_normal((1, h, seq, d), dtype=xp.float32).astype(xp.float16)
                         for h in (heads, kv_heads, kv_heads, heads))  # fmt: skip
    mask = dict(scale=d**-0.5, offset=0, left=window, right=0)
    out, lse = exact.forward(q, k, v, **mask)
    dq, dk, dv = exact.backward(dout, q, k, v, out, lse, **mask)
    _, dk2, dv2 = exact.backward(dout, q, k, v, out, lse, **mask)
    f.check("dK and dV run to run", bool((dk == dk2).all()) and bool((dv == dv2).all()))
    dq3 = exact.backward(dout, q, k, v, out, lse, **mask, deterministic=True)[0]
    dq4 = exact.backward(dout, q, k, v, out, lse, **mask, deterministic=True)[0]
    f.check("deterministic dQ run to run", bool((dq3 == dq4).all()))
    if xp is not np:
        xp.cuda.Device().synchronize()
    print(f"large: forward and four backwards in {time.perf_counter() - start:.1f} s", flush=True)
    # the last `rows` queries of every head and the keys they see, against the float64 reference; the last
    # `rows` keys are seen only by those queries (right = 0), so their dK/dV are complete in the slice
    rows, keys = 128, 128 + window
    qs, ds = (to_host(x[:, :, seq - rows :]).astype(np.float64) for x in (q, dout))
    ks, vs = (to_host(x[:, :, seq - keys :]).astype(np.float64) for x in (k, v))
    kw = dict(scale=d**-0.5, window=(window, 0))
    ref_out, ref_lse = reference.attention(qs, ks, vs, **kw)
    ref_dq, ref_dk, ref_dv = reference.attention_backward(ds, qs, ks, vs, **kw)
    tol = TOLERANCE["float16"]
    checks = [
        ("out at the far end", out[:, :, seq - rows :], ref_out),
        ("dq at the far end", dq[:, :, seq - rows :], ref_dq),
        ("deterministic dq at the far end", dq3[:, :, seq - rows :], ref_dq),
        ("dk of the last keys", dk[:, :, seq - rows :], ref_dk[:, :, keys - rows :]),
        ("dv of the last keys", dv[:, :, seq - rows :], ref_dv[:, :, keys - rows :]),
    ]
    for name, got, want in checks:
        error = rel_error(to_host(got), want)
        f.check(name, error <= tol, f"rel err {error:.1e} (bound {tol})")
    error = float(np.abs(to_host(lse[:, :, seq - rows :]) - ref_lse).max())
    f.check("lse at the far end", error < 1e-3, f"abs err {error:.1e}")
    print(f"large: {f.count - len(f.failed)} of {f.count} checks right" + (f"; FAILED: {f.failed}" if f.failed else ""))
    return 1 if f.failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="probe", required=True)
    sub.add_parser("kernels", help="registers, spills, shared memory and occupancy per hot kernel (GPU)")
    tiny_parser = sub.add_parser("tiny", help="small cases of every launch path (what compute-sanitizer runs)")
    tiny_parser.add_argument("--quick", action="store_true", help="only the cases every launch path needs")
    large_parser = sub.add_parser("large", help="a windowed case over 2^31 elements")
    large_parser.add_argument("--seq", type=int, default=2**19)
    large_parser.add_argument("--heads", type=int, default=None, help="query heads (default: enough for 2^31)")
    large_parser.add_argument("--kv-heads", type=int, default=8)
    large_parser.add_argument("--dim", type=int, default=128)
    large_parser.add_argument("--window", type=int, default=256)
    args = parser.parse_args(argv)
    if args.probe == "kernels":
        return kernels()
    if args.probe == "tiny":
        return tiny(args.quick)
    heads = args.heads or args.kv_heads * math.ceil(2**31 / (args.seq * args.dim * args.kv_heads) + 0.01)
    return large(args.seq, heads, args.kv_heads, args.dim, args.window)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
