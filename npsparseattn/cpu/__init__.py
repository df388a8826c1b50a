"""numba CPU kernels (backend ``"numba"``), one module per operation.

Importing this package registers the CPU implementations with the dispatcher;
the kernels themselves compile on first use and are cached on disk.
"""

from __future__ import annotations

from npsparseattn._dispatch import Implementation, register
from npsparseattn.cpu import adapters, block_sparse, lsh

CPU_DTYPES = ("float16", "float32", "float64")

register(
    "attention",
    Implementation(
        name="numba",
        kinds=("numpy",),
        dtypes=CPU_DTYPES,
        forward=adapters.attention_forward,
        backward=adapters.attention_backward,
        priority=10,
    ),
)

register(
    "block_sparse_attention",
    Implementation(
        name="numba",
        kinds=("numpy",),
        dtypes=CPU_DTYPES,
        forward=block_sparse.attention_forward,
        backward=block_sparse.attention_backward,
        priority=10,
    ),
)

register(
    "lsh_attention",
    Implementation(
        name="numba",
        kinds=("numpy",),
        dtypes=CPU_DTYPES,
        forward=lsh.problem_forward,
        backward=lsh.problem_backward,
        priority=10,
    ),
)
