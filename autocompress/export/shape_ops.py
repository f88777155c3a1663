"""How many run-time shape-arithmetic nodes ONNX Runtime executes for an exported model.

A model whose code reads its input's size (``x.view(b, t, heads, d)`` with ``b, t = x.shape[:2]``, as
``transformers`` encoders do) exports with a dynamic batch and sequence axis as a chain of tiny nodes
(Shape, Gather, Unsqueeze, Concat, ...) in front of each reshape. Each is a dispatch of its own, and
the cost table, built from a static capture, does not see them: on a 4-layer BERT with 24 tokens
they are ~110 of the ~260 nodes ONNX Runtime runs. ``count_shape_ops`` counts them in the graph
ONNX Runtime actually runs (after its optimiser folds what is static and merges duplicates).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

log = logging.getLogger(__name__)


# A constant this small can be part of a shape computation; a larger one is a weight (an embedding
# table that a position Range indexes is work, not shape arithmetic).
SHAPE_CONSTANT_ELEMENTS = 64


def _small(tensor: Any) -> bool:
    return math.prod(tensor.dims) <= SHAPE_CONSTANT_ELEMENTS


def shape_nodes(graph: Any) -> int:
    """Nodes of an ONNX ``graph`` that compute shapes: a ``Shape`` and every node whose inputs are all shapes
    or small constants (at least one a shape); a node that also reads data (a Reshape's tensor) is real work."""
    constants = {t.name for t in graph.initializer if _small(t)}
    shapes: set[str] = set()
    count = 0
    for node in graph.node:  # ONNX graphs are stored in topological order
        ins = [i for i in node.input if i]
        if node.op_type == "Constant":
            if all(_small(a.t) for a in node.attribute if a.name == "value"):
                constants.update(node.output)
            continue
        if ins and all(i in constants for i in ins):
            constants.update(node.output)  # folded by the runtime before the first call
            continue
        if node.op_type == "Shape" or (any(i in shapes for i in ins) and all(i in shapes or i in constants
                                                                             for i in ins)):
            shapes.update(node.output)
            count += 1
    return count


def count_shape_ops(path: str | os.PathLike) -> int:
    """Shape-arithmetic nodes in the graph ONNX Runtime runs for the file at ``path`` (one CPU thread)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="autocompress-shape-ops-") as tmp:
        optimised = Path(tmp) / "optimised.onnx"
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.log_severity_level = 3  # the serialised model's hardware-specific-layout warning is expected
        so.optimized_model_filepath = str(optimised)
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return shape_nodes(onnx.load(str(optimised)).graph)


def model_shape_ops(model: nn.Module, example: Any) -> int:
    """``count_shape_ops`` of ``model`` exported as deployed (dynamic batch and sequence axes); 0 where it
    does not export (the search reports that itself when it exports the result)."""
    from autocompress.errors import AutocompressError
    from autocompress.export.onnx import export_onnx

    with tempfile.TemporaryDirectory(prefix="autocompress-shape-ops-") as tmp:
        try:
            path = export_onnx(model, example, Path(tmp) / "model.onnx")
            return count_shape_ops(path)
        except (AutocompressError, RuntimeError, ValueError) as exc:
            log.debug("shape ops not counted: %s", exc)
            return 0
