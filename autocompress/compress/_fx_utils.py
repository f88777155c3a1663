"""Small torch.fx and cost-table helpers shared by the merge and branch primitives.

Transforms re-trace the model they are given (it may be pruned, or already a
GraphModule) and find layers by module path, never by the original graph's
node names or numbers; estimates find rows by the original node names.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from autocompress.space.costs import CostTable, LayerCost
from autocompress.space.graph import symbolic_trace

ELEMENTWISE_FUNCTIONS = {torch.relu, torch.nn.functional.relu, torch.nn.functional.relu6,
                         torch.nn.functional.hardswish, torch.sigmoid}
ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid"}
ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh,
               nn.LeakyReLU, nn.ELU, nn.Mish)


def traced(model: nn.Module) -> fx.GraphModule:
    """A fresh GraphModule of ``model`` with the project's leaf rules; module paths are kept."""
    return symbolic_trace(model)


def module_nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Module path -> the node calling it (modules called more than once are left out)."""
    seen: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            seen.setdefault(str(n.target), []).append(n)
    return {k: v[0] for k, v in seen.items() if len(v) == 1}


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(str(node.target)) if node.op == "call_module" else None


def only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def is_elementwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An activation that acts on each element alone (commutes with subsampling)."""
    if node.op == "call_module":
        return isinstance(module_of(gm, node), ACT_MODULES)
    if node.op == "call_function":
        return node.target in ELEMENTWISE_FUNCTIONS
    return node.op == "call_method" and node.target in ELEMENTWISE_METHODS


def fold_bn(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """``layer`` with ``bn`` folded in (eval-mode statistics); the new bias trains like the weight."""
    fuse = fuse_conv_bn_eval if isinstance(layer, nn.Conv2d) else fuse_linear_bn_eval
    fused = fuse(layer.eval(), bn.eval())
    fused.bias.requires_grad_(fused.weight.requires_grad)  # torch leaves a bias it created frozen
    return fused


def set_module(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def bypass(gm: fx.GraphModule, node: fx.Node) -> None:
    """Remove a one-input node, its users reading its input instead."""
    node.replace_all_uses_with(node.all_input_nodes[0])
    gm.graph.erase_node(node)


def not_in_place(gm: fx.GraphModule, node: fx.Node) -> None:
    """Make ``node``'s readers compute out of place (same values; a view's base stays intact)."""
    for user in list(node.users):
        mod = module_of(gm, user)
        if mod is not None and getattr(mod, "inplace", False):
            mod.inplace = False
        elif user.op == "call_function" and user.kwargs.get("inplace"):
            user.kwargs = {**user.kwargs, "inplace": False}
        elif user.op == "call_method" and str(user.target).endswith("_") and not str(user.target).startswith("_"):
            user.target = str(user.target)[:-1]


def finish(gm: fx.GraphModule) -> fx.GraphModule:
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def position(gm: fx.GraphModule) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(gm.graph.nodes)}


def out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a conv along one axis (PyTorch's formula)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def pair(v: int | Iterable[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    a, b = tuple(v)
    return (int(a), int(b))


def scale_numel(row: LayerCost, old: int, new: int) -> None:
    """Rescale a row's output element count when one of its dimensions goes from ``old`` to ``new``."""
    if old:
        row.out_numel = row.out_numel // old * new


def drop_row(table: CostTable, name: str, readers_use: str | None = None) -> None:
    """Remove a row; its readers read ``readers_use`` if given, else the row's own inputs."""
    if name not in table:
        return
    if readers_use is not None:
        for r in table.consumers(name):
            r.inputs = list(dict.fromkeys(readers_use if x == name else x for x in r.inputs))
    table.remove(name)
