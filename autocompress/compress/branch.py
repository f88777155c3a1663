"""Branch merging: the ``branch`` decisions, one per block of parallel branches.

A block is a set of layer chains (conv, BN, activation, pool) that all read
one tensor and are joined by ``torch.cat`` along channels or by an add:
GoogLeNet's inception blocks, SqueezeNet's fire expand layers, ShuffleNet's
stride-2 blocks. The id is ``branch:<block path>``, the longest module path
shared by the block's layers. Choices, offered only where they apply:

- 0: identity.
- 1: exact horizontal fusion. The branches' first convs that read the shared
  tensor with the same kernel, stride, padding and dilation (groups 1) become
  one wider conv at the first member's path, whose output is sliced back into
  the branches. Each member's BatchNorm is folded into the fused conv first
  (exact in eval mode); the other members' paths disappear.
- 2: DeepRebirth branch absorption (lossy, concat blocks only). Small branches
  (only 1x1 convs, pooling, BN, activations) are dropped and their output
  channels are produced by the last conv of the nearest large branch (one
  with a dense kxk conv; where no branch has one, the branch with the most
  MACs), which gets wider, with its BN; the block keeps its output channels
  and their order. The widened conv and BN keep their paths, their original
  channels keep their weights, new channels start from a seeded Kaiming
  init, and both go to ``ctx.boosted`` for fine-tuning.
"""

from __future__ import annotations

import operator
import zlib
from collections import Counter
from typing import Any

import torch
from torch import fx, nn

from autocompress.compress import _fx_utils as fxu
from autocompress.compress.base import ApplyContext, Chosen, Primitive
from autocompress.space.costs import CostTable
from autocompress.space.graph import ModelGraph
from autocompress.space.space import Decision, SearchSpace

_CATS = (torch.cat, torch.concat)
_ADDS = (operator.add, operator.iadd, torch.add)
_CHAIN_MODULES = (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d, *fxu.ACT_MODULES)
FUSE, ABSORB = 1, 2


def _join_inputs(node: fx.Node) -> list[Any] | None:
    """The joined tensors of a channel concat or a two-input add, else None."""
    if node.op == "call_function" and node.target in _CATS and node.args and isinstance(node.args[0], (list, tuple)):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        shape = node.meta.get("tensor_meta")
        rank = len(shape.shape) if shape is not None else 4
        return list(node.args[0]) if dim in (1, 1 - rank) else None
    if node.op == "call_function" and node.target in _ADDS and len(node.args) == 2:
        return list(node.args)
    return None


def _walk_back(gm: fx.GraphModule, end: Any, single: set[str]) -> tuple[list[fx.Node], fx.Node] | None:
    """The chain of branch layers ending at ``end`` and the tensor it starts from."""
    chain: list[fx.Node] = []
    cur = end
    while True:
        if not isinstance(cur, fx.Node) or len(cur.users) != 1 or len(cur.all_input_nodes) != 1:
            return None
        mod = fxu.module_of(gm, cur)
        if mod is not None:
            if not isinstance(mod, _CHAIN_MODULES) or (isinstance(mod, (nn.Conv2d, nn.BatchNorm2d))
                                                        and str(cur.target) not in single):
                return None
        elif not fxu.is_elementwise(gm, cur):
            return None
        chain.insert(0, cur)
        src = cur.all_input_nodes[0]
        if len(src.users) > 1:
            return chain, src
        cur = src


def _blocks(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node, list[list[fx.Node]]]]:
    """(join, shared input, branch chains) for every block of the graph, in execution order."""
    single = set(fxu.module_nodes(gm))
    out = []
    for node in gm.graph.nodes:
        ins = _join_inputs(node)
        if not ins or len(ins) < 2 or len(set(map(id, ins))) != len(ins):
            continue
        walked = [_walk_back(gm, i, single) for i in ins]
        if any(w is None for w in walked) or len({id(w[1]) for w in walked}) != 1:
            continue
        out.append((node, walked[0][1], [w[0] for w in walked]))
    return out


