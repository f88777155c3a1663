"""``apply(model, policy)`` and its analytic twin ``estimate(space, policy)``."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from autocompress.compress.base import ApplyContext
from autocompress.compress.primitives import PRIMITIVES
from autocompress.space.costs import CostTable
from autocompress.space.policy import Policy
from autocompress.space.space import SearchSpace


def _chosen_by_primitive(space: SearchSpace, policy: Policy) -> list[tuple[Any, list]]:
    chosen = policy.non_identity(space)
    out = []
    for _, prim in PRIMITIVES.items():
        mine = [(space[k], v) for k, v in chosen.items() if space[k].kind in prim.kinds]
        out.append((prim, mine))
    return out


def estimate(space: SearchSpace, policy: Policy, base: CostTable | None = None) -> CostTable:
    """The cost table of the model under ``policy``, without building it."""
    table = (base or space.base_table()).copy()
    for prim, mine in _chosen_by_primitive(space, policy):
        if mine:
            prim.estimate(table, mine, space)
    return table


def apply(model: nn.Module, policy: Policy, space: SearchSpace, *, calibration: torch.Tensor | None = None,
          copy_model: bool = True, ctx: ApplyContext | None = None) -> nn.Module:
    """Return ``model`` compressed by ``policy`` (validated against ``space``).

    The input model is left untouched unless ``copy_model`` is False. Pass
    ``ctx`` to read back what the primitives recorded (boosted layers, notes).
    """
    policy.validate(space)
    if copy_model:
        model = copy.deepcopy(model)
    model.eval()
    if ctx is None:
        ctx = ApplyContext(space, space.graph.example(), calibration=calibration)
    for prim, mine in _chosen_by_primitive(space, policy):
        if mine:
            model = prim.transform(model, mine, ctx)
    return model.eval()
