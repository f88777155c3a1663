"""What a model takes and returns: one or more named inputs of any dtype (float images, int64 token ids, masks).

An :class:`Inputs` record replaces a bare input shape wherever the project
needs example inputs: tracing, Torch-Pruning's dependency graph, ONNX export
and ONNX Runtime timing. Integer inputs remember their value range so that
generated examples stay valid (token ids below the vocabulary size, 0/1 masks).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

_INT_DTYPES = ("int64", "int32", "int16", "int8", "uint8", "bool")


@dataclass(frozen=True)
class InputSpec:
    """One input: its name, its shape with batch 1, its dtype, and integer inputs' value range [low, high)."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    low: int = 0
    high: int = 0

    @property
    def is_float(self) -> bool:
        return self.dtype not in _INT_DTYPES

    def make(self, batch: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
        """A random tensor of this input's kind: normal floats, or integers in [low, high)."""
        shape = (batch, *self.shape[1:])
        if self.is_float:
            return torch.randn(shape, generator=generator, dtype=getattr(torch, self.dtype))
        if self.dtype == "bool":
            return torch.ones(shape, dtype=torch.bool)
        return torch.randint(self.low, max(self.high, self.low + 1), shape, generator=generator,
                             dtype=getattr(torch, self.dtype))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "low": self.low, "high": self.high}


@dataclass(frozen=True)
class Inputs:
    """A model's positional inputs, in call order."""

    specs: tuple[InputSpec, ...]

    @classmethod
    def from_shape(cls, shape: Sequence[int], name: str = "input") -> "Inputs":
        return cls((InputSpec(name, (1, *tuple(int(s) for s in shape)[1:])),))

    @classmethod
    def from_example(cls, example: Any, model: nn.Module | None = None) -> "Inputs":
        """Describe example tensors (one tensor or a tuple); names come from ``model.forward``'s signature."""
        tensors = tuple(example) if isinstance(example, (tuple, list)) else (example,)
        if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
            raise TypeError("an example input must be a tensor or a tuple of tensors")
        names = _argument_names(model, len(tensors)) if model is not None else []
        specs = []
        for i, t in enumerate(tensors):
            name = names[i] if i < len(names) else ("input" if len(tensors) == 1 else f"input_{i}")
            dtype = str(t.dtype).removeprefix("torch.")
            low = high = 0
            if dtype in _INT_DTYPES and dtype != "bool" and t.numel():
                low, high = int(t.min()), int(t.max()) + 1
            specs.append(InputSpec(name, (1, *t.shape[1:]), dtype, low, high))
        return cls(tuple(specs))

    @classmethod
    def from_json(cls, rows: Sequence[dict[str, Any]]) -> "Inputs":
        return cls(tuple(InputSpec(r["name"], tuple(r["shape"]), r.get("dtype", "float32"), int(r.get("low", 0)),
                                   int(r.get("high", 0))) for r in rows))

    @property
    def first_shape(self) -> tuple[int, ...]:
        return self.specs[0].shape

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    @property
    def single_float(self) -> bool:
        """One float input: the classic image-model case."""
        return len(self.specs) == 1 and self.specs[0].is_float

    def example(self, batch: int = 1, seed: int | None = None) -> tuple[torch.Tensor, ...]:
        """Random example inputs for ``batch`` samples (seeded when ``seed`` is given)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        return tuple(s.make(batch, gen) for s in self.specs)

    def numel(self) -> int:
        """Elements of all inputs for one sample."""
        total = 0
        for s in self.specs:
            n = 1
            for d in s.shape[1:]:
                n *= d
            total += n
        return total

    def to_json(self) -> list[dict[str, Any]]:
        return [s.to_json() for s in self.specs]


def as_tuple(inputs: Any) -> tuple[torch.Tensor, ...]:
    """A batch's inputs as a tuple of positional arguments (a lone tensor becomes a 1-tuple)."""
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _argument_names(model: nn.Module, n: int) -> list[str]:
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return []
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return names[:n] if len(names) >= n else []


def flatten_output(out: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) leaves of a model output: a tensor, tuple/list, dict or ModelOutput."""
    if isinstance(out, torch.Tensor):
        return [(prefix or "output", out)]
    if isinstance(out, Mapping):
        return [leaf for k, v in out.items() if v is not None
                for leaf in flatten_output(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(out, (tuple, list)):
        return [leaf for i, v in enumerate(out) if v is not None
                for leaf in flatten_output(v, f"{prefix}.{i}" if prefix else f"output_{i}")]
    return []


def primary_output(out: Any) -> torch.Tensor:
    """The tensor a task's default loss and metrics read: ``logits`` where the output names one, else the first."""
    if isinstance(out, Mapping) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    leaves = flatten_output(out)
    if not leaves:
        raise ValueError(f"the model returned {type(out).__name__} with no tensor in it")
    return leaves[0][1]
