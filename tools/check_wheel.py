"""Build the wheel, install it into a fresh virtual environment, and run one emulated CUDA call from outside the tree.

An editable install reads every file from the source tree, so a file missing
from the wheel's package data (the ``.cu`` sources, the emulation headers)
shows only in a real install.  This check:

1. builds the wheel of the checkout's files (tracked, or new and not
   ignored, copied to a temporary folder so that no stale ``build/`` folder
   can add to it) with this interpreter's setuptools when it has one (no
   build isolation, so no download; otherwise pip fetches the build backend);
2. creates a fresh virtual environment (no system site-packages) and installs
   the wheel into it with ``--no-deps``;
3. lets that environment find the dependencies (NumPy, SciPy, numba) in this
   interpreter's site-packages through a ``.pth`` file that lists the folder:
   a folder named in a ``.pth`` file is not a site directory, so its own
   ``.pth`` files (an editable install's finder among them) are not run and
   ``npsparseattn`` can only come from the wheel;
4. from a temporary folder outside the checkout, imports npsparseattn (it
   must be the installed copy) and runs ``attention`` with ``backend="cupy"``
   under ``NPSPARSEATTN_CUDA_EMULATE=1``: the CUDA C++ sources and the
   emulation headers, read from the installed package, built for the host
   (or found in the host-library cache) and compared with the float64
   reference.

Usage: ``python tools/check_wheel.py`` (``make check-wheel``); exit status 0 when
the installed wheel works.  Needs the host C++ compiler the emulation needs.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import site
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CALL = """
import sys
from pathlib import Path
import numpy as np
import npsparseattn as nsa
from npsparseattn import reference

package = Path(nsa.__file__).resolve().parent
assert package.is_relative_to(Path(sys.prefix).resolve()), f"npsparseattn imported from {package}, not the wheel"
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1, 2, 70, 32)).astype(np.float16) for _ in range(3))
out = nsa.attention(q, k, v, causal=True, backend="cupy")
ref, _ = reference.attention(q, k, v, causal=True)
err = float(np.abs(out.astype(np.float64) - ref).max() / np.abs(ref).max())
assert err < 2e-3, err
print(f"installed wheel at {package}: emulated backend='cupy' attention, rel err vs float64 {err:.1e}")
"""


def run(command: list[str], **kwargs) -> str:
    """Run ``command``; exit with its output if it fails."""
    done = subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)
    if done.returncode != 0:
        sys.exit(f"check-wheel: {' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


def copy_sources(target: Path) -> None:
    """The checkout's files (tracked, or new and not ignored) copied to ``target``."""
    listed = run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"])
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def main() -> None:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="npsparseattn-wheel-") as tmp:
        tmp = Path(tmp)
        copy_sources(tmp / "src")
        local = importlib.util.find_spec("setuptools") and importlib.util.find_spec("wheel")
        run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", *(["--no-build-isolation"] if local else []),
             "--wheel-dir", str(tmp / "dist"), str(tmp / "src")])  # fmt: skip
        (wheel,) = (tmp / "dist").glob("npsparseattn-*.whl")
        venv = tmp / "venv"
        run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
        python = venv / "bin" / "python"
        run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", "--no-index",
             str(wheel)])  # fmt: skip
        target = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
        deps = [path for path in site.getsitepackages() if Path(path).is_dir()]
        (Path(target) / "_npsparseattn_check_deps.pth").write_text("\n".join(deps) + "\n")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env["NPSPARSEATTN_CUDA_EMULATE"] = "1"
        workdir = tmp / "elsewhere"
        workdir.mkdir()
        print(run([str(python), "-c", CALL], cwd=workdir, env=env).strip())
        print(f"check-wheel: {wheel.name} installed and run in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
