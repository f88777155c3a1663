"""Capture a model torch.fx cannot trace (e.g. a ``transformers`` encoder) with ``torch.export``.

``torch.export`` records ATen ops with the module stack each came from. The
layer graph collapses every op inside a leaf module (Linear, LayerNorm,
Embedding, activations, ...) into one node named after the module, the way
torch.fx's call_module nodes are, so decisions and costs key on module paths
exactly as for traced CNNs. Ops between modules (attention's matmuls and
softmax, residual adds, reshapes) stay one node each.
"""

from __future__ import annotations

import warnings
from typing import Any

import networkx as nx
import torch
from torch import nn

from autocompress.errors import UntraceableModelError
from autocompress.space.ops import LEAF_TYPES, function_macs, layer_info, module_kind, numel

_ATEN_KINDS = {
    "linear": "linear", "matmul": "matmul", "bmm": "matmul", "mm": "matmul", "baddbmm": "matmul",
    "addmm": "linear", "scaled_dot_product_attention": "attention", "softmax": "softmax", "_softmax": "softmax",
    "layer_norm": "norm", "native_layer_norm": "norm", "group_norm": "norm", "rms_norm": "norm",
    "gelu": "act", "relu": "act", "tanh": "act", "sigmoid": "act", "silu": "act", "hardswish": "act",
    "add": "add", "sub": "add", "mul": "mul", "div": "mul", "cat": "concat", "embedding": "embedding",
    "dropout": "dropout", "view": "reshape", "reshape": "reshape", "_unsafe_view": "reshape",
    "transpose": "reshape", "permute": "reshape", "expand": "reshape", "unsqueeze": "reshape",
    "squeeze": "reshape", "slice": "reshape", "select": "reshape", "contiguous": "reshape", "clone": "reshape",
    "flatten": "reshape", "t": "reshape", "split": "split", "chunk": "split", "split_with_sizes": "split",
    "getitem": "getitem", "mean": "pool", "conv2d": "conv", "conv1d": "conv", "max_pool2d": "pool",
    "avg_pool2d": "pool", "adaptive_avg_pool2d": "pool", "batch_norm": "bn",
}
# Extra leaf modules for exported graphs (fx traces these through to their functions).
_EXTRA_LEAVES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.Embedding)


def _aten_name(target: Any) -> str:
    name = getattr(target, "__name__", str(target))  # e.g. "linear.default"
    return name.split(".")[0]


def _shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape)
    if isinstance(val, (tuple, list)) and val and isinstance(val[0], torch.Tensor):
        return tuple(int(s) for s in val[0].shape)
    return None


