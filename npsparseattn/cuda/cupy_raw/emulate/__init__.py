"""Host emulation of the ``cupy`` backend's CUDA C++: the same sources, compiled for the CPU.

``npsa_host.h`` emulates the CUDA built-ins and the warp-level PTX the kernels
use (threads as fibers, warp collectives from the PTX ISA fragment layouts);
:mod:`~npsparseattn.cuda.cupy_raw.emulate.build` compiles the kernels with it and caches
the library; :mod:`~npsparseattn.cuda.cupy_raw.emulate.host` launches instances on NumPy
arrays.  With ``NPSPARSEATTN_CUDA_EMULATE=1`` the ``cupy`` backend runs here.
"""
