"""The GPU backends, one package each, like :mod:`npsparseattn.cpu`.

* :mod:`~npsparseattn.cuda.numba_cuda`: backend ``"numba-cuda"``, SIMT
  kernels written with ``numba.cuda.jit``, every operation but the inference
  ones;
* :mod:`~npsparseattn.cuda.cupy_raw`: backend ``"cupy"``, tensor-core CUDA C++
  (``kernels/*.cu``) loaded with ``cupy.RawModule``, exact and block-sparse
  attention, with the host emulation of its sources (``emulate/``).

Shared by both: what the machine offers (:mod:`~npsparseattn.cuda._env`),
the constants of the base-2 softmax (:mod:`~npsparseattn.cuda.constants`) and
the one device cache of block-sparse layout runs
(:mod:`~npsparseattn.cuda.layout_runs`).  Which module implements which
operation is in :mod:`npsparseattn._backend_table`.

Nothing here imports CuPy or ``numba.cuda`` at import time: the registry
imports a backend module when it is first consulted, and a module asks
:mod:`npsparseattn.cuda._env` what the machine has before touching either.
"""
