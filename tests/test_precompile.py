"""``npsparseattn compile``: every CPU kernel version a call can need is made ahead of time.

``make test`` runs the command before the suite, so here the groups only load
from numba's cache.  What is checked is coverage: after the warm-up every
kernel has its C-contiguous version for float32 and float64, and its strided
one where it reads strided rows in place (varlen, the KV cache), so no later
call compiles (and no two processes of the warm-up write one
kernel's cache index).
"""

from __future__ import annotations

import pytest
from numba.core import types

from npsparseattn.cli import main
from npsparseattn.cpu import _jit, _walk, block_sparse, exact, kvcache, sparse, varlen
from npsparseattn.cpu.precompile import GROUPS, PHASES, precompile, run_group


def _kernels():
    """Every ``@kernel`` of the CPU backend, once each (some modules import another's)."""
    found = {}
    for module in (exact, _walk, block_sparse, sparse, varlen, kvcache):
        for value in vars(module).values():
            if isinstance(value, _jit.Kernel):
                found[id(value)] = value
    return list(found.values())


def _dtype_and_layout(sig):
    """The float dtype and the layout (shared by every array argument) of a kernel version."""
    first = next(t for t in sig if isinstance(t, types.Array) and t.dtype.name.startswith("float"))
    return first.dtype.name, first.layout


def test_every_group_runs_in_exactly_one_phase():
    names = [name for phase in PHASES for group in phase for name in group]
    assert sorted(names) == sorted(GROUPS)


def test_warm_up_makes_every_version_of_every_kernel():
    run_group(tuple(GROUPS))
    kernels = list(_kernels())
    assert len(kernels) == 14
    for kernel in kernels:
        made = {_dtype_and_layout(sig) for sig in kernel.versions}
        layouts = ("C", "A") if kernel.strided else ("C",)
        wanted = {(dtype, layout) for dtype in ("float32", "float64") for layout in layouts}
        assert wanted <= made, (kernel.__name__, made)


def test_jobs_must_be_positive(capsys):
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        precompile(0)
    with pytest.raises(SystemExit):
        main(["compile", "--jobs", "0"])
    assert "--jobs must be >= 1, got 0" in capsys.readouterr().err


def test_command_reports_each_group(capsys):
    assert main(["compile", "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    for name in GROUPS:
        assert f"compiled {name}: " in out
    assert "every CPU kernel is in numba's cache" in out
