"""numba CPU kernels (backend ``"numba"``), one module per operation.

=========================  ==========================
operation                  module
=========================  ==========================
``attention``              :mod:`npsparseattn.cpu.exact`
``block_sparse_attention`` :mod:`npsparseattn.cpu.block_sparse`
``lsh_buckets``            :mod:`npsparseattn.cpu.lsh_hash`
``lsh_sort``               :mod:`npsparseattn.cpu.lsh_sort`
``lsh_attention``          :mod:`npsparseattn.cpu.lsh`
=========================  ==========================

The registry (:mod:`npsparseattn._dispatch`) imports a module the first time
it is chosen; the kernels compile on first use and are cached on disk.  Each
module follows the kernel contract of :mod:`npsparseattn.problems`.
Importing this package asks numba for its TBB threading layer (thread- and
fork-safe) unless the user chose one (:mod:`npsparseattn.cpu._threads`), and
on an AVX-512 CPU for 512-bit vectors, which LLVM does not prefer on Intel
cores by default (:mod:`npsparseattn.cpu._isa`).
"""

from __future__ import annotations

from npsparseattn.cpu import _isa, _threads

VECTOR_WIDTH_NOTE = _isa.configure()  # before any kernel is compiled: numba makes its code generator once
THREADING = _threads.configure()

KINDS = ("numpy",)
DTYPES = ("float16", "bfloat16", "float32", "float64")  # float16 and bfloat16 are read as float32
