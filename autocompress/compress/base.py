"""The interface every compression primitive implements.

A primitive offers decisions on the traced graph, edits a cost table the way
its transform edits the model (so costs are known without building it), and
transforms a model. ``apply`` and ``estimate`` (``compress.apply``) run the
registered primitives in one fixed order, so both see the same sequence.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from autocompress.space.costs import CostTable
from autocompress.space.graph import ModelGraph
from autocompress.space.space import Decision, SearchSpace

Chosen = Sequence[tuple[Decision, Any]]


@dataclass
class ApplyContext:
    """What one ``apply`` call carries between primitives.

    ``boosted`` names modules that a lossy merge created or changed: fine-tuning
    trains them at a higher learning rate (DeepRebirth re-trains merged layers).
    ``notes`` records decisions that were skipped or adjusted, and why.
    ``example_input`` and ``calibration`` (optional, for activation ranges and
    int8) are a tensor or a tuple of tensors, one per model input.
    """

    space: SearchSpace
    example_input: Any
    boosted: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    calibration: Any = None
    extras: dict[str, Any] = field(default_factory=dict)


class Primitive(ABC):
    """One compression primitive: its decisions, its cost effect, its transform."""

    kinds: tuple[str, ...] = ()

    @abstractmethod
    def decisions(self, graph: ModelGraph) -> list[Decision]:
        """The decisions this primitive offers on ``graph`` (stable ids, deterministic order)."""

    @abstractmethod
    def estimate(self, table: CostTable, chosen: Chosen, space: SearchSpace) -> None:
        """Edit ``table`` in place as ``transform`` would change the model for ``chosen``."""

    @abstractmethod
    def transform(self, model: nn.Module, chosen: Chosen, ctx: ApplyContext) -> nn.Module:
        """Return the model with ``chosen`` (non-identity decisions of this primitive) applied."""


def modules_under(model: nn.Module, path: str, types: tuple[type, ...] = (nn.Conv2d, nn.Linear)) -> list[tuple[str, nn.Module]]:
    """Modules of ``types`` at ``path`` or below it: a path stands for what replaced it."""
    out = []
    for name, m in model.named_modules():
        if (name == path or name.startswith(path + ".")) and isinstance(m, types):
            out.append((name, m))
    return out


def rows_under(table: CostTable, path: str, ops: tuple[str, ...] = ("conv", "linear")) -> list:
    """Table rows whose module path is ``path`` or below it (the estimate's twin of ``modules_under``)."""
    return [r for r in table if r.op in ops and (r.target == path or r.target.startswith(path + "."))]
