"""Benchmarks behind ``npsparseattn bench <name>``, one module per operation.

Each module provides ``add_arguments(parser)`` and ``run(args) -> dict``; the
CLI adds ``--json`` and a progress bar (``args.progress``) to all of them.
"""

from __future__ import annotations

from npsparseattn.bench import attention, block_sparse, inference, lsh, ring, sparse

BENCHMARKS = {
    "attention": attention,
    "block-sparse": block_sparse,
    "sparse": sparse,
    "lsh": lsh,
    "ring": ring,
    "inference": inference,
}
