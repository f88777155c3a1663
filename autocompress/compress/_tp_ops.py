"""Torch-Pruning's parameter-free graph nodes (adapter).

Torch-Pruning exposes no public list or base class of the dependency graph's parameter-free ops
(element-wise, concat, split, reshape, ...); pruning needs to know them to tell a group it can
cost exactly from one that holds a layer it does not know. This module is the one place that
names them.
"""

from __future__ import annotations

import torch_pruning as tp

GRAPH_OPS = (tp.ops._ElementWiseOp, tp.ops._ConcatOp, tp.ops._SplitOp, tp.ops._ReshapeOp, tp.ops._SliceOp,
             tp.ops._OutputOp, tp.ops._UnbindOp, tp.ops._ExpandOp)
