"""GPU backends: ``numba-cuda`` (SIMT kernels written with ``numba.cuda.jit``) and ``cupy``
(CUDA C++ in ``kernels/*.cu``, tensor cores, loaded with ``cupy.RawModule``).

Nothing here imports CuPy or ``numba.cuda`` at import time: the registry
imports a backend module when it is first consulted, and a module asks
:mod:`npsparseattn.cuda._env` what the machine has before touching either.
"""