def _common_path(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _fuse_groups(gm: fx.GraphModule, branches: list[list[fx.Node]], rank: dict[str, int]) -> list[tuple]:
    """Groups (two or more) of first convs with the same geometry; each member (node, path, bn node, bn path)."""
    groups: dict[tuple, list[tuple]] = {}
    for chain in branches:
        head = chain[0]
        conv = fxu.module_of(gm, head)
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1 or isinstance(conv.padding, str):
            continue
        key = (tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation),
               conv.padding_mode)
        bn = fxu.only_user(head)
        has_bn = isinstance(fxu.module_of(gm, bn), nn.BatchNorm2d) if bn is not None else False
        groups.setdefault(key, []).append((head.name, str(head.target), bn.name if has_bn else None,
                                           str(bn.target) if has_bn else None))
    return [tuple(sorted(g, key=lambda m: rank[m[0]])) for g in groups.values() if len(g) >= 2]


def _absorb_plan(graph: ModelGraph, branches: list[list[fx.Node]]) -> dict[str, Any] | None:
    """Which small branches each large branch absorbs, or None where absorption does not apply."""
    gm = graph.gm
    convs = [[n for n in chain if isinstance(fxu.module_of(gm, n), nn.Conv2d)] for chain in branches]
    if any(not c for c in convs):
        return None
    large = [any(fxu.module_of(gm, n).groups == 1 and tuple(fxu.module_of(gm, n).kernel_size) != (1, 1)
                 for n in c) for c in convs]
    if not any(large):
        macs = [sum(graph.node(n.name)["macs"] for n in chain) for chain in branches]
        large = [i == macs.index(max(macs)) for i in range(len(branches))]
    if all(large):
        return None
    into: dict[int, list[int]] = {i: [] for i, big in enumerate(large) if big}
    for i, big in enumerate(large):
        if not big:
            left = [j for j in into if j < i]
            into[max(left) if left else min(j for j in into if j > i)].append(i)
    for j in into:
        if fxu.module_of(gm, convs[j][-1]).groups != 1:
            return None
    return {"into": {j: tuple(v) for j, v in into.items() if v}}


class BranchMerge(Primitive):
    """Exact horizontal fusion of parallel convs, or DeepRebirth absorption of small branches."""

    kinds = ("branch",)

    def decisions(self, graph: ModelGraph) -> list[Decision]:
        if not graph.fx_traced:
            return []  # blocks are found and fused on the fx graph; a torch.export capture has none
        gm = graph.gm
        rank = {n: i for i, n in enumerate(graph.order)}
        found = []
        for join, _, branches in _blocks(gm):
            paths = [str(n.target) for chain in branches for n in chain if n.op == "call_module"]
            fuse = _fuse_groups(gm, branches, rank)
            absorb = _absorb_plan(graph, branches) if join.target in _CATS else None
            choices = (0,) + ((FUSE,) if fuse else ()) + ((ABSORB,) if absorb else ())
            if len(choices) == 1:
                continue
            info = {"join": join.name, "fuse": tuple(fuse), "absorb": absorb,
                    "branches": tuple(tuple(n.name for n in chain) for chain in branches),
                    "branch_paths": tuple(tuple(str(n.target) for n in chain if n.op == "call_module")
                                          for chain in branches)}
            found.append((_common_path(paths) or join.name, join.name, paths, choices, info))
        counts = Counter(f[0] for f in found)
        return [Decision(id=f"branch:{p}" if counts[p] == 1 else f"branch:{p}:{j}", kind="branch",
                         layers=tuple(paths), choices=choices, identity=0, info=info)
                for p, j, paths, choices, info in found]

    def estimate(self, table: CostTable, chosen: Chosen, space: SearchSpace) -> None:
        for d, v in chosen:
            if int(v) == FUSE:
                for group in d.info["fuse"]:
                    _estimate_fuse(table, group)
            elif int(v) == ABSORB:
                _estimate_absorb(table, d.info)

    def transform(self, model: nn.Module, chosen: Chosen, ctx: ApplyContext) -> nn.Module:
        gm = fxu.traced(model)
        for d, v in chosen:
            if int(v) == FUSE:
                for group in d.info["fuse"]:
                    _fuse(gm, d, group, ctx)
            elif int(v) == ABSORB:
                _absorb(gm, d, ctx)
        return fxu.finish(gm)


# -- horizontal fusion ----------------------------------------------------------------------------

