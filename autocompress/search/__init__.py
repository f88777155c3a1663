"""The search: screening, sensitivity, allocation, drivers (Optuna, Ray Tune) and the output folder.

``autocompress.search(model, task, target=..., budget=...)`` calls the package
itself: the Python API's one call (:func:`autocompress.search.run.search`).
"""

import sys
import types
from typing import Any


class _CallableSearch(types.ModuleType):
    """A package that is also a function, so ``autocompress.search(...)`` and ``autocompress.search.run`` both work."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from autocompress.search.run import search

        return search(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableSearch
