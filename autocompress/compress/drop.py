"""Layer dropping: the ``drop`` decisions (choices [0, 1], identity 0), one per transformer block.

A block is a module holding an attention unit whose parent holds at least one
sibling of the same structure (``encoder.layer.3`` of BERT,
``encoder.layers.encoder_layer_3`` of a torchvision ViT), and whose output
has the shape of its input. Its rows on the layer graph are the nodes on every
path from the block's input (the nearest node that dominates all its layers)
to its output (the nearest node that post-dominates them); the block is
offered only where nothing outside reads a value from inside it.

Dropping replaces the block by :class:`PassThrough`, which returns the
block's first input in the structure the block returned (a tensor, or a
tuple whose first element is the hidden state; the rest None), as LayerDrop
(Fan et al., 2019) does at inference. ``estimate`` removes the block's rows,
its readers reading the block's input. Dropping runs after channel and head
pruning (Torch-Pruning maps the whole model) and before the rest, so the
block's factorisations and bit-widths find their layers gone and are skipped,
in the estimate and the transform alike; a dropped block's pruning is moot.
"""

from __future__ import annotations

import inspect
from typing import Any

import networkx as nx
import torch
from torch import nn

from autocompress.compress.attention import attention_units
from autocompress.compress.base import ApplyContext, Chosen, Primitive
from autocompress.space.costs import CostTable
from autocompress.space.graph import ModelGraph
from autocompress.space.inputs import as_tuple
from autocompress.space.space import Decision, SearchSpace

_SOURCE, _SINK = "__source__", "__sink__"


class PassThrough(nn.Module):
    """Stands for a dropped block: returns its first input (``arg`` when passed by keyword), as a tensor or
    as the first element of a ``tuple_len``-tuple padded with None."""

    def __init__(self, arg: str = "", tuple_len: int = 0) -> None:
        super().__init__()
        self.arg, self.tuple_len = arg, int(tuple_len)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        x = args[0] if args else kwargs[self.arg]
        return (x, *([None] * (self.tuple_len - 1))) if self.tuple_len else x

    def extra_repr(self) -> str:
        return f"tuple_len={self.tuple_len}" if self.tuple_len else ""


def _module_nodes(mg: ModelGraph, prefix: str) -> list[str]:
    return [n for n in mg.order if mg.node(n)["module_type"] and
            (mg.node(n)["target"] == prefix or mg.node(n)["target"].startswith(prefix + "."))]


def _signature(mg: ModelGraph, prefix: str) -> tuple:
    """The block's layers relative to its path, with their types: equal for blocks of one kind."""
    return tuple(sorted((mg.node(n)["target"][len(prefix):], mg.node(n)["module_type"])
                        for n in _module_nodes(mg, prefix)))


def _block_of(mg: ModelGraph, holder: str, paths: set[str]) -> str | None:
    """The deepest path above ``holder`` that has a sibling of the same structure."""
    parts = holder.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        block, parent = ".".join(parts[:depth]), ".".join(parts[:depth - 1])
        prefix = parent + "." if parent else ""
        siblings = {prefix + p[len(prefix):].split(".")[0] for p in paths if p.startswith(prefix)} - {block}
        sig = _signature(mg, block)
        if any(_signature(mg, s) == sig for s in siblings):
            return block
    return None


def _common(idom: dict[str, str], nodes: list[str], root: str, strict: bool) -> str | None:
    """The nearest common (post-)dominator of ``nodes`` in the tree ``idom``; ``strict``: not one of them."""
    def chain(n: str) -> list[str]:
        out = [n]
        while out[-1] != root and out[-1] in idom and idom[out[-1]] != out[-1]:
            out.append(idom[out[-1]])
        return out
    if any(n not in idom for n in nodes):
        return None
    chains = [chain(n) for n in nodes]
    shared = set(chains[0]).intersection(*chains[1:])
    return next((c for c in chains[0] if c in shared and not (strict and c in nodes)), None)