def _estimate_fuse(table: CostTable, group: tuple) -> None:
    if any(name not in table for name, _, _, _ in group):
        return
    rows = [table[name] for name, _, _, _ in group]
    if len({(r.kernel, r.stride, r.groups) for r in rows}) != 1 or rows[0].groups != 1:
        return
    first = rows[0]
    first.bias = any(r.bias for r in rows) or any(bn in table for _, _, bn, _ in group if bn)
    for _, _, bn, _ in group:
        if bn:
            fxu.drop_row(table, bn)
    first.out_ch, first.out_numel = sum(r.out_ch for r in rows), sum(r.out_numel for r in rows)
    for r in rows[1:]:
        fxu.drop_row(table, r.name, readers_use=first.name)


def _fuse(gm: fx.GraphModule, d: Decision, group: tuple, ctx: ApplyContext) -> None:
    nodes = fxu.module_nodes(gm)
    members = [nodes.get(path) for _, path, _, _ in group]
    convs = [fxu.module_of(gm, m) if m is not None else None for m in members]
    geometry = {(tuple(c.kernel_size), tuple(c.stride), str(c.padding), tuple(c.dilation), c.padding_mode, c.groups)
                for c in convs if isinstance(c, nn.Conv2d)}
    sources = {id(m.all_input_nodes[0]) for m in members if m is not None}
    if None in members or len(geometry) != 1 or len(sources) != 1 or next(iter(geometry))[-1] != 1:
        ctx.notes.append(f"{d.id}: fusion of {[p for _, p, _, _ in group]} skipped, "
                         "they no longer read one tensor with the same geometry")
        return
    for i, (m, (_, path, _, _)) in enumerate(zip(members, group)):
        bn = fxu.only_user(m)
        if bn is not None and isinstance(fxu.module_of(gm, bn), nn.BatchNorm2d):
            convs[i] = fxu.fold_bn(convs[i], fxu.module_of(gm, bn))
            fxu.bypass(gm, bn)
    fxu.set_module(gm, group[0][1], _wide_conv(convs))
    source = members[0].all_input_nodes[0]
    graph = gm.graph
    with graph.inserting_after(source):
        fused = graph.call_module(group[0][1], (source,))
    # The slices share one tensor: an in-place activation on one of them would invalidate what
    # autograd saved for the others, so their readers are made to work out of place.
    prev, start = fused, 0
    for m, conv in zip(members, convs):
        with graph.inserting_after(prev):
            prev = graph.call_function(operator.getitem, (fused, (slice(None), slice(start, start + conv.out_channels))))
        start += conv.out_channels
        m.replace_all_uses_with(prev)
        graph.erase_node(m)
        fxu.not_in_place(gm, prev)


def _wide_conv(convs: list[nn.Conv2d]) -> nn.Conv2d:
    c0 = convs[0]
    has_bias = any(c.bias is not None for c in convs)
    wide = nn.Conv2d(c0.in_channels, sum(c.out_channels for c in convs), c0.kernel_size, stride=c0.stride,
                     padding=c0.padding, dilation=c0.dilation, bias=has_bias, padding_mode=c0.padding_mode)
    wide = wide.to(device=c0.weight.device, dtype=c0.weight.dtype)
    with torch.no_grad():
        wide.weight.copy_(torch.cat([c.weight for c in convs]))
        if has_bias:
            wide.bias.copy_(torch.cat([c.bias if c.bias is not None else torch.zeros_like(c.weight[:, 0, 0, 0])
                                       for c in convs]))
    return wide


# -- absorption -----------------------------------------------------------------------------------

def _last_conv(table: CostTable, branch: tuple[str, ...]) -> int | None:
    """Index (in ``branch``) of the last conv row still in the table."""
    for i in range(len(branch) - 1, -1, -1):
        if branch[i] in table and table[branch[i]].op == "conv":
            return i
    return None


