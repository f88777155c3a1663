"""model.fp16.onnx: the layers a policy puts at 16 bits in half precision, as a target with fast fp16 runs them.

A search simulates 16-bit layers by rounding to fp16 in PyTorch; model.onnx ships them in float32, which a
phone's fp16 kernels would run at twice the bytes the latency model charged. This file is model.onnx with
every node in half precision except the convs and linears of layers left at 32 bits, which stay float32
behind casts (``onnxruntime.transformers.float16``); inputs and outputs stay float32, so it runs where
model.onnx runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

from torch import nn

from autocompress.export.int8 import call_order, layer_nodes

HALF_BITS = 16


def half_layers(bits: Mapping[str, tuple[int, int]]) -> set[str]:
    """Module paths of the layers that run in half precision: weights and activations at 16 bits."""
    return {path for path, (w, a) in bits.items() if max(w, a) == HALF_BITS}


def export_fp16(float_model: nn.Module, example_input: Any, fp32_path: str | Path, out_path: str | Path,
                keep_float: Iterable[str]) -> Path:
    """Write ``fp32_path`` (the export of ``float_model``) in half precision to ``out_path``, keeping the
    conv/linear nodes of the layers in ``keep_float`` (module paths) in float32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(fp32_path))
    nodes = layer_nodes(model, call_order(float_model, example_input))  # module path -> its conv/linear node
    blocked = [nodes[path].name for path in keep_float if path in nodes]
    half = convert_float_to_float16(model, keep_io_types=True, node_block_list=blocked)
    _sort_nodes(half.graph)  # the converter appends its input casts at the end; the ONNX checker wants order
    out = Path(out_path)
    onnx.save(half, str(out))
    return out


def _sort_nodes(graph: Any) -> None:
    """Order ``graph.node`` topologically (stable: a node keeps its place unless an input comes later)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):  # a cycle or a dangling input: leave the rest as they were
            ordered += rest
            break
        pending = rest
    copies = [type(n)() for n in ordered]
    for copy, node in zip(copies, ordered):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)
