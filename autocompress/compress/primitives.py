"""The primitives, registered in the order ``apply`` runs them, and the space they offer on a graph.

prune -> heads -> drop -> merge (DeepRebirth streamlining) -> branch -> rank -> quant.
Pruning (channels, then attention heads) first, on the original graph where
the coupling is known, so later primitives see the final widths; whole blocks
next, so the factorisations and bit-widths inside a dropped block find their
layers gone and are skipped; merging before branch fusion and factorisation,
so they work on BN-folded convs; quantisation last, so it covers every layer
the others produced.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from autocompress.compress.base import Primitive
from autocompress.compress.branch import BranchMerge
from autocompress.compress.drop import LayerDrop
from autocompress.compress.heads import HeadPrune
from autocompress.compress.lowrank import LowRank
from autocompress.compress.merge import RebirthMerge
from autocompress.compress.prune import ChannelPrune
from autocompress.compress.quant import Quantize
from autocompress.registry import Registry
from autocompress.space.graph import ModelGraph
from autocompress.space.space import KINDS, Decision, SearchSpace, check_options

PRIMITIVES: Registry[Primitive] = Registry("compression primitive")
PRIMITIVES.register("prune", ChannelPrune())
PRIMITIVES.register("heads", HeadPrune())
PRIMITIVES.register("drop", LayerDrop())
PRIMITIVES.register("merge", RebirthMerge())
PRIMITIVES.register("branch", BranchMerge())
PRIMITIVES.register("rank", LowRank())
PRIMITIVES.register("quant", Quantize())


def build_space(graph: ModelGraph, model_spec: str = "", kinds: Iterable[str] = KINDS,
                options: Mapping[str, Any] | None = None) -> SearchSpace:
    """Collect every primitive's decisions on ``graph``, restricted to ``kinds``.

    ``options`` are space-wide settings that change what a choice means (e.g.
    ``prune_round_to``); a policy carries them so it re-applies identically.
    """
    check_options(options or {})
    wanted = set(kinds)
    decisions: list[Decision] = []
    for _, primitive in PRIMITIVES.items():
        if wanted & set(primitive.kinds):
            decisions.extend(d for d in primitive.decisions(graph) if d.kind in wanted)
    return SearchSpace(model_spec, graph, decisions, dict(options or {}))
