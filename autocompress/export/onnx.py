"""fp32 ONNX export that passes ``onnx.checker`` and keeps module paths in node names.

Any model the project compresses exports: one or several inputs of any dtype
(named after ``forward``'s arguments), outputs that are tensors, tuples,
dicts or ``transformers`` ``ModelOutput``s (flattened, named after their keys),
a dynamic batch axis and, for token inputs, a dynamic sequence axis; or, with
``static_shapes``, every dimension fixed at the example's, which mobile
runtimes want (NNAPI, Core ML and QNN execution providers, TFLite converters)
and which lets the exporter fold the shape arithmetic a dynamic graph carries.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autocompress.errors import AutocompressError
from autocompress.space.export_graph import quiet
from autocompress.space.inputs import Inputs, as_tuple, flatten_output

OPSET = 17
SHAPES_KEY = "autocompress.example_shapes"  # metadata: the example inputs' shapes, for timing at the real sizes


class _Flat(nn.Module):
    """Returns the model's output leaves as a flat tuple, which every ONNX exporter accepts."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t for _, t in flatten_output(self.model(*args)))


def _safe_name(name: str) -> str:
    return name.replace(".", "_")


def export_onnx(model: nn.Module, example_input: Any, path: str | os.PathLike,
                opset: int = OPSET, static_shapes: bool = False) -> Path:
    """Export ``model`` to ``path``; node names carry module paths (``/layer1/layer1.0/conv1/Conv``).

    The TorchScript-based exporter is used because its node names map back to
    module paths, which the int8 exporter needs to keep chosen layers in float.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    model = model.eval()
    args = as_tuple(example_input)
    inputs = Inputs.from_example(args, model)
    single = len(args) == 1 and args[0].is_floating_point()
    in_names = ["input"] if single else [_safe_name(n) for n in inputs.names]
    with torch.no_grad():
        leaves = flatten_output(model(*args))
    plain = len(leaves) == 1 and leaves[0][0] == "output"
    out_names = ["output"] if plain else [_safe_name(n) for n, _ in leaves]
    axes: dict[str, dict[int, str]] | None = None
    if not static_shapes:
        axes = {n: {0: "batch"} for n in (*in_names, *out_names)}
        for n, t in zip(in_names, args):
            if not t.is_floating_point() and t.dim() == 2:
                axes[n][1] = "sequence"  # token ids and masks: any sequence length up to the model's limit
    wrapped = model if plain else _Flat(model).eval()  # an eval wrapper: export restores the wrapper's mode
    try:
        # The exporter prints its IR graph (from C++) when it fails: that goes to the debug log.
        with quiet("the ONNX exporter"), torch.no_grad(), _no_mha_fastpath():
            torch.onnx.export(wrapped, args, str(tmp), input_names=in_names, output_names=out_names,
                              opset_version=opset, dynamic_axes=axes, dynamo=False, do_constant_folding=True)
        proto = onnx.load(str(tmp))
        entry = proto.metadata_props.add()
        entry.key, entry.value = SHAPES_KEY, json.dumps({n: list(t.shape) for n, t in zip(in_names, args)})
        onnx.save(proto, str(tmp))
        onnx.checker.check_model(str(tmp))
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise AutocompressError(f"ONNX export failed: {type(exc).__name__}: {reason} "
                                "(AUTOCOMPRESS_DEBUG=1 shows the exporter's log)") from exc
    os.replace(tmp, path)
    return path


class _no_mha_fastpath:
    """nn.MultiheadAttention's inference fast path (``_native_multi_head_attention``) has no ONNX export."""

    def __enter__(self) -> None:
        self.was = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)

    def __exit__(self, *exc: Any) -> None:
        torch.backends.mha.set_fastpath_enabled(self.was)
