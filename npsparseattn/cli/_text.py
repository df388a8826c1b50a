"""Small helpers of the command line: argument types that refuse bad numbers, and help text without markup."""

from __future__ import annotations

import argparse
import re

_ROLE = re.compile(r":[a-z]+:`(~?)([^`<]*?)(?:\s*<[^>]*>)?`")
_LITERAL = re.compile(r"``([^`]+)``")


def plain(doc: str | None) -> str:
    """A docstring as terminal text: ``:func:`~a.b.name``` -> ``name``, double backquotes dropped.

    >>> plain("Run :func:`~npsparseattn.attention` with ``causal=True``.")
    'Run attention with causal=True.'
    """
    text = _ROLE.sub(_role_text, doc or "")
    return _LITERAL.sub(r"\1", text)


def _role_text(match: re.Match) -> str:
    """``~a.b.name`` shows ``name``; ``a.b.name`` shows itself (Sphinx's rule)."""
    tilde, target = match.groups()
    return target.split(".")[-1] if tilde else target


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    return _bounded_int(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    return _bounded_int(text, 0)


def _bounded_int(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value
