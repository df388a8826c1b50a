"""The simulator run: numba-cuda kernels executed on the host under ``NUMBA_ENABLE_CUDASIM=1``.

The variable must be set before numba is imported, so these tests are a
separate pytest invocation (``make test-cudasim``)::

    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cudasim

A normal run does not collect them; asking for them without the variable is
an error rather than a silent skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"
HERE = Path(__file__).resolve().parent


def _asked_for_here(config: pytest.Config) -> bool:
    """True if the command line names this folder or a file in it."""
    for arg in config.invocation_params.args:
        path = Path(config.invocation_params.dir, str(arg).split("::")[0]).resolve()
        if path == HERE or HERE in path.parents:
            return True
    return False


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if SIMULATED:
        return None
    if _asked_for_here(config):
        raise pytest.UsageError(
            "tests/cudasim runs numba-cuda kernels in the CUDA simulator: set NUMBA_ENABLE_CUDASIM=1 before "
            "starting pytest (make test-cudasim)"
        )
    return True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.cudasim)
