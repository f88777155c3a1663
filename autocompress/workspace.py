"""A workspace: the loaded model, its traced graph, its search space and (through the space) its base cost table."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Iterable

from torch import nn

from autocompress.compress import build_space
from autocompress.compress.attention import split_attention
from autocompress.errors import UserInputError
from autocompress.models import LoadedModel, load_model
from autocompress.models.sources import load_weights
from autocompress.space.inputs import Inputs
from autocompress.space.graph import ModelGraph, trace
from autocompress.space.space import KINDS, SearchSpace


@dataclass
class Workspace:
    """A loaded model, its traced graph and its search space."""

    loaded: LoadedModel
    space: SearchSpace

    @property
    def model(self) -> nn.Module:
        return self.loaded.model

    @property
    def graph(self) -> ModelGraph:
        return self.space.graph


def open_model(spec: str, *, weights: str | os.PathLike | None = None, input_shape: tuple[int, ...] | None = None,
               leaf: Iterable[str] = (), options: dict[str, Any] | None = None, pretrained: bool = False,
               example_input: Any = None, module: nn.Module | None = None, kinds: Iterable[str] = (),
               pretrained_on: str | None = None) -> Workspace:
    """Load ``spec`` (or take ``module``, an in-memory model named ``spec``), trace it and build its search space
    (of the decision ``kinds`` only, where given).

    ``pretrained`` asks for a built-in model's trained weights (trained and
    cached on first use, on its own data or on the bundled set ``pretrained_on``) when no weights file is given. ``example_input`` (a
    tensor or tuple of tensors of any dtype) replaces ``input_shape``.
    """
    if module is not None:
        if weights is not None:
            load_weights(module, weights)
        loaded = LoadedModel(spec, module.eval(), tuple(input_shape or ()))
    else:
        loaded = load_model(spec, weights=weights, input_shape=input_shape)
    if pretrained and weights is None and spec.startswith("builtin:"):
        from autocompress.evaluators.train import pretrained_builtin

        loaded.model = pretrained_builtin(spec.partition(":")[2], data=pretrained_on).eval()
    if example_input is None:
        example_input = loaded.example_input
    if any(isinstance(m, nn.MultiheadAttention) for m in loaded.model.modules()):
        # Explicit q/k/v/out layers: traceable per projection, prunable per head, exportable to ONNX.
        loaded.model = split_attention(copy.deepcopy(loaded.model) if module is not None else loaded.model)
    if example_input is not None:
        try:
            inputs = Inputs.from_example(example_input, loaded.model)
        except TypeError as exc:
            raise UserInputError(f"bad example input: {exc}; give a tensor or a tuple of tensors") from None
        loaded.input_shape = inputs.first_shape
        graph = trace(loaded.model, leaf_paths=leaf, inputs=inputs)
    else:
        graph = trace(loaded.model, loaded.input_shape, leaf_paths=leaf)
    return Workspace(loaded, build_space(graph, spec, kinds=tuple(kinds) or KINDS, options=options))
