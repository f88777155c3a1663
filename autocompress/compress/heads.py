"""Attention-head pruning: the ``heads`` decisions, one per attention unit.

An attention unit is found by structure on the layer graph, not by class
name: an attention op (``scaled_dot_product_attention``, or the eager
``matmul -> softmax -> matmul`` pattern) whose query, key and value each come
from an ``nn.Linear`` through views only, and whose output reaches one
``nn.Linear`` (the output projection) through views only. That covers
:class:`~autocompress.compress.attention.SplitAttention`, Hugging Face
BERT/RoBERTa/MiniLM self-attention (``query``/``key``/``value`` with the
sibling ``attention.output.dense``) and hand-written attention alike.

A choice is the share of heads removed (as the prune ratios; only those that
keep a distinct number of heads, at least one). The heads with the least
weight (L2 norm of their q/k/v rows and output-projection columns) go: their
q/k/v rows and output-projection columns are cut together, and the head
count (``num_heads``, ``num_attention_heads``, ...) and inner width
(``all_head_size``) stored on the module holding q/k/v are updated.
"""

from __future__ import annotations

import torch
from torch import nn

from autocompress.compress.attention import HEADS_ATTRS, AttentionUnit, attention_units
from autocompress.compress.base import ApplyContext, Chosen, Primitive
from autocompress.compress.prune import distinct_ratios, kept_channels
from autocompress.space.costs import CostTable
from autocompress.space.graph import ModelGraph
from autocompress.space.space import Decision, SearchSpace

INNER_ATTRS = ("all_head_size", "inner_dim")  # inner width attributes kept in step with the heads


class HeadPrune(Primitive):
    kinds = ("heads",)

    def decisions(self, graph: ModelGraph) -> list[Decision]:
        out = []
        for u in attention_units(graph):
            choices = distinct_ratios(u.heads)
            if len(choices) > 1:
                out.append(Decision(f"heads:{u.holder}", "heads", u.layers, choices, 0.0, {"unit": u}))
        return out

    def estimate(self, table: CostTable, chosen: Chosen, space: SearchSpace) -> None:
        for d, ratio in chosen:
            u: AttentionUnit = d.info["unit"]
            kept = kept_channels(u.heads, float(ratio))
            rows = [table.by_target(p) for p in u.layers]
            if any(r is None or r.op != "linear" for r in rows):
                continue  # an earlier primitive removed the unit (a dropped block)
            cut = (u.heads - kept) * u.head_dim
            for r in rows[:3]:
                r.out_numel = r.out_numel // r.out_ch * (r.out_ch - cut)
                r.out_ch -= cut
            rows[3].in_ch -= cut
            for name in u.region:
                if name not in table:
                    continue
                r = table[name]
                r.out_numel = r.out_numel // u.heads * kept
                if r.op == "attention":
                    r.heads = r.heads // u.heads * kept
                elif r.op == "matmul":
                    r.spatial = r.spatial // u.heads * kept

    def transform(self, model: nn.Module, chosen: Chosen, ctx: ApplyContext) -> nn.Module:
        modules = dict(model.named_modules())
        for d, ratio in chosen:
            u: AttentionUnit = d.info["unit"]
            layers = [modules.get(p) for p in u.layers]
            if u.holder not in modules or not all(type(m) is nn.Linear for m in layers):
                ctx.notes.append(f"{d.id}: skipped, an earlier primitive replaced or removed the attention")
                continue
            kept = kept_channels(u.heads, float(ratio))
            keep = _kept_heads(layers, u.heads, u.head_dim, kept)
            rows = torch.cat([torch.arange(h * u.head_dim, (h + 1) * u.head_dim) for h in keep])
            for path, m in zip(u.layers[:3], layers[:3]):
                _set(model, path, _select(m, rows, dim=0))
            _set(model, u.out, _select(layers[3], rows, dim=1))
            holder = modules[u.holder]
            updated = [a for a in (*HEADS_ATTRS, *INNER_ATTRS) if isinstance(getattr(holder, a, None), int)]
            for attr in updated:
                setattr(holder, attr, kept if attr in HEADS_ATTRS else kept * u.head_dim)
            if not any(a in HEADS_ATTRS for a in updated):
                ctx.notes.append(f"{d.id}: {u.holder} stores no head count; its views must infer it")
        return model


def _kept_heads(layers: list[nn.Linear], heads: int, head_dim: int, kept: int) -> list[int]:
    """Indices of the ``kept`` heads with the largest squared weight over q/k/v rows and out columns."""
    score = torch.zeros(heads, dtype=torch.float64)
    for m in layers[:3]:
        score += m.weight.detach().double().pow(2).reshape(heads, head_dim, -1).sum((1, 2))
    score += layers[3].weight.detach().double().pow(2).reshape(-1, heads, head_dim).sum((0, 2))
    order = sorted(range(heads), key=lambda h: (-float(score[h]), h))
    return sorted(order[:kept])


def _select(m: nn.Linear, idx: torch.Tensor, dim: int) -> nn.Linear:
    """A copy of linear ``m`` keeping rows (``dim`` 0: outputs) or columns (``dim`` 1: inputs) ``idx``."""
    w = m.weight.detach().index_select(dim, idx.to(m.weight.device))
    new = nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if m.bias is not None:
            new.bias.copy_(m.bias.detach().index_select(0, idx.to(w.device)) if dim == 0 else m.bias.detach())
    new.weight.requires_grad_(m.weight.requires_grad)
    return new.train(m.training)


def _set(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