def _leaf_path(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The innermost module on the node's stack that is a leaf layer, if any."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        path = _clean(path)
        m = modules.get(path)
        if m is not None and isinstance(m, (*LEAF_TYPES, *_EXTRA_LEAVES)):
            return path
    return None


def _clean(path: str) -> str:
    """Module paths as named_modules() spells them (export may prefix L['self'] or use [i] indexing)."""
    if path.startswith("L['self']"):
        path = path[len("L['self']"):].lstrip(".")
    return path.replace("[", ".").replace("]", "").replace("'", "")


def _export(model: nn.Module, example: tuple[torch.Tensor, ...], fx_error: Exception):
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            return torch.export.export(model, example, strict=False)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UntraceableModelError(f"{fx_error} (torch.export failed too: {reason[:120]})") from exc


def capture(model: nn.Module, example: tuple[torch.Tensor, ...],
            fx_error: Exception) -> tuple[nx.DiGraph, list[str]]:
    """The layer graph of ``model`` on ``example`` (batch 1) from ``torch.export``; returns (graph, order)."""
    ep = _export(model, example, fx_error)
    modules = dict(model.named_modules())
    sig = ep.graph_signature
    user_inputs = list(sig.user_inputs)
    g = nx.DiGraph()
    order: list[str] = []
    owner: dict[str, str] = {}  # fx node name -> layer-graph node name
    seen_params: set[str] = set()
    calls: dict[str, int] = {}
    for node in ep.graph.nodes:
        if node.op == "placeholder":
            if node.name in user_inputs:
                g.add_node(node.name, op="input", target=node.name, module_type="", out_shape=_shape(node),
                           in_shapes=[], params=0, macs=0, weight_bytes=0, act_bytes=4 * numel(_shape(node)))
                order.append(node.name)
                owner[node.name] = node.name
            continue
        if node.op == "output":
            srcs = sorted({owner[a.name] for a in node.all_input_nodes if a.name in owner}, key=order.index)
            g.add_node("output", op="output", target="output", module_type="", out_shape=None,
                       in_shapes=[g.nodes[s]["out_shape"] for s in srcs], params=0, macs=0, weight_bytes=0,
                       act_bytes=0)
            order.append("output")
            for s in srcs:
                g.add_edge(s, "output")
            continue
        if node.op != "call_function":
            continue
        srcs = [owner[a.name] for a in node.all_input_nodes if a.name in owner]
        path = _leaf_path(node, modules)
        if path is not None:
            current = _module_node(path, calls)
            if current in g:  # a later op of the same module call: extend the node
                owner[node.name] = current
                g.nodes[current]["out_shape"] = _shape(node)
                g.nodes[current]["act_bytes"] = 4 * numel(_shape(node))
                for s in srcs:
                    if s != current and not g.has_edge(s, current):
                        g.add_edge(s, current)
                        g.nodes[current]["in_shapes"].append(g.nodes[s]["out_shape"])
                continue
            if any(g.nodes[s].get("target") == path for s in srcs):
                calls[path] = calls.get(path, 0) + 1  # the same module called again on its own output
                current = _module_node(path, calls)
            m = modules[path]
            attrs: dict[str, Any] = dict(op=module_kind_ext(m), target=path, module_type=type(m).__name__,
                                         out_shape=_shape(node), in_shapes=[g.nodes[s]["out_shape"] for s in srcs],
                                         params=0, macs=0, weight_bytes=0, act_bytes=4 * numel(_shape(node)))
            attrs.update(layer_info(m, attrs["in_shapes"][0] if attrs["in_shapes"] else None, attrs["out_shape"]))
            if path not in seen_params:
                seen_params.add(path)
                attrs["params"] = sum(p.numel() for p in m.parameters())
                attrs["weight_bytes"] = 4 * attrs["params"]
            name = current
        else:
            kind = _ATEN_KINDS.get(_aten_name(node.target), "other")
            if not srcs:
                kind = "const"  # built from constants or parameters only (arange, masks)
            in_shapes = [_shape(a) for a in node.all_input_nodes if a.name in owner]
            out_shape = _shape(node)
            attrs = dict(op=kind, target=_aten_name(node.target), module_type="", out_shape=out_shape,
                         in_shapes=in_shapes, params=0, macs=function_macs(kind, in_shapes, out_shape),
                         weight_bytes=0, act_bytes=4 * numel(out_shape))
            name = node.name
        if kind_is_const(attrs):
            continue
        g.add_node(name, **attrs)
        order.append(name)
        owner[node.name] = name
        for s in dict.fromkeys(srcs):
            g.add_edge(s, name)
    return g, order


def kind_is_const(attrs: dict[str, Any]) -> bool:
    return attrs["op"] == "const"


def module_kind_ext(m: nn.Module) -> str:
    """Op kind of a leaf module, including the leaves only exported graphs collapse."""
    if isinstance(m, nn.LayerNorm):
        return "norm"
    if isinstance(m, nn.Embedding):
        return "embedding"
    return module_kind(m)


def _module_node(path: str, calls: dict[str, int]) -> str:
    n = calls.get(path, 0)
    base = path.replace(".", "_") or "root"
    return base if n == 0 else f"{base}_{n}"
