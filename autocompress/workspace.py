"""A workspace: the loaded model, its traced graph, its search space and (through the space) its base cost table."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable

from torch import nn

from autocompress.compress import build_space
from autocompress.models import LoadedModel, load_model
from autocompress.space.graph import ModelGraph, trace
from autocompress.space.space import SearchSpace


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
               leaf: Iterable[str] = (), options: dict[str, Any] | None = None, pretrained: bool = False) -> Workspace:
    """Load ``spec``, trace it and build its search space.

    ``pretrained`` asks for a built-in model's trained weights (trained and
    cached on first use) when no weights file is given.
    """
    loaded = load_model(spec, weights=weights, input_shape=input_shape)
    if pretrained and weights is None and spec.startswith("builtin:"):
        from autocompress.evaluators.train import pretrained_builtin

        loaded.model = pretrained_builtin(spec.partition(":")[2]).eval()
    graph = trace(loaded.model, loaded.input_shape, leaf_paths=leaf)
    return Workspace(loaded, build_space(graph, spec, options=options))
