"""Build the kernels' CUDA C++ for the host: one shared library, cached per source hash.

The translation unit is generated: every ``.cu`` file of ``npsparseattn/cuda/cupy_raw/kernels``
(headers inlined by :func:`npsparseattn.cuda.cupy_raw.sources.translation_unit`), then
a table with one entry per kernel instance (the GPU instances plus the fault
programs that test the emulator), then the C entry points of ``npsa_abi.h``.
It is compiled with ``-include npsa_host.h`` (the emulation of CUDA) by the host
C++ compiler (``$CXX``, default ``g++``; GCC 12 or newer, or a Clang with
``_Float16``).

The library is cached in :func:`cache_dir` (``$NPSPARSEATTN_CACHE_DIR``,
default ``~/.cache/npsparseattn``) under a name that hashes the generated source, the
emulation headers, the compiler and its flags, so an edit anywhere rebuilds it
and an unchanged tree never does.  Concurrent builds are serialised with a lock
file and the result is moved into place atomically.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shlex
import subprocess
import tempfile
import time
from importlib import resources
from pathlib import Path

from npsparseattn.cuda.cupy_raw import sources

FLAGS = (
    "-std=c++17",
    "-O1",
    "-fPIC",
    "-shared",
    "-fvisibility=hidden",
    "-fno-strict-aliasing",
    "-U_FORTIFY_SOURCE",  # _longjmp between fiber stacks must not go through __longjmp_chk
    "-Wno-unknown-pragmas",
)
HEADERS = ("npsa_host.h", "npsa_abi.h")


class HostBuildError(RuntimeError):
    """The host compiler is missing or rejected the kernels."""


def compiler() -> list[str]:
    """The host C++ compiler command (``$CXX`` or ``g++``)."""
    return shlex.split(os.environ.get("CXX", "g++"))


def cache_dir() -> Path:
    """Where built libraries are kept: ``$NPSPARSEATTN_CACHE_DIR``, else ``~/.cache/npsparseattn``, else (no
    writable home) a folder in the system's temporary directory."""
    root = os.environ.get("NPSPARSEATTN_CACHE_DIR")
    if root:
        return Path(root)
    home = Path.home() / ".cache" / "npsparseattn"
    try:
        home.mkdir(parents=True, exist_ok=True)
        return home
    except OSError:
        return Path(tempfile.gettempdir()) / f"npsparseattn-{os.getuid()}"


def host_instances() -> tuple[str, ...]:
    """Every instance the host library exports: the GPU instances of every source and the fault programs."""
    names = [name for source in sources.SOURCES for name in sources.instances(source)]
    return tuple(names) + sources.FAULTS


def generated_source(names: tuple[str, ...] | None = None) -> str:
    """The translation unit compiled for the host: every instance of :func:`host_instances`, or ``names``."""
    parts = [sources.translation_unit(*sources.SOURCES)]
    entries = "\n".join(
        f'  {{"{name}", &npsa_emu::EntryOf<&{name}>::launch, &npsa_emu::EntryOf<&{name}>::signature}},'
        for name in (host_instances() if names is None else names)
    )
    table = f"static const npsa_emu::Entry npsa_entries[] = {{\n{entries}\n}};\n"
    parts.append(f'#line 1 "<generated entry table>"\n{table}')
    parts.append('#include "npsa_abi.h"\n')
    return "".join(parts)


def _emulate_dir() -> Path:
    return Path(str(resources.files("npsparseattn.cuda.cupy_raw") / "emulate"))


def _compiler_version(cxx: list[str]) -> str:
    try:
        done = subprocess.run([*cxx, "--version"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as err:
        raise HostBuildError(f"host C++ compiler {' '.join(cxx)!r} not usable: {err}") from err
    if done.returncode != 0:
        raise HostBuildError(f"host C++ compiler {' '.join(cxx)!r} not usable: {done.stderr.strip()}")
    return done.stdout


def library_path(names: tuple[str, ...] | None = None) -> Path:
    """The host library of every instance (or of ``names`` only: a quicker build, for tests), built first if
    the cache has none for the current sources (may take a minute)."""
    cxx = compiler()
    source = generated_source(names)
    digest = hashlib.sha256(source.encode())
    for name in HEADERS:
        digest.update((_emulate_dir() / name).read_bytes())
    digest.update(" ".join(cxx + list(FLAGS)).encode())
    digest.update(_compiler_version(cxx).encode())
    target = cache_dir() / f"npsa-host-{digest.hexdigest()[:20]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            _compile(cxx, source, target)
    return target


def _compile(cxx: list[str], source: str, target: Path) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "npsa_host_build.cpp"
        src.write_text(source, encoding="utf-8")
        out = Path(tmp) / target.name
        emulate = _emulate_dir()
        cmd = [*cxx, *FLAGS, "-include", str(emulate / "npsa_host.h"), "-I", str(emulate), str(src), "-o", str(out)]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise HostBuildError(f"host build of the CUDA kernels failed ({' '.join(cmd)}):\n{done.stderr[-8000:]}")
        os.replace(out, target)
        (target.parent / (target.name + ".log")).write_text(
            f"{' '.join(cmd)}\n{time.perf_counter() - start:.1f} s\n{done.stderr}", encoding="utf-8"
        )
