"""fp32 ONNX export that passes ``onnx.checker`` and keeps module paths in node names."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from autocompress.errors import AutocompressError

OPSET = 17


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike,
                opset: int = OPSET, dynamic_batch: bool = True) -> Path:
    """Export ``model`` to ``path``; node names carry module paths (``/layer1/layer1.0/conv1/Conv``).

    The TorchScript-based exporter is used because its node names map back to
    module paths, which the int8 exporter needs to keep chosen layers in float.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    model = model.eval()
    axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example_input,), str(tmp), input_names=["input"], output_names=["output"],
                              opset_version=opset, dynamic_axes=axes, dynamo=False, do_constant_folding=True)
        onnx.checker.check_model(str(tmp))
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        raise AutocompressError(f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    os.replace(tmp, path)
    return path
