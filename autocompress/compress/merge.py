"""DeepRebirth layer merging: the ``merge`` decisions (choices [0, 1], identity 0).

Three patterns, each one decision:

- ``merge:bn:<conv or linear path>``: the BatchNorm that follows is folded into
  the layer's weights and bias (exact in eval mode).
- ``merge:pool:<conv path>``: conv -> [BN] -> [activation] -> max/avg pool; the
  pool is removed and its stride moves into the conv (lossy: the conv computes
  one position per pool window instead of the window's max or mean). Offered
  where the strided conv's output size equals the pool's. The conv (and its BN)
  go to ``ctx.boosted`` for fine-tuning at a higher learning rate.
- ``merge:linear:<first path>`` / ``merge:conv:<first path>``: two linear layers,
  or a conv and a following 1x1 conv, with nothing but dropout / identity between
  them, collapsed into one layer (exact in eval mode). Offered only where the
  collapsed layer has no more MACs than the pair. An absorbed dropout puts the
  layer in ``ctx.boosted``.

The transform runs BN folds first, then pool folds, then collapses, so one conv
may take several of them; ``estimate`` edits the cost table in the same order.
Folded and collapsed layers keep the first layer's module path.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import fx, nn

from autocompress.compress import _fx_utils as fxu
from autocompress.compress.base import ApplyContext, Chosen, Primitive
from autocompress.space.costs import CostTable
from autocompress.space.graph import ModelGraph
from autocompress.space.space import Decision, SearchSpace

_POOLS = ("MaxPool2d", "AvgPool2d")
_PASS_TYPES = (nn.Dropout, nn.Identity)


def _single_successor(g, name: str) -> str | None:
    succ = list(g.successors(name))
    return succ[0] if len(succ) == 1 else None


def _prod(xs) -> int:
    n = 1
    for x in xs:
        n *= int(x)
    return n


def _decision(pattern: str, name: str, first: str, layers: list[str], info: dict[str, Any]) -> Decision:
    """``pattern`` picks the transform (bn, pool, chain); ``name`` is the id's middle part."""
    return Decision(id=f"merge:{name}:{first}", kind="merge", layers=tuple(layers), choices=(0, 1),
                    identity=0, info={"pattern": pattern, **info})


def _bn_decision(graph: ModelGraph, name: str, mods: dict, calls: Counter) -> Decision | None:
    g = graph.graph
    a = g.nodes[name]
    s = _single_successor(g, name)
    if s is None or g.nodes[s]["op"] != "bn" or calls[g.nodes[s]["target"]] != 1:
        return None
    bn = mods[g.nodes[s]["target"]]
    if bn.running_mean is None or bn.running_var is None:
        return None
    if a["op"] == "conv" and not isinstance(bn, nn.BatchNorm2d):
        return None
    if a["op"] == "linear" and not (isinstance(bn, nn.BatchNorm1d) and len(a["out_shape"] or ()) == 2):
        return None
    return _decision("bn", "bn", a["target"], [a["target"], g.nodes[s]["target"]],
                     {"layer": name, "bn": s, "path": a["target"], "bn_path": g.nodes[s]["target"]})


def _pool_decision(graph: ModelGraph, name: str, mods: dict) -> Decision | None:
    g = graph.graph
    a = g.nodes[name]
    conv = mods[a["target"]]
    if a["op"] != "conv" or isinstance(conv.padding, str) or not a["in_shapes"] or not a["in_shapes"][0]:
        return None
    between, cur = [], name
    while True:
        s = _single_successor(g, cur)
        if s is None:
            return None
        op = g.nodes[s]["op"]
        if op in ("bn", "act") and len(between) < 4:
            between.append(s)
            cur = s
            continue
        if op != "pool" or g.nodes[s]["module_type"] not in _POOLS:
            return None
        break
    pool = mods[g.nodes[s]["target"]]
    if getattr(pool, "return_indices", False):
        return None
    ps = fxu.pair(pool.stride or pool.kernel_size)
    stride = tuple(st * p for st, p in zip(fxu.pair(conv.stride), ps))
    in_hw = tuple(a["in_shapes"][0][2:])
    pool_hw = tuple(g.nodes[s]["out_shape"][2:])
    new_hw = tuple(fxu.out_size(in_hw[i], conv.kernel_size[i], stride[i], conv.padding[i], conv.dilation[i])
                   for i in range(2))
    if new_hw != pool_hw:
        return None
    paths = [g.nodes[b]["target"] for b in between if g.nodes[b]["module_type"]]
    bn_paths = [g.nodes[b]["target"] for b in between if g.nodes[b]["op"] == "bn"]
    return _decision("pool", "pool", a["target"], [a["target"], *paths, g.nodes[s]["target"]],
                     {"layer": name, "between": tuple(between), "pool": s, "path": a["target"],
                      "pool_path": g.nodes[s]["target"], "bn_paths": tuple(bn_paths), "in_hw": in_hw,
                      "pool_hw": pool_hw, "pool_stride": ps})


