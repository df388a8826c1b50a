"""The one table of implementations: operation x backend x the kernels behind each.  Data only.

Everything that lists implementations is derived from :data:`OPERATIONS`,
:data:`BACKENDS` and :data:`ENTRIES`, so nothing else names them again:

* the registry's rows (:data:`npsparseattn._dispatch._TABLE`): operation,
  backend, module path, the backend's priority and whether ``backend="auto"``
  may choose it;
* the ahead-of-time compile groups of the CPU kernels
  (:mod:`npsparseattn.cpu.precompile`: each ``numba`` entry's warm-up
  ``group`` and ``phase``);
* the numba-cuda compile checks (:mod:`npsparseattn.cuda.numba_cuda.compile`:
  each ``numba-cuda`` entry's ``group`` names the example calls whose
  launches are compiled for sm_80/sm_90);
* the ``cupy`` backend's CUDA C++ instances
  (:mod:`npsparseattn.cuda.cupy_raw.sources`: each entry's ``source`` file and
  its kernels with their template parameters), which NVRTC compiles in CI,
  the host emulation builds and CuPy loads on a GPU;
* the tests' backend axis (``tests/conftest.py``: a fixture
  ``<short>_backend`` per operation);
* the backend tables of the documentation (:func:`markdown`; a test keeps
  ``docs/design.md`` equal to it; ``python -c "from npsparseattn import
  _backend_table as t; print(t.markdown())"`` prints them).

The module imports nothing from the package: it sits at the bottom of the
import chain, beside the argument checks, and the registry, the backend
modules, the build helpers and the tests all read it.

Adding an operation is one :class:`Operation` and one :class:`Entry` per
backend that implements it, plus the modules the entries name.  For example,
index-driven sparse attention with a CPU kernel and an oracle is::

    Operation("sparse_attention", "sparse", "attention over the key blocks each query block's list names")
    Entry("sparse_attention", "numba", "sparse", group="sparse_walk", phase=2)
    Entry("sparse_attention", "reference", "sparse")

and a numba-cuda kernel would add
``Entry("sparse_attention", "numba-cuda", "sparse", group="sparse_attention")``
(``group`` names a warm-up function in ``cpu/precompile.py`` and an example
call in ``cuda/numba_cuda/compile.py``; an entry without a group has no
kernels compiled ahead of time).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backend:
    """A backend: where its modules live, its place in automatic selection, and what the docs say of it.

    ``priority``: lower is tried first by ``backend="auto"``; ``auto=False``:
    only taken when named (the float64 reference, O(L^2) in memory).
    """

    name: str
    package: str
    priority: int
    auto: bool
    runs_on: str
    written_with: str
    status: str


@dataclass(frozen=True)
class Operation:
    """A registry operation; ``short`` names its test fixture (``<short>_backend``); ``kernels``: the functions a
    backend module of it defines (the kernel contract of :mod:`npsparseattn.problems`); ``alias_of``: it runs
    the kernels of that operation (ring attention runs the attention kernels block by block)."""

    name: str
    short: str
    summary: str
    kernels: tuple[str, ...] = ("forward", "backward")
    alias_of: str | None = None


@dataclass(frozen=True)
class CudaKernel:
    """One ``__global__`` template of a ``.cu`` source and its template parameters, in order: ``T`` element
    type, ``D`` head dimension, ``M`` masked.  ``hot``: must not spill registers (checked from ptxas)."""

    name: str
    params: str
    hot: bool = False


@dataclass(frozen=True)
class Entry:
    """One backend's implementation of one operation.

    ``module`` is relative to the backend's package.  ``group``: the
    ahead-of-time group that compiles its kernels (``numba``: a warm-up
    group of ``cpu/precompile.py``, run in ``phase``; ``numba-cuda``: an
    example call of ``cuda/numba_cuda/compile.py``).  ``source`` and
    ``kernels``: the CUDA C++ file of a ``cupy`` entry and its kernels.
    """

    op: str
    backend: str
    module: str
    group: str | None = None
    phase: int = 1
    source: str | None = None
    kernels: tuple[CudaKernel, ...] = ()

    @property
    def path(self) -> str:
        """The module's import path."""
        return f"{BACKEND_BY_NAME[self.backend].package}.{self.module}"


BACKENDS: tuple[Backend, ...] = (
    Backend("numba", "npsparseattn.cpu", 10, True, "CPU, NumPy arrays", "`numba.njit(parallel=True)`",
            "tested against the float64 reference"),
    Backend("cupy", "npsparseattn.cuda.cupy_raw", 20, True, "GPU, CuPy arrays",
            "CUDA C++ through `cupy.RawModule`, tensor cores", "compiled and emulated, not yet run on a GPU"),
    Backend("numba-cuda", "npsparseattn.cuda.numba_cuda", 30, True, "GPU, CuPy arrays", "`numba.cuda.jit`",
            "compiled and simulated, not yet run on a GPU"),
    Backend("reference", "npsparseattn.reference", 100, False, "either", "dense float64 NumPy/CuPy",
            "the test oracle, never fast"),
)  # fmt: skip
BACKEND_BY_NAME = {backend.name: backend for backend in BACKENDS}

