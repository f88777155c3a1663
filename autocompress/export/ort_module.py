"""An exported ONNX file behind a PyTorch module's call, so the user's metric can score what we ship.

``OrtModule(path, like=model, example=...)`` runs the file in ONNX Runtime and
returns outputs in the structure the PyTorch model returned (a tensor, a tuple,
or a dict whose keys also read as attributes, like a ``ModelOutput``), so
``task.evaluate`` and the built-in accuracy run on it unchanged, at any batch
size, a static-shape file's too.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch import nn

from autocompress.space.inputs import as_tuple, flatten_output


class _Output(dict):
    """A dict whose keys read as attributes too (``out["logits"]`` and ``out.logits``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _template(out: Any) -> Any:
    """The output's structure with its tensor leaves replaced by their flattened positions."""
    counter = iter(range(len(flatten_output(out))))

    def walk(o: Any) -> Any:
        if isinstance(o, torch.Tensor):
            return next(counter)
        if isinstance(o, Mapping):
            return {k: walk(v) for k, v in o.items() if v is not None}
        if isinstance(o, (tuple, list)):
            return tuple(walk(v) for v in o if v is not None)
        return None

    return walk(out)


def _fill(template: Any, leaves: list[torch.Tensor]) -> Any:
    if isinstance(template, int):
        return leaves[template]
    if isinstance(template, dict):
        return _Output({k: _fill(v, leaves) for k, v in template.items()})
    if isinstance(template, tuple):
        return tuple(_fill(v, leaves) for v in template)
    return None


class OrtModule(nn.Module):
    """Calls an ONNX file through ONNX Runtime with PyTorch tensors in and out (no gradients)."""

    def __init__(self, path: str | os.PathLike, like: nn.Module, example: Any, threads: int = 1) -> None:
        super().__init__()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        inputs = self.session.get_inputs()
        self.names = [i.name for i in inputs]
        first = inputs[0].shape[0] if inputs[0].shape else None
        self.batch = first if isinstance(first, int) else None  # a static-shape file's fixed batch
        with torch.no_grad():
            self.template = _template(like.eval()(*as_tuple(example)))

    def forward(self, *args: torch.Tensor) -> Any:
        args = tuple((t.float() if t.is_floating_point() else t).detach().cpu() for t in args)
        n = len(args[0]) if args and args[0].dim() else 0
        if self.batch is None or n == self.batch or n == 0:
            return _fill(self.template, self._run(args))
        # A static file runs the batch in slices of its own size; the last slice is padded by repeating its
        # final sample, and the padding's outputs dropped.
        parts: list[list[torch.Tensor]] = []
        for i in range(0, n, self.batch):
            piece = tuple(t[i:i + self.batch] for t in args)
            short = self.batch - len(piece[0])
            if short:
                piece = tuple(torch.cat([p, p[-1:].expand(short, *p.shape[1:])]) for p in piece)
            parts.append([o[:self.batch - short] for o in self._run(piece)])
        return _fill(self.template, [torch.cat(leaf) for leaf in zip(*parts)])

    def _run(self, args: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        feeds = {name: t.numpy() for name, t in zip(self.names, args)}
        return [torch.from_numpy(a) for a in self.session.run(None, feeds)]
