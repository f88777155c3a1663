"""Compression primitives behind one interface (``base.Primitive``), and ``apply`` / ``estimate``.

The registry and the order the primitives run in are in ``primitives``.
"""

from autocompress.compress.apply import apply, estimate
from autocompress.compress.base import ApplyContext, Primitive
from autocompress.compress.primitives import PRIMITIVES, build_space

__all__ = ["PRIMITIVES", "ApplyContext", "Primitive", "apply", "build_space", "estimate"]