def _chain_decision(graph: ModelGraph, name: str, mods: dict, calls: Counter) -> Decision | None:
    g = graph.graph
    a = g.nodes[name]
    mids, cur = [], name
    while True:
        s = _single_successor(g, cur)
        if s is None:
            return None
        if g.nodes[s]["op"] == "dropout" or g.nodes[s]["module_type"] == "Identity":
            mids.append(s)
            cur = s
            continue
        break
    b = g.nodes[s]
    if b["op"] != a["op"] or calls[b["target"]] != 1:
        return None
    first, second = mods[a["target"]], mods[b["target"]]
    if a["op"] == "conv":
        if (first.groups != 1 or isinstance(first.padding, str) or second.groups != 1
                or tuple(second.kernel_size) != (1, 1) or isinstance(second.padding, str)
                or tuple(second.padding) != (0, 0)):
            return None
        merged_macs = first.in_channels * _prod(first.kernel_size) * second.out_channels * _prod(b["out_shape"][2:])
    else:
        rows = _prod(b["out_shape"][1:-1]) if len(b["out_shape"]) > 2 else 1
        merged_macs = first.in_features * second.out_features * rows
    if merged_macs > a["macs"] + b["macs"]:
        return None
    paths = [g.nodes[m]["target"] for m in mids if g.nodes[m]["module_type"]]
    return _decision("chain", a["op"], a["target"], [a["target"], *paths, b["target"]],
                     {"layer": name, "mids": tuple(mids), "second": s, "path": a["target"],
                      "second_path": b["target"], "absorbs": bool(mids)})


class RebirthMerge(Primitive):
    """BN folding, pool-into-stride folding and collapsing of linear chains (DeepRebirth streamlining)."""

    kinds = ("merge",)

    def decisions(self, graph: ModelGraph) -> list[Decision]:
        if not graph.fx_traced:
            return []  # the transforms rewrite an fx graph; a torch.export capture has none to rewrite
        mods = graph.modules()
        calls = Counter(a["target"] for _, a in graph.graph.nodes(data=True) if a["module_type"])
        out: list[Decision] = []
        for name in graph.layers("conv", "linear"):
            if calls[graph.node(name)["target"]] != 1:
                continue
            for d in (_bn_decision(graph, name, mods, calls), _pool_decision(graph, name, mods),
                      _chain_decision(graph, name, mods, calls)):
                if d is not None:
                    out.append(d)
        return out

    # -- cost table ---------------------------------------------------------------------------

    def estimate(self, table: CostTable, chosen: Chosen, space: SearchSpace) -> None:
        picked = _picked(chosen)
        for d in picked["bn"]:
            _estimate_bn(table, d)
        for d in picked["pool"]:
            _estimate_pool(table, d)
        alias: dict[str, str] = {}
        for d in picked["chain"]:
            _estimate_chain(table, d, alias)

    # -- model --------------------------------------------------------------------------------

    def transform(self, model: nn.Module, chosen: Chosen, ctx: ApplyContext) -> nn.Module:
        picked = _picked(chosen)
        gm = fxu.traced(model)
        for d in picked["bn"]:
            _fold_bn(gm, d, ctx)
        for d in picked["pool"]:
            _fold_pool(gm, d, ctx)
        alias: dict[str, str] = {}
        for d in picked["chain"]:
            _collapse(gm, d, ctx, alias)
        return fxu.finish(gm)


def _picked(chosen: Chosen) -> dict[str, list[Decision]]:
    out: dict[str, list[Decision]] = {"bn": [], "pool": [], "chain": []}
    for d, v in chosen:
        if int(v) == 1:
            out[d.info["pattern"]].append(d)
    return out


def _estimate_bn(table: CostTable, d: Decision) -> None:
    layer, bn = d.info["layer"], d.info["bn"]
    if layer in table and bn in table:
        table[layer].bias = True
        fxu.drop_row(table, bn)


def _estimate_pool(table: CostTable, d: Decision) -> None:
    info = d.info
    if info["layer"] not in table or info["pool"] not in table:
        return
    row = table[info["layer"]]
    stride = tuple(s * p for s, p in zip(row.stride, info["pool_stride"]))
    old, new = row.spatial, _prod(info["pool_hw"])
    row.stride, row.spatial = stride, new
    for name in (info["layer"], *info["between"]):
        if name in table:
            fxu.scale_numel(table[name], old, new)
    fxu.drop_row(table, info["pool"])


def _estimate_chain(table: CostTable, d: Decision, alias: dict[str, str]) -> None:
    info = d.info
    first = alias.get(info["layer"], info["layer"])
    if first not in table or info["second"] not in table:
        return
    a, b = table[first], table[info["second"]]
    a.out_ch, a.bias, a.spatial, a.out_numel = b.out_ch, a.bias or b.bias, b.spatial, b.out_numel
    a.stride = tuple(x * y for x, y in zip(a.stride, b.stride))
    for m in info["mids"]:
        fxu.drop_row(table, m)
    fxu.drop_row(table, info["second"])
    alias[info["second"]] = first


