"""Compression primitives, registered in the order ``apply`` runs them.

prune -> merge (DeepRebirth streamlining) -> branch -> rank -> quant.
Pruning first, so later primitives see the final widths; merging before
branch fusion and factorisation, so they work on BN-folded convs;
quantisation last, so it covers every layer the others produced.
"""

from autocompress.compress.base import ApplyContext, Primitive
from autocompress.compress.branch import BranchMerge
from autocompress.compress.lowrank import LowRank
from autocompress.compress.merge import RebirthMerge
from autocompress.compress.prune import ChannelPrune
from autocompress.compress.quant import Quantize
from autocompress.registry import Registry

PRIMITIVES: Registry[Primitive] = Registry("compression primitive")
PRIMITIVES.register("prune", ChannelPrune())
PRIMITIVES.register("merge", RebirthMerge())
PRIMITIVES.register("branch", BranchMerge())
PRIMITIVES.register("rank", LowRank())
PRIMITIVES.register("quant", Quantize())

from autocompress.compress.apply import apply, estimate  # noqa: E402

__all__ = ["PRIMITIVES", "ApplyContext", "Primitive", "apply", "estimate"]
