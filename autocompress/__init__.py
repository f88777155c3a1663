"""autocompress: find the most accurate compressed model that meets a hardware budget.

Importing the package stays light: ``Task`` and ``search`` (the Python API:
``autocompress.search(model, task, target="mobile", budget="5ms")``) load
torch on first use; ray and onnxruntime are imported only by the parts that need them.
"""

from typing import Any

__version__ = "0.1.0"

from autocompress.errors import AutocompressError, UserInputError  # noqa: E402

__all__ = ["AutocompressError", "Task", "UserInputError", "__version__", "search"]


def __getattr__(name: str) -> Any:
    if name == "Task":
        from autocompress.evaluators.task import Task

        return Task
    if name == "search":
        import autocompress.search as search_package

        return search_package
    raise AttributeError(f"module 'autocompress' has no attribute {name!r}")
