"""What one kernel launch may ask of a device of compute capability 8.0 (A100) or 9.0 (H100/H200).

A launch outside these limits fails on a GPU with ``CUDA_ERROR_INVALID_VALUE``
(a grid dimension of 0, too many blocks or threads) or
``CUDA_ERROR_OUT_OF_RESOURCES`` (shared memory or registers); the loader and
the host emulation refuse it first with a message that says which limit
(:func:`check_launch`), and the NVRTC compile check holds every kernel's
registers against them (:func:`launch_problems` with ``registers``).  The
default limits are the stricter of the two architectures, so what passes runs
on both.  Figures: the CUDA C++ Programming Guide, "Compute Capabilities".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """The per-launch limits of one architecture."""

    arch: str
    max_shared: int  # dynamic shared memory per block, with the opt-in attribute set
    max_threads: int = 1024
    max_block: tuple[int, int, int] = (1024, 1024, 64)
    max_grid: tuple[int, int, int] = (2**31 - 1, 65535, 65535)
    registers_per_thread: int = 255
    registers_per_block: int = 65536


SM80 = Limits("sm_80", 163 * 1024)
SM90 = Limits("sm_90", 227 * 1024)
ARCHS = {limits.arch: limits for limits in (SM80, SM90)}
STRICTEST = SM80  # every SM80 limit is at most SM90's


class LaunchError(ValueError):
    """A launch that a GPU would refuse."""


def _dims(dims: Sequence[int]) -> tuple[int, int, int]:
    values = [int(x) for x in dims]
    if not 1 <= len(values) <= 3:
        raise LaunchError(f"a grid or block has 1 to 3 dimensions, got {list(dims)}")
    return tuple([*values, 1, 1][:3])  # type: ignore[return-value]


def launch_problems(
    grid: Sequence[int],
    block: Sequence[int],
    shared_bytes: int,
    *,
    registers: int | None = None,
    limits: Limits = STRICTEST,
) -> list[str]:
    """Every limit of ``limits`` that a launch of ``grid`` blocks of ``block`` threads breaks (empty: none).

    ``registers``: per thread, from the ptxas report, when known.
    """
    g, b = _dims(grid), _dims(block)
    found = []
    if min(g) < 1:
        found.append(f"grid {g} has a dimension below 1 (launch nothing instead)")
    if any(x > m for x, m in zip(g, limits.max_grid)):
        found.append(f"grid {g} exceeds {limits.max_grid} blocks")
    threads = b[0] * b[1] * b[2]
    if min(b) < 1 or threads > limits.max_threads or any(x > m for x, m in zip(b, limits.max_block)):
        found.append(f"block {b} is not 1 to {limits.max_threads} threads within {limits.max_block}")
    if not 0 <= shared_bytes <= limits.max_shared:
        found.append(f"{shared_bytes} bytes of dynamic shared memory (at most {limits.max_shared} on {limits.arch})")
    if registers is not None:
        if registers > limits.registers_per_thread:
            found.append(f"{registers} registers per thread (at most {limits.registers_per_thread})")
        if registers * threads > limits.registers_per_block:
            found.append(
                f"{registers} registers x {threads} threads = {registers * threads} per block "
                f"(at most {limits.registers_per_block} on {limits.arch})"
            )
    return found


def check_launch(name: str, grid: Sequence[int], block: Sequence[int], shared_bytes: int, **options) -> None:
    """:class:`LaunchError` naming ``name`` and every limit the launch breaks (see :func:`launch_problems`)."""
    problems = launch_problems(grid, block, shared_bytes, **options)
    if problems:
        raise LaunchError(f"{name}: " + "; ".join(problems))