def _fold_bn(gm: fx.GraphModule, d: Decision, ctx: ApplyContext) -> None:
    nodes = fxu.module_nodes(gm)
    layer, bn = nodes.get(d.info["path"]), nodes.get(d.info["bn_path"])
    if (layer is None or bn is None or fxu.only_user(layer) is not bn
            or not isinstance(fxu.module_of(gm, bn), (nn.BatchNorm1d, nn.BatchNorm2d))):
        ctx.notes.append(f"{d.id}: skipped, the layer is no longer followed by its BatchNorm")
        return
    mod, bn_mod = fxu.module_of(gm, layer), fxu.module_of(gm, bn)
    fxu.set_module(gm, d.info["path"], fxu.fold_bn(mod, bn_mod))
    fxu.bypass(gm, bn)


def _fold_pool(gm: fx.GraphModule, d: Decision, ctx: ApplyContext) -> None:
    info = d.info
    nodes = fxu.module_nodes(gm)
    conv_node, pool_node = nodes.get(info["path"]), nodes.get(info["pool_path"])
    cur = conv_node
    while cur is not None and cur is not pool_node:
        cur = fxu.only_user(cur)
        if cur is not None and cur is not pool_node and not (
                isinstance(fxu.module_of(gm, cur), nn.BatchNorm2d) or fxu.is_elementwise(gm, cur)):
            cur = None
    if conv_node is None or cur is None:
        ctx.notes.append(f"{d.id}: skipped, the conv no longer reaches its pool through BN/activations only")
        return
    conv = fxu.module_of(gm, conv_node)
    stride = tuple(s * p for s, p in zip(fxu.pair(conv.stride), info["pool_stride"]))
    new_hw = tuple(fxu.out_size(info["in_hw"][i], conv.kernel_size[i], stride[i], conv.padding[i],
                                conv.dilation[i]) for i in range(2))
    if new_hw != tuple(info["pool_hw"]):
        ctx.notes.append(f"{d.id}: skipped, stride {stride} gives {new_hw}, not the pool's {info['pool_hw']}")
        return
    conv.stride = stride
    fxu.bypass(gm, pool_node)
    ctx.boosted.add(info["path"])
    ctx.boosted.update(p for p in info["bn_paths"] if p in nodes)


def _collapse(gm: fx.GraphModule, d: Decision, ctx: ApplyContext, alias: dict[str, str]) -> None:
    info = d.info
    first_path = alias.get(info["path"], info["path"])
    nodes = fxu.module_nodes(gm)
    first, second = nodes.get(first_path), nodes.get(info["second_path"])
    mids, cur = [], first
    while cur is not None and cur is not second:
        cur = fxu.only_user(cur)
        if cur is None or cur is second:
            break
        if not (isinstance(fxu.module_of(gm, cur), _PASS_TYPES)
                or (cur.op == "call_function" and cur.target is torch.nn.functional.dropout)):
            cur = None
            break
        mids.append(cur)
    if first is None or cur is None:
        ctx.notes.append(f"{d.id}: skipped, {first_path} no longer feeds {info['second_path']} directly")
        return
    a, b = fxu.module_of(gm, first), fxu.module_of(gm, second)
    fxu.set_module(gm, first_path, _collapsed(a, b))
    second.replace_all_uses_with(first)
    gm.graph.erase_node(second)
    for m in reversed(mids):
        gm.graph.erase_node(m)
    alias[info["second_path"]] = first_path
    if mids:
        ctx.boosted.add(first_path)


def _collapsed(a: nn.Module, b: nn.Module) -> nn.Module:
    """One layer computing ``b(a(x))``; computed in float64, stored in ``a``'s dtype."""
    wa, wb = a.weight.detach().double(), b.weight.detach().double()
    ba = a.bias.detach().double() if a.bias is not None else None
    bias = None
    if isinstance(a, nn.Linear):
        weight = wb @ wa
        new: nn.Module = nn.Linear(a.in_features, b.out_features, bias=a.bias is not None or b.bias is not None)
        if ba is not None:
            bias = wb @ ba
    else:
        weight = torch.einsum("om,mikl->oikl", wb[:, :, 0, 0], wa)
        stride = tuple(x * y for x, y in zip(fxu.pair(a.stride), fxu.pair(b.stride)))
        new = nn.Conv2d(a.in_channels, b.out_channels, a.kernel_size, stride=stride, padding=a.padding,
                        dilation=a.dilation, bias=a.bias is not None or b.bias is not None,
                        padding_mode=a.padding_mode)
        if ba is not None:
            bias = wb[:, :, 0, 0] @ ba
    if b.bias is not None:
        bb = b.bias.detach().double()
        bias = bb if bias is None else bias + bb
    new = new.to(device=a.weight.device, dtype=a.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new.train(a.training)
