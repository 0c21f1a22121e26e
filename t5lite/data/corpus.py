"""The embedded default corpus: English prose from the Python standard library's documentation.

Every machine that runs t5lite has it, so the demo needs no network and ships no text. It is
the docstrings of the standard-library modules (read with `ast`, so nothing is imported or
executed) plus the language-reference topics behind `help()` (`pydoc_data.topics`), cut into
paragraphs and filtered to prose: about 10k paragraphs, 1.3 MB, one per line. That is as
much text as "tiny Shakespeare", enough for a small model's samples to become readable.

The text depends on the Python version, so the cached file is named after it; hosts of one
multi-host run must use the same Python (they do when they share an image).
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import re
import sys
import sysconfig
import warnings
from collections.abc import Iterator

from t5lite.data import cache

# Bump when the extraction changes, so stale caches are not reused.
VERSION = 1
# Directories of the standard library that hold tests, demos or third-party code, not docs.
_SKIPPED_DIRS = frozenset(
    {"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "site-packages", "dist-packages", "__pycache__"}
)
_DEFINITIONS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_MIN_WORDS = 6
# Share of letters and spaces below which a paragraph is code, a table or a grammar rule.
_MIN_LETTER_SHARE = 0.8


def corpus_name() -> str:
    return f"python{'.'.join(map(str, sys.version_info[:3]))}-docs-v{VERSION}"


def corpus_path() -> pathlib.Path:
    """The corpus file (one paragraph per line), built and cached on first use (~5 s)."""
    return cache.build_once(cache.cache_dir("corpus") / f"{corpus_name()}.txt", _build)


def _build() -> bytes:
    paragraphs = list(dict.fromkeys(" ".join(p.split()) for p in _raw_paragraphs() if _is_prose(p)))
    if not paragraphs:
        raise FileNotFoundError(
            f"Found no documentation in the Python standard library at {_stdlib_dir()}; this "
            f"Python installation lacks its .py sources. Use your own text instead, e.g. "
            f"t5lite.data.register_text_file_task(name, train_files='my_text/*.txt')."
        )
    return ("\n".join(paragraphs) + "\n").encode("utf-8")


def _stdlib_dir() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _raw_paragraphs() -> Iterator[str]:
    """Paragraphs (blank-line separated, indentation kept) of all docs, in a fixed order."""
    for document in _documents():
        yield from re.split(r"\n\s*\n", document)


def _documents() -> Iterator[str]:
    root = _stdlib_dir()
    for path in sorted(root.rglob("*.py")):
        if _SKIPPED_DIRS.isdisjoint(path.relative_to(root).parts):
            try:
                with warnings.catch_warnings():  # e.g. invalid escape sequences in old modules
                    warnings.simplefilter("ignore")
                    tree = ast.parse(path.read_bytes())
            except (SyntaxError, ValueError):  # files kept as examples of bad source
                continue
            yield from _docstrings(tree)
    # The rendered language reference; some distributions package it separately.
    if importlib.util.find_spec("pydoc_data") is not None:
        from pydoc_data import topics

        yield from (topics.topics[key] for key in sorted(topics.topics))


def _docstrings(node: ast.AST) -> Iterator[str]:
    """Docstrings of a module and of the classes and functions defined in it, depth first."""
    docstring = ast.get_docstring(node, clean=True)
    if docstring:
        yield docstring
    for child in node.body:
        if isinstance(child, _DEFINITIONS):
            yield from _docstrings(child)


def _is_prose(paragraph: str) -> bool:
    """Indented blocks are code examples; prose has enough words and mostly letters."""
    if not paragraph.strip() or paragraph[0].isspace() or ">>>" in paragraph:
        return False
    text = " ".join(paragraph.split())
    letters = sum(c.isalpha() or c == " " for c in text)
    return len(text.split()) >= _MIN_WORDS and letters >= _MIN_LETTER_SHARE * len(text)
