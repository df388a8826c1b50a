"""Sphinx configuration of the npsparseattn documentation.

Build: ``make docs`` (``sphinx-build -W --keep-going -b html docs docs/_build/html``).
Why Sphinx: see ``index.md``.
"""

from __future__ import annotations

import re

import npsparseattn

project = "npsparseattn"
author = "npsparseattn developers"
copyright = "npsparseattn developers"
version = release = npsparseattn.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_parser",
    "matplotlib.sphinxext.plot_directive",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "_templates"]
templates_path = ["_templates"]
root_doc = "index"

# API pages: one generated page per public function (docs/api/index.rst lists them).
autosummary_generate = True
autodoc_typehints = "none"  # the numpydoc sections carry types and shapes
numpydoc_show_class_members = False
numpydoc_xref_param_type = False

# Markdown user guides (MyST): $...$ and $$...$$ maths, ::: fences, anchors on headings.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# Figures drawn at build time from the library itself (e.g. the mask drawings).
plot_include_source = False
plot_html_show_source_link = False
plot_html_show_formats = False
plot_formats = [("png", 100)]

html_theme = "pydata_sphinx_theme"
html_title = f"npsparseattn {release}"
html_theme_options = {"show_toc_level": 2, "navigation_with_keys": False}
html_show_sourcelink = False


# Docstrings write shapes as in Python, ``(*batch, H, L, D)``; in reStructuredText
# a bare ``*`` opens emphasis.  Escape a star that starts a shape entry (after
# "(", "[", "," or a space, followed by a name and "," or ")"), outside code
# spans, doctest lines and literal blocks, so help() and the pages read alike.
_SHAPE_STAR = re.compile(r"(?<=[(\[, ])\*(?=\w+[,)\]])")
_CODE_SPAN = re.compile(r"(``.*?``|`[^`]*`)")


def _escape_shape_stars(app, what, name, obj, options, lines):
    literal_indent = None
    for n, line in enumerate(lines):
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if literal_indent is not None:
            if stripped and indent <= literal_indent:
                literal_indent = None
            else:
                continue
        if stripped.startswith((">>>", "...")):
            continue
        parts = _CODE_SPAN.split(line)
        lines[n] = "".join(p if i % 2 else _SHAPE_STAR.sub(r"\\*", p) for i, p in enumerate(parts))
        if stripped.endswith("::"):
            literal_indent = indent


def setup(app):
    app.connect("autodoc-process-docstring", _escape_shape_stars)