def _region(g: nx.DiGraph, members: list[str], dom: dict[str, str], post: dict[str, str]) -> dict[str, Any] | None:
    """The block's input node, output node and rows, or None where the block is not self-contained."""
    # The input comes from outside the block; the output may be its last layer (BERT's LayerNorm).
    x_in, x_out = _common(dom, members, _SOURCE, True), _common(post, members, _SINK, False)
    if x_out in (None, _SINK):
        return None
    if x_in in (None, _SOURCE):
        # A side input (an attention mask) also enters the block: the hidden state is the input of its
        # first layer that has the block's output shape.
        shape = g.nodes[x_out]["out_shape"]
        first = [p for p in g.predecessors(members[0]) if g.nodes[p]["out_shape"] == shape]
        if len(first) != 1:
            return None
        x_in = first[0]
    rows = (nx.descendants(g, x_in) & nx.ancestors(g, x_out)) | {x_out}
    if not set(members) <= rows or g.nodes[x_in]["out_shape"] != g.nodes[x_out]["out_shape"]:
        return None
    if any(s not in rows for r in rows - {x_out} for s in g.successors(r)):
        return None  # a value from inside the block is read outside it
    return {"input": x_in, "output": x_out, "rows": rows}


class LayerDrop(Primitive):
    kinds = ("drop",)

    def decisions(self, graph: ModelGraph) -> list[Decision]:
        units = attention_units(graph)
        if not units:
            return []
        g = graph.graph
        paths = {graph.node(n)["target"] for n in graph.order if graph.node(n)["module_type"]}
        blocks = list(dict.fromkeys(b for b in (_block_of(graph, u.holder, paths) for u in units) if b))
        ext = g.copy()
        ext.add_edges_from((_SOURCE, n) for n in g if g.in_degree(n) == 0)
        ext.add_edges_from((n, _SINK) for n in g if g.out_degree(n) == 0)
        dom = nx.immediate_dominators(ext, _SOURCE)
        post = nx.immediate_dominators(ext.reverse(copy=False), _SINK)
        out = []
        for block in blocks:
            members = _module_nodes(graph, block)
            region = _region(g, members, dom, post)
            if region is None:
                continue
            layers = tuple(graph.node(n)["target"] for n in members if graph.node(n)["op"] in ("conv", "linear"))
            rows = tuple(n for n in graph.order if n in region["rows"])
            info = {"path": block, "input": region["input"], "output": region["output"], "rows": rows}
            out.append(Decision(f"drop:{block}", "drop", layers or (block,), (0, 1), 0, info))
        return out

    def estimate(self, table: CostTable, chosen: Chosen, space: SearchSpace) -> None:
        alias: dict[str, str] = {}  # a dropped block's output -> the input that now stands for it
        for d, v in chosen:
            if not int(v):
                continue
            x_in, x_out = d.info["input"], d.info["output"]
            while x_in in alias:
                x_in = alias[x_in]
            inside = set(d.info["rows"])
            for r in table:
                if r.name not in inside:
                    r.inputs = list(dict.fromkeys(x_in if i == x_out else i for i in r.inputs))
            for name in d.info["rows"]:
                if name in table:
                    table.remove(name)
            alias[x_out] = x_in

    def transform(self, model: nn.Module, chosen: Chosen, ctx: ApplyContext) -> nn.Module:
        paths = [d.info["path"] for d, v in chosen if int(v)]
        modules = dict(model.named_modules())
        missing = [p for p in paths if p not in modules]
        for p in missing:
            ctx.notes.append(f"drop:{p}: skipped, the model has no module {p!r}")
        present = [p for p in paths if p in modules]
        returned = _returned(model, {p: modules[p] for p in present}, ctx.example_input)
        for p in present:
            arg, tuple_len = returned.get(p, ("", 0))
            parent, _, leaf = p.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, PassThrough(arg, tuple_len))
        return model


def _returned(model: nn.Module, blocks: dict[str, nn.Module], example: Any) -> dict[str, tuple[str, int]]:
    """Per block: the name of its first argument and the length of the tuple it returns (0: a tensor),
    seen on one forward pass of ``example``."""
    seen: dict[str, tuple[str, int]] = {}

    def hook(path: str, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        names = [p.name for p in inspect.signature(module.forward).parameters.values()]
        arg = names[0] if names else ""
        seen[path] = (arg, len(output) if isinstance(output, (tuple, list)) else 0)

    handles = [m.register_forward_hook(lambda mod, a, k, o, path=p: hook(path, mod, a, k, o), with_kwargs=True)
               for p, m in blocks.items()]
    try:
        with torch.no_grad():
            model(*as_tuple(example))
    finally:
        for h in handles:
            h.remove()
    return seen
