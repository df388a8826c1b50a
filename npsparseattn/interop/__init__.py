"""Arrays from other frameworks: DLPack conversion and the PyTorch and JAX adapters.

* :mod:`npsparseattn.interop.dlpack`: every public operation accepts arrays
  that implement DLPack (PyTorch tensors on CPU or GPU, JAX arrays) and
  returns the caller's kind, zero-copy where the framework allows.
* :mod:`npsparseattn.interop.torch`: ``attention`` and ``sparse_attention``
  as ``torch.autograd.Function`` s (gradients through our backward).
* :mod:`npsparseattn.interop.jax`: ``attention`` and ``sparse_attention`` as
  ``jax.custom_vjp`` s, usable under ``jax.jit`` (host callbacks).

Both build on one description per operation (``interop/_kernels.py``:
forward, backward, argument checks).

The adapters are optional: import them explicitly.  Importing this package,
or :mod:`npsparseattn`, imports neither PyTorch nor JAX.
"""
