"""Arrays from other frameworks: DLPack conversion and the PyTorch and JAX adapters.

* :mod:`npsparseattn.interop.dlpack`: every public operation accepts arrays
  that implement DLPack (PyTorch tensors on CPU or GPU, JAX arrays) and
  returns the caller's kind, zero-copy where the framework allows.
* :mod:`npsparseattn.interop.torch`: ``attention`` as a
  ``torch.autograd.Function`` (gradients through our backward).
* :mod:`npsparseattn.interop.jax`: ``attention`` as a ``jax.custom_vjp``,
  usable under ``jax.jit`` (a host callback).

The adapters are optional: import them explicitly.  Importing this package,
or :mod:`npsparseattn`, imports neither PyTorch nor JAX.
"""
