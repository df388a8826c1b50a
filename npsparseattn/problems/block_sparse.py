"""The block-sparse problem: an attention problem plus a :class:`~npsparseattn.layouts.BlockLayout` that fits it."""

from __future__ import annotations

from typing import Any

from npsparseattn.layouts import BlockLayout
from npsparseattn.problems.attention import AttentionProblem


def check_layout(layout: Any, problem: AttentionProblem) -> BlockLayout:
    """``layout`` is a :class:`BlockLayout` made for these ``q``/``k``: ``seq == (Lq, Lk)``, heads 1 or Hq."""
    if not isinstance(layout, BlockLayout):
        raise TypeError(
            f"layout must be an npsparseattn.layouts.BlockLayout (see npsparseattn.layouts), "
            f"got {type(layout).__name__}"
        )
    if layout.seq != (problem.seq_q, problem.seq_k):
        raise ValueError(
            f"layout is for seq (Lq, Lk) = {layout.seq} but q has Lq={problem.seq_q} and k has Lk={problem.seq_k}"
        )
    if layout.heads not in (1, problem.n_heads):
        raise ValueError(
            f"layout has {layout.heads} heads but q has {problem.n_heads} query heads; a layout serves every "
            f"head (heads=1) or gives one pattern per query head (heads={problem.n_heads})"
        )
    return layout
