"""Runnable examples: ``python -m npsparseattn.examples.<name>``.

* ``ring``: ring attention across MPI ranks
  (``mpiexec -n 4 python -m npsparseattn.examples.ring``).
"""
