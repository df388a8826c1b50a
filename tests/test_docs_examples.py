"""Every public function has an API page and an example, and every documented example runs.

The API pages are generated from ``docs/api/index.rst`` (Sphinx autosummary);
this test reads the same list.  Examples are the doctest blocks of the
docstrings and the ``pycon`` blocks of the Markdown guides in ``docs/``.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import re
from pathlib import Path
from types import ModuleType

import pytest

import npsparseattn

DOCS = Path(__file__).resolve().parent.parent / "docs"
API_INDEX = DOCS / "api" / "index.rst"
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
PYCON = re.compile(r"^```pycon\n(.*?)^```", re.MULTILINE | re.DOTALL)

# Modules whose public functions and classes are all part of the API (besides npsparseattn.__all__).
API_MODULES = ("npsparseattn.layouts", "npsparseattn.routing", "npsparseattn.inspect", "npsparseattn.distributed")


def documented_names(index: Path = API_INDEX) -> list[str]:
    """Fully qualified names listed in the autosummary blocks of ``index``."""
    names, module, in_block = [], None, False
    for line in index.read_text().splitlines():
        if line.startswith(".. currentmodule::"):
            module = line.split("::", 1)[1].strip()
            in_block = False
        elif line.startswith(".. autosummary::"):
            in_block = True
        elif in_block and line.startswith("   "):
            entry = line.strip()
            if entry and not entry.startswith(":"):
                names.append(f"{module}.{entry}")
        elif line.strip():
            in_block = False
    return names


def resolve(name: str) -> object:
    """The object a dotted name refers to (module path, then attributes)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(name)


def _module_api(module: ModuleType) -> dict[str, object]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [
            n
            for n, obj in vars(module).items()
            if not n.startswith("_")
            and (inspect.isfunction(obj) or inspect.isclass(obj))
            and obj.__module__ == module.__name__
        ]
    return {f"{module.__name__}.{n}": getattr(module, n) for n in names if callable(getattr(module, n))}


def public_api() -> dict[str, object]:
    """Every public function and class: ``npsparseattn.__all__`` and the API modules."""
    api = {
        f"npsparseattn.{n}": getattr(npsparseattn, n)
        for n in npsparseattn.__all__
        if n != "__version__" and not inspect.ismodule(getattr(npsparseattn, n))
    }
    for name in API_MODULES:
        api.update(_module_api(importlib.import_module(name)))
    return api


DOCUMENTED = documented_names()
PUBLIC = public_api()
PUBLIC_FUNCTIONS = sorted(name for name, obj in PUBLIC.items() if inspect.isfunction(obj))


def test_api_index_lists_every_public_function_and_class():
    documented = {id(resolve(name)) for name in DOCUMENTED}
    missing = sorted(name for name, obj in PUBLIC.items() if id(obj) not in documented)
    assert not missing, f"add these to docs/api/index.rst: {missing}"


def test_api_index_parser_reads_modules_and_entries():
    assert "npsparseattn.attention" in DOCUMENTED
    assert "npsparseattn.reference.attention" in DOCUMENTED
    assert all(resolve(name) is not None for name in DOCUMENTED)


@pytest.mark.parametrize("name", PUBLIC_FUNCTIONS)
def test_public_function_has_shapes_and_an_example(name):
    doc = inspect.getdoc(PUBLIC[name]) or ""
    assert ">>>" in doc, f"{name} has no example in its docstring"


def _run(test: doctest.DocTest) -> None:
    lines: list[str] = []
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    result = runner.run(test, out=lines.append, clear_globs=False)
    assert result.failed == 0, "".join(lines)


def _docstring_tests(name: str) -> list[doctest.DocTest]:
    obj = resolve(name)
    module = inspect.getmodule(obj)
    finder = doctest.DocTestFinder(recurse=inspect.isclass(obj))
    return [t for t in finder.find(obj, name, module=module, globs=vars(module).copy()) if t.examples]


@pytest.mark.parametrize("name", DOCUMENTED)
def test_docstring_examples_run(name):
    for test in _docstring_tests(name):
        _run(test)


def _guides() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts and PYCON.search(p.read_text()))


@pytest.mark.parametrize("page", _guides(), ids=lambda p: str(p.relative_to(DOCS)))
def test_guide_examples_run(page):
    text = page.read_text()
    blocks = []
    for match in PYCON.finditer(text):
        lineno = text.count("\n", 0, match.start(1))
        blocks.append((lineno, match.group(1)))
    globs: dict[str, object] = {}
    parser = doctest.DocTestParser()
    for lineno, block in blocks:
        test = parser.get_doctest(block, globs, str(page.relative_to(DOCS)), str(page), lineno)
        _run(test)
        globs = test.globs  # the next block of the page continues this session


def test_guides_with_examples_are_found():
    pages = {p.name for p in _guides()}
    assert {"attention.md", "conventions.md"} <= pages
