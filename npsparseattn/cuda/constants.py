"""Constants shared by the GPU backends' host code (the CUDA C++ has its own copies in ``npsa_attn.cuh``).

Scores are kept in base-2 units: a kernel multiplies ``q . k`` by
``scale * LOG2E`` so the softmax needs ``exp2`` only, and turns the row
maximum back into natural log with ``LN2``.
"""

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
