"""Structured channel pruning on coupled channel groups; channels are physically removed.

Groups come from Torch-Pruning's ``DependencyGraph``: channels that must go
together because of residual adds, concatenations, depthwise convolutions or a
flatten into a linear layer. Where Torch-Pruning cannot build the graph (its
reshape mapping fails on ShuffleNet's channel shuffle), a conservative
fallback finds "chain" groups on our own fx graph: a conv whose output reaches
only other convs' inputs through BN, activations, pooling and depthwise convs
(a block's internal width); those are cut with Torch-Pruning's per-layer
functions.

Which channels go: the lowest group L2 magnitude (Torch-Pruning's
``GroupMagnitudeImportance``, summed over every layer of the group) by default;
``prune_importance`` in the space options picks ``l1``, ``l2``, ``bn`` (BN
scale) or ``random``. ``prune_round_to`` rounds kept widths to a multiple
(e.g. 8) for hardware-aligned kernels.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import networkx as nx
import torch
import torch_pruning as tp
from torch import nn

from autocompress.compress._tp_ops import GRAPH_OPS
from autocompress.compress.attention import attention_units
from autocompress.compress.base import ApplyContext, Chosen, Primitive
from autocompress.space.costs import CostTable
from autocompress.space.graph import ModelGraph
from autocompress.space.space import IMPORTANCE, Decision, SearchSpace

RATIOS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Layers whose channel surgery we cost exactly, plus Torch-Pruning's parameter-free graph ops.
_SURGERY_TYPES = (*CONV_TYPES, nn.Linear, *_BN_TYPES, *GRAPH_OPS)
_PASS_OPS = ("bn", "act", "pool", "dropout")
_BOUNDARY_OPS = ("conv", "linear")


def kept_channels(n: int, ratio: float, round_to: int = 1, groups: int = 1) -> int:
    """How many of a group's ``n`` channels survive pruning ``ratio`` of them.

    With grouped convolutions in the group (``groups`` > 1) channels go in whole
    multiples of ``groups`` (the same offsets in every conv group), so the kept
    width is a multiple of ``groups`` (and of ``round_to``); where that leaves no
    smaller width, none go."""
    if groups > 1:
        unit = math.lcm(groups, max(1, round_to))
        return kept_channels(n, ratio, unit) if n % unit == 0 and n >= 2 * unit else n
    keep = n * (1.0 - ratio)
    if round_to > 1 and n >= 2 * round_to:
        keep = round(keep / round_to) * round_to
        return int(min(n, max(round_to, keep)))
    return int(min(n, max(1, round(keep))))


def output_layers(mg: ModelGraph) -> set[str]:
    """Conv/linear modules whose output reaches the model output through no other conv/linear."""
    g = mg.graph
    out = set()
    for n in mg.layers("conv", "linear"):
        stack, seen = list(g.successors(n)), set()
        while stack:
            s = stack.pop()
            if s in seen:
                continue
            seen.add(s)
            op = g.nodes[s]["op"]
            if op == "output":
                out.add(g.nodes[n]["target"])
                break
            if op not in _BOUNDARY_OPS:
                stack.extend(g.successors(s))
    return out


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, CONV_TYPES) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _is_grouped(m: nn.Module) -> bool:
    """A grouped convolution that is not depthwise (ResNeXt, RegNet): 1 < groups < channels."""
    return isinstance(m, CONV_TYPES) and m.groups > 1 and not _is_depthwise(m)


def _out_fn(m: nn.Module):
    return tp.prune_linear_out_channels if isinstance(m, nn.Linear) else tp.prune_conv_out_channels


def _width(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _conv_groups(items: list, root_idxs: list[int]) -> int | None:
    """The conv-group count every grouped conv of a Torch-Pruning group shares (1 if none), or None where
    whole-group pruning cannot be expressed: different group counts, or channels not mapped one to one."""
    counts = set()
    for dep, idxs in items:
        m = dep.target.module
        if _is_grouped(m):
            if list(idxs) != list(root_idxs) or m.groups == m.out_channels:  # the latter Torch-Pruning
                return None  # treats as depthwise, cutting its inputs with its outputs
            counts.add(m.groups)
    return None if len(counts) > 1 else (counts.pop() if counts else 1)


def _dependency_graph(mg: ModelGraph, model: nn.Module) -> Any:
    """Torch-Pruning's dependency graph, built on shapes only (no memory at any input size) where the model
    runs on meta tensors; a model that does not (a custom autograd Function, a ViT's class token) gets one
    real run at its example size. Quietly: Torch-Pruning warns about parameters it cannot map (skipped)."""
    def build(*x: torch.Tensor) -> Any:
        return tp.DependencyGraph().build_dependency(model, example_inputs=x)

    try:
        return mg.on_shapes(build, grad=True)
    except Exception as exc:
        logging.getLogger("autocompress.debug").debug("Torch-Pruning's pass on shapes failed (%s); one real run "
                                                      "at the example size instead", str(exc).splitlines()[:1])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return build(*mg.example())


def _tp_groups(mg: ModelGraph, ignored: set[str], protected: set[str]) -> list[dict[str, Any]]:
    model = mg.gm
    names = {m: n for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    dg = _dependency_graph(mg, model)
    groups = []
    for group in dg.get_all_groups(ignored_layers=[modules[p] for p in ignored],
                                   root_module_types=[*CONV_TYPES, nn.Linear]):
        if any(not isinstance(dep.target.module, _SURGERY_TYPES) for dep, _ in group):
            # A group that reaches LayerNorms, free parameters (class tokens, position embeddings) or
            # custom layers can break fixed reshapes and is not costed exactly: leave it unpruned.
            continue
        items = [(dep, idxs) for dep, idxs in group if dep.target.module in names]
        if not items or any(names[dep.target.module] in protected for dep, _ in items):
            continue  # attention projections lose whole heads only (the ``heads`` decisions)
        # The root is the group's first full (not depthwise) conv/linear whose outputs are cut.
        roots = [(dep, idxs) for dep, idxs in items if dg.is_out_channel_pruning_fn(dep.handler)
                 and isinstance(dep.target.module, (*CONV_TYPES, nn.Linear)) and not _is_depthwise(dep.target.module)]
        if not roots:
            continue
        root_dep, root_idxs = roots[0]
        root = names[root_dep.target.module]
        size = len(root_idxs)
        conv_groups = _conv_groups(items, root_idxs)
        if conv_groups is None:
            continue
        deps = []
        for dep, idxs in items:
            mod = dep.target.module
            if not isinstance(mod, (*CONV_TYPES, nn.Linear, *_BN_TYPES)):
                continue
            side = "out" if dg.is_out_channel_pruning_fn(dep.handler) else "in"
            deps.append((names[mod], side, len(idxs) / size))
        groups.append({"root": root, "size": size, "deps": deps, "engine": "tp", "conv_groups": conv_groups})
    return groups


def _chain_groups(mg: ModelGraph, ignored: set[str], protected: set[str]) -> list[dict[str, Any]]:
    """Fallback: groups closed under BN/act/pool/depthwise that end at conv/linear inputs."""
    g, modules = mg.graph, mg.modules()
    groups = []
    for n in mg.layers("conv", "linear"):
        root = g.nodes[n]["target"]
        if root in ignored or root in protected or _is_depthwise(modules[root]) or _is_grouped(modules[root]):
            continue
        deps, ok = [(root, "out", 1.0)], True
        stack, seen = list(g.successors(n)), set()
        while stack and ok:
            s = stack.pop()
            if s in seen:
                continue
            seen.add(s)
            a = g.nodes[s]
            if a["op"] == "conv" and _is_grouped(modules[a["target"]]):
                ok = False  # a grouped conv's inputs go in whole conv groups: the Torch-Pruning path only
            elif a["op"] in _PASS_OPS or (a["op"] == "conv" and _is_depthwise(modules[a["target"]])):
                if a["op"] in ("bn", "conv"):
                    deps.append((a["target"], "out", 1.0))
                stack.extend(g.successors(s))
            elif (a["op"] == "conv" or (a["op"] == "linear" and len(a["in_shapes"][0] or ()) == 2)) \
                    and a["target"] not in protected:
                deps.append((a["target"], "in", 1.0))
            else:
                ok = False
        if ok and len(deps) > 1:
            groups.append({"root": root, "size": _width(modules[root]), "deps": deps, "engine": "chain",
                           "conv_groups": 1})
    return groups


class ChannelPrune(Primitive):
    kinds = ("prune",)

    def decisions(self, graph: ModelGraph) -> list[Decision]:
        ignored = output_layers(graph)
        protected = {p for u in attention_units(graph) for p in u.layers}
        try:
            groups = _tp_groups(graph, ignored, protected)
        except Exception:  # Torch-Pruning cannot map this graph (e.g. channel shuffle)
            groups = _chain_groups(graph, ignored, protected)
        out = []
        for grp in groups:
            choices = _choices(grp["size"], grp["conv_groups"])
            if grp["size"] < 2 or len(choices) < 2:
                continue
            layers = tuple(dict.fromkeys(p for p, _, _ in grp["deps"]))
            out.append(Decision(f"prune:{grp['root']}", "prune", layers, choices, 0.0, grp))
        return out

    # -- analytic twin -----------------------------------------------------------------------
    def estimate(self, table: CostTable, chosen: Chosen, space: SearchSpace) -> None:
        round_to = int(space.options.get("prune_round_to", 1))
        old_out = {r.name: (r.out_ch, r.out_numel) for r in table}
        for d, ratio in chosen:
            removed = d.info["size"] - kept_channels(d.info["size"], float(ratio), round_to, _groups_of(d))
            for path, side, mult in d.info["deps"]:
                row = table.by_target(path)
                if row is None:
                    continue
                cut = int(round(removed * mult))
                if side == "out":
                    depthwise = row.op == "conv" and row.groups > 1 and row.groups == row.in_ch == row.out_ch
                    row.out_ch -= cut
                    if depthwise:
                        row.in_ch = row.groups = row.out_ch
                    elif row.op == "bn":
                        row.in_ch = row.out_ch
                else:
                    row.in_ch -= cut
        _rescale_activations(table, old_out)

    # -- surgery -----------------------------------------------------------------------------
    def transform(self, model: nn.Module, chosen: Chosen, ctx: ApplyContext) -> nn.Module:
        options = ctx.space.options
        round_to = int(options.get("prune_round_to", 1))
        importance = options.get("prune_importance", "l2")
        modules = dict(model.named_modules())
        engine = chosen[0][0].info["engine"]
        dg = None
        if engine == "tp":
            with warnings.catch_warnings():  # as in decisions: unmapped parameters are in no offered group
                warnings.simplefilter("ignore")
                dg = tp.DependencyGraph().build_dependency(model, example_inputs=ctx.example_input)
        for d, ratio in chosen:
            root = modules.get(d.info["root"])
            if root is None:
                ctx.notes.append(f"{d.id}: skipped, an earlier primitive removed {d.info['root']!r}")
                continue
            n = _width(root)
            keep = kept_channels(n, float(ratio), round_to, _groups_of(d))
            if keep >= n:
                continue
            if dg is not None:
                group = dg.get_pruning_group(root, _out_fn(root), idxs=list(range(n)))
                scores = _group_importance(group, importance, root)
                drop = _whole_conv_groups(scores, n - keep, _groups_of(d))
                dg.get_pruning_group(root, _out_fn(root), idxs=drop).prune()
            else:
                scores = _layer_importance(root, importance)
                drop = sorted(torch.argsort(scores)[: n - keep].tolist())
                _prune_chain(modules, d.info["deps"], drop)
        return model


def _groups_of(d: Decision) -> int:
    return int(d.info.get("conv_groups", 1))


def distinct_ratios(n: int, groups: int = 1) -> tuple[float, ...]:
    """0.0 and, for each smaller number of the ``n`` units (channels in ``groups``, heads) the ratios keep,
    the ratio nearest to exactly that share."""
    best: dict[int, float] = {}
    for r in RATIOS[1:]:
        kept = kept_channels(n, r, 1, groups)
        exact = 1.0 - kept / n
        if kept < n and (kept not in best or abs(r - exact) < abs(best[kept] - exact)):
            best[kept] = r
    return (0.0, *sorted(best.values()))


def _choices(size: int, conv_groups: int) -> tuple[float, ...]:
    """The prune ratios; with grouped convs only those that give a new width (at round_to 1)."""
    return RATIOS if conv_groups == 1 else distinct_ratios(size, conv_groups)


def _whole_conv_groups(scores: torch.Tensor, count: int, conv_groups: int) -> list[int]:
    """The ``count`` least important channels; with grouped convs, the least important offsets within a
    conv group, removed from every group alike (scores summed over the groups)."""
    if conv_groups == 1:
        return sorted(torch.argsort(scores)[:count].tolist())
    per = len(scores) // conv_groups
    offsets = torch.argsort(scores.reshape(conv_groups, per).sum(0))[: count // conv_groups].tolist()
    return sorted(g * per + j for g in range(conv_groups) for j in offsets)


def _group_importance(group: Any, kind: str, root: nn.Module) -> torch.Tensor:
    if kind == "random":
        gen = torch.Generator().manual_seed(0)
        return torch.rand(len(group[0][1]), generator=gen)
    if kind == "bn":
        imp = tp.importance.BNScaleImportance()(group)
        if imp is not None:
            return imp
    p = 1 if kind == "l1" else 2
    imp = tp.importance.GroupMagnitudeImportance(p=p)(group)
    return imp if imp is not None else _layer_importance(root, kind)


def _layer_importance(m: nn.Module, kind: str) -> torch.Tensor:
    w = m.weight.detach().flatten(1)
    if kind == "random":
        return torch.rand(w.shape[0], generator=torch.Generator().manual_seed(0))
    return w.abs().sum(1) if kind == "l1" else w.pow(2).sum(1)


def _prune_chain(modules: dict[str, nn.Module], deps: list, drop: list[int]) -> None:
    for path, side, _ in deps:
        m = modules[path]
        if side == "in":
            (tp.prune_linear_in_channels if isinstance(m, nn.Linear) else tp.prune_conv_in_channels)(m, drop)
        elif isinstance(m, _BN_TYPES):
            tp.prune_batchnorm_out_channels(m, drop)
        elif _is_depthwise(m):
            tp.prune_depthwise_conv_out_channels(m, drop)
        else:
            _out_fn(m)(m, drop)


def _rescale_activations(table: CostTable, old: dict[str, tuple[int, int]]) -> None:
    """Scale activation sizes by the channel change of each tensor's producer (an estimate for memory)."""
    ratio: dict[str, float] = {}
    for r in table:
        if r.name not in old:
            continue
        old_ch, old_numel = old[r.name]
        if r.op in ("conv", "linear", "bn"):
            ratio[r.name] = r.out_ch / old_ch if old_ch else 1.0
        elif r.op == "concat" and r.inputs:
            total_old = sum(old[i][1] for i in r.inputs if i in old) or 1
            total_new = sum(old[i][1] * ratio.get(i, 1.0) for i in r.inputs if i in old)
            ratio[r.name] = total_new / total_old
        elif r.inputs:
            ratio[r.name] = ratio.get(r.inputs[0], 1.0)
        else:
            ratio[r.name] = 1.0
        r.out_numel = int(round(old_numel * ratio[r.name]))
