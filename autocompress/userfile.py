"""Import a function from a user's Python file (``path/to/file.py:factory`` specs)."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path
from types import ModuleType
from typing import Callable

from autocompress.errors import UserInputError


def import_function(path: str, name: str, error: type[UserInputError], what: str) -> tuple[Callable, ModuleType]:
    """Return ``name`` from the file at ``path`` and the module it lives in.

    Any failure (missing file, import error, no such function) raises ``error``
    with one line that names the problem; ``what`` is "model" or "data".
    """
    file = Path(path)
    if not file.is_file():
        raise error(f"{what} file {path!r} does not exist; give path/to/file.py:factory")
    spec = importlib.util.spec_from_file_location(f"_autocompress_{what}_{abs(hash(str(file.resolve())))}", file)
    if spec is None or spec.loader is None:
        raise error(f"cannot import {path!r} as a Python file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's file: report, do not crash
        raise error(f"importing {path!r} failed: {type(exc).__name__}: {exc}".splitlines()[0]) from exc
    fn = getattr(module, name, None)
    if fn is None or not callable(fn):
        names = [n for n, v in vars(module).items() if not n.startswith("_") and inspect.isfunction(v)]
        raise error(f"{path!r} has no function {name!r}; functions there: {', '.join(names) or '(none)'}")
    return fn, module


def call_factory(fn: Callable, spec_text: str, error: type[UserInputError]):
    """Call a user's factory; its exception becomes ``error`` with the factory named."""
    try:
        return fn()
    except Exception as exc:
        raise error(f"{spec_text} raised {type(exc).__name__}: {exc}".splitlines()[0]) from exc