OPERATIONS: tuple[Operation, ...] = (
    Operation("attention", "attention", "tiled exact attention"),
    Operation("block_sparse_attention", "block_sparse", "attention over the blocks of a CSR layout"),
    Operation("lsh_buckets", "lsh_buckets", "Reformer LSH hashing", kernels=("buckets",)),
    Operation("lsh_sort", "lsh_sort", "the LSH sort plan", kernels=("sort",)),
    Operation("lsh_attention", "lsh", "Reformer LSH attention"),
    Operation("ring_attention", "ring", "sequence-parallel attention", kernels=(), alias_of="attention"),
    Operation("attention_varlen", "varlen", "packed variable-length sequences"),
    Operation(
        "attention_with_kvcache", "kvcache", "decoding from a contiguous or paged KV cache", kernels=("forward",)
    ),
    Operation("sparse_attention", "sparse", "attention over the key blocks each query block's list names"),
    Operation("sparse_attention_varlen", "sparse_varlen", "index-driven sparse attention on packed sequences"),
)

_ATTENTION_KERNELS = (
    CudaKernel("npsa_attn_fwd", "TDM", hot=True),
    CudaKernel("npsa_attn_bwd", "TDM", hot=True),
    CudaKernel("npsa_attn_dq", "TDM", hot=True),
    CudaKernel("npsa_bwd_prep", "TD"),
    CudaKernel("npsa_dq_store", "T"),
)
_BLOCK_SPARSE_KERNELS = (
    CudaKernel("npsa_bsa_fwd", "TDM", hot=True),
    CudaKernel("npsa_bsa_bwd", "TDM", hot=True),
    CudaKernel("npsa_bsa_dq", "TDM", hot=True),
)

ENTRIES: tuple[Entry, ...] = (
    Entry("attention", "numba", "exact", group="attention", phase=1),
    Entry("attention", "cupy", "exact", source="attention.cu", kernels=_ATTENTION_KERNELS),
    Entry("attention", "numba-cuda", "exact", group="attention"),
    Entry("attention", "reference", "exact"),
    # the block-sparse and varlen backwards also call attention kernels: they compile once those exist
    Entry("block_sparse_attention", "numba", "block_sparse", group="sparse_walk", phase=2),
    Entry("block_sparse_attention", "cupy", "block_sparse", source="block_sparse.cu", kernels=_BLOCK_SPARSE_KERNELS),
    Entry("block_sparse_attention", "numba-cuda", "block_sparse", group="block_sparse"),
    Entry("block_sparse_attention", "reference", "block_sparse"),
    Entry("lsh_buckets", "numba", "lsh_hash", group="lsh", phase=1),
    Entry("lsh_buckets", "numba-cuda", "lsh_hash", group="lsh_buckets"),
    Entry("lsh_buckets", "reference", "lsh_hash"),
    Entry("lsh_sort", "numba", "lsh_sort", group="lsh", phase=1),
    Entry("lsh_sort", "numba-cuda", "lsh_sort", group="lsh_sort"),
    Entry("lsh_sort", "reference", "lsh_sort"),
    Entry("lsh_attention", "numba", "lsh", group="lsh", phase=1),
    Entry("lsh_attention", "numba-cuda", "lsh", group="lsh_attention"),
    Entry("lsh_attention", "reference", "lsh"),
    Entry("attention_varlen", "numba", "varlen", group="varlen", phase=2),
    Entry("attention_varlen", "reference", "varlen"),
    Entry("attention_with_kvcache", "numba", "kvcache", group="kvcache", phase=1),
    Entry("attention_with_kvcache", "reference", "kvcache"),
    # block-sparse and index-driven sparse attention share the walk kernels of cpu/_walk.py: one group
    Entry("sparse_attention", "numba", "sparse", group="sparse_walk", phase=2),
    # the GPU backends run the block-sparse kernels on the index (cuda/index_runs.py): the same instances
    Entry("sparse_attention", "cupy", "sparse", source="block_sparse.cu", kernels=_BLOCK_SPARSE_KERNELS),
    Entry("sparse_attention", "numba-cuda", "sparse", group="sparse_attention"),
    Entry("sparse_attention", "reference", "sparse"),
    Entry("sparse_attention_varlen", "numba", "sparse_varlen", group="sparse_walk", phase=2),
    Entry("sparse_attention_varlen", "reference", "sparse_varlen"),
)  # fmt: skip


def entries(*, op: str | None = None, backend: str | None = None) -> tuple[Entry, ...]:
    """The entries of ``op`` and/or ``backend`` (every entry if neither is given), in table order."""
    return tuple(e for e in ENTRIES if (op is None or e.op == op) and (backend is None or e.backend == backend))


def groups(backend: str) -> dict[str, int]:
    """The ahead-of-time groups of ``backend``'s entries, each with its phase, in table order."""
    found: dict[str, int] = {}
    for entry in entries(backend=backend):
        if entry.group is not None:
            found.setdefault(entry.group, entry.phase)
    return found


def _file(path: str) -> str:
    """``npsparseattn.cpu.exact`` -> ``cpu/exact.py``."""
    return path.removeprefix("npsparseattn.").replace(".", "/") + ".py"


def markdown() -> str:
    """The documentation's backend tables: the backends, then which module implements each operation."""
    lines = [
        "| backend | priority | chosen by `auto` | runs on | written with | status |",
        "|---|---|---|---|---|---|",
    ]
    for b in BACKENDS:
        lines.append(f"| `{b.name}` | {b.priority} | {'yes' if b.auto else 'no'} | {b.runs_on} | {b.written_with} "
                     f"| {b.status} |")  # fmt: skip
    lines += ["", "| operation | " + " | ".join(f"`{b.name}`" for b in BACKENDS) + " |"]
    lines.append("|---|" + "---|" * len(BACKENDS))
    for op in OPERATIONS:
        if op.alias_of is not None:
            cells = [f"the `{op.alias_of}` kernels"] * len(BACKENDS)
        else:
            found = {e.backend: e for e in entries(op=op.name)}
            cells = [f"`{_file(found[b.name].path)}`" if b.name in found else "-" for b in BACKENDS]
        lines.append(f"| `{op.name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
