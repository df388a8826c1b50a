"""Work lists for kernels whose tasks differ in cost: tasks dealt to one list per numba thread.

The varlen and KV-cache kernels have tasks of very different sizes (sequences
of different lengths, causal tiles).  numba's ``prange`` hands each thread a
contiguous range of iterations, so those kernels run ``prange`` over
*workers*, one per thread, and each worker walks its own list of tasks.  The
lists are dealt heaviest first in snake order (0, 1, ..., W-1, W-1, ..., 0,
0, 1, ...), which gives every worker the same number of tasks (to within one)
and nearly the same total cost.
"""

from __future__ import annotations

import numpy as np
from numba import get_num_threads


def deal(costs: np.ndarray, n_workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Deal tasks of ``costs`` (N,) to workers: ``(order, starts)``.

    Worker ``w`` runs tasks ``order[starts[w]:starts[w + 1]]``.  ``n_workers``
    defaults to numba's thread count.

    >>> order, starts = deal(np.array([5, 1, 4, 2]), 2)
    >>> [order[starts[w]:starts[w + 1]].tolist() for w in range(2)]
    [[0, 3], [2, 1]]
    """
    workers = get_num_threads() if n_workers is None else n_workers
    n = costs.shape[0]
    heaviest = np.argsort(-np.asarray(costs), kind="stable")
    rounds, slot = np.divmod(np.arange(n), workers)
    worker = np.where(rounds % 2 == 0, slot, workers - 1 - slot)
    order = heaviest[np.argsort(worker, kind="stable")]
    starts = np.zeros(workers + 1, dtype=np.int64)
    starts[1:] = np.cumsum(np.bincount(worker, minlength=workers))
    return np.ascontiguousarray(order, dtype=np.int64), starts
