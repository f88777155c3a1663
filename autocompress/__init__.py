"""autocompress: find the most accurate compressed model that meets a hardware budget.

Importing the package stays light: ray and onnxruntime are imported only by the
parts that need them.
"""

__version__ = "0.1.0"

from autocompress.errors import AutocompressError, UserInputError  # noqa: E402

__all__ = ["AutocompressError", "UserInputError", "__version__"]