def _estimate_absorb(table: CostTable, info: dict[str, Any]) -> None:
    branches, into = info["branches"], info["absorb"]["into"]
    lasts = [_last_conv(table, b) for b in branches]
    if any(i is None for i in lasts) or info["join"] not in table:
        return
    join = table[info["join"]]
    inputs = list(join.inputs)
    for j, smalls in into.items():
        branch = branches[j]
        row = table[branch[lasts[j]]]
        old = row.out_ch
        new = old + sum(table[branches[i][lasts[i]]].out_ch for i in smalls)
        for name in branch[lasts[j]:]:
            if name in table:
                r = table[name]
                fxu.scale_numel(r, old, new)
                if r.op in ("conv", "bn"):
                    r.out_ch = new
                if r.op == "bn":
                    r.in_ch = new
    gone = {n for smalls in into.values() for i in smalls for n in branches[i]}
    for name in [n for i in sorted(i for s in into.values() for i in s) for n in branches[i]]:
        fxu.drop_row(table, name)
    join.inputs = [x for x in inputs if x in table and x not in gone]


def _absorb(gm: fx.GraphModule, d: Decision, ctx: ApplyContext) -> None:
    info = d.info
    found = _find_block(gm, info)
    if found is None:
        ctx.notes.append(f"{d.id}: absorption skipped, the block's branches are no longer where they were")
        return
    join, chains = found
    convs = [[n for n in c if isinstance(fxu.module_of(gm, n), nn.Conv2d)] for c in chains]
    if any(not c for c in convs):
        ctx.notes.append(f"{d.id}: absorption skipped, a branch has no conv left")
        return
    channels = [fxu.module_of(gm, c[-1]).out_channels for c in convs]
    into = info["absorb"]["into"]
    seed = zlib.crc32(d.id.encode())
    for j, smalls in into.items():
        left = sum(channels[i] for i in smalls if i < j)
        right = sum(channels[i] for i in smalls if i > j)
        last = convs[j][-1]
        _widen(gm, chains[j][chains[j].index(last):], left, right, seed + j, ctx)
    small = {i for s in into.values() for i in s}
    join.args = ([c[-1] for i, c in enumerate(chains) if i not in small], *join.args[1:])
    for i in sorted(small):
        for n in reversed(chains[i]):
            gm.graph.erase_node(n)


def _find_block(gm: fx.GraphModule, info: dict[str, Any]) -> tuple[fx.Node, list[list[fx.Node]]] | None:
    """The block's join and current branch chains, matched to the decision's branches by module path."""
    want = [set(p) for p in info["branch_paths"]]
    for join, _, chains in _blocks(gm):
        if join.target not in _CATS or len(chains) != len(want):
            continue
        have = [{str(n.target) for n in c if n.op == "call_module"} for c in chains]
        if all(h and h <= w for h, w in zip(have, want)):
            return join, chains
    return None


def _widen(gm: fx.GraphModule, tail: list[fx.Node], left: int, right: int, seed: int, ctx: ApplyContext) -> None:
    """Give the conv at ``tail[0]`` (and the BNs after it) ``left`` new channels before its own and ``right`` after."""
    conv = fxu.module_of(gm, tail[0])
    own = conv.out_channels
    wide = nn.Conv2d(conv.in_channels, left + own + right, conv.kernel_size, stride=conv.stride,
                     padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None,
                     padding_mode=conv.padding_mode).to(device=conv.weight.device, dtype=conv.weight.dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = torch.empty(wide.weight.shape, dtype=torch.float64)
        nn.init.kaiming_uniform_(w, a=5 ** 0.5, generator=gen)
        wide.weight.copy_(w)
        wide.weight[left:left + own] = conv.weight
        if wide.bias is not None:
            wide.bias.zero_()
            wide.bias[left:left + own] = conv.bias
    fxu.set_module(gm, str(tail[0].target), wide.train(conv.training))
    ctx.boosted.add(str(tail[0].target))
    for n in tail[1:]:
        bn = fxu.module_of(gm, n)
        if isinstance(bn, nn.BatchNorm2d):
            fxu.set_module(gm, str(n.target), _wide_bn(bn, left, right))
            ctx.boosted.add(str(n.target))


def _wide_bn(bn: nn.BatchNorm2d, left: int, right: int) -> nn.BatchNorm2d:
    own = bn.num_features
    wide = nn.BatchNorm2d(left + own + right, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                          track_running_stats=bn.track_running_stats)
    ref = bn.weight if bn.affine else bn.running_mean
    wide = wide.to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            src = getattr(bn, name)
            if src is not None:
                getattr(wide, name)[left:left + own] = src
        if bn.num_batches_tracked is not None:
            wide.num_batches_tracked.copy_(bn.num_batches_tracked)
    return wide.train(bn.training)
