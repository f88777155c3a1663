"""Trace a model with torch.fx into a networkx graph of layers with shapes and costs.

One graph node per fx node. Attributes: ``op`` (a coarse kind: conv, linear,
bn, act, pool, add, mul, concat, split, getitem, reshape, dropout, input,
output, other), ``target`` (module path or function name), ``module_type``,
``in_shapes``, ``out_shape`` (per sample, batch dimension included as 1),
``params``, ``macs``, ``weight_bytes``, ``act_bytes``, plus layer geometry for
conv/linear (``in_ch``, ``out_ch``, ``kernel``, ``stride``, ``groups``).
MACs count conv and linear layers only, as torchvision's model docs do.
"""

from __future__ import annotations

import hashlib
import json
import operator
from dataclasses import dataclass, field
from typing import Any, Iterable

import networkx as nx
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from autocompress.errors import UntraceableModelError

_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh,
                nn.LeakyReLU, nn.PReLU, nn.ELU, nn.Mish)
_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d)
LEAF_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear, *_BN_MODULES, *_ACT_MODULES, *_POOL_MODULES,
                                           nn.Dropout, nn.Flatten, nn.Identity, nn.LocalResponseNorm)

_FUNCTION_OPS = {
    operator.add: "add", operator.iadd: "add", torch.add: "add", operator.mul: "mul", torch.mul: "mul",
    torch.cat: "concat", torch.concat: "concat", torch.flatten: "reshape", torch.chunk: "split",
    torch.split: "split", operator.getitem: "getitem", torch.relu: "act", torch.nn.functional.relu: "act",
    torch.nn.functional.relu6: "act", torch.nn.functional.hardswish: "act", torch.sigmoid: "act",
    torch.nn.functional.adaptive_avg_pool2d: "pool", torch.nn.functional.max_pool2d: "pool",
    torch.nn.functional.avg_pool2d: "pool", torch.mean: "pool", torch.transpose: "reshape",
    torch.nn.functional.dropout: "dropout",
}
_METHOD_OPS = {
    "view": "reshape", "reshape": "reshape", "flatten": "reshape", "transpose": "reshape", "permute": "reshape",
    "contiguous": "reshape", "chunk": "split", "split": "split", "mean": "pool", "add": "add", "add_": "add",
    "mul": "mul", "mul_": "mul", "relu": "act", "relu_": "act", "sigmoid": "act", "size": "other",
}


class _Tracer(fx.Tracer):
    """An fx tracer that knows which module it is in, so a failure can name it."""

    def __init__(self, leaf_paths: Iterable[str] = ()) -> None:
        super().__init__()
        self.leaf_paths = set(leaf_paths)
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, LEAF_TYPES) or qualname in self.leaf_paths or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m) or type(m).__name__
            raise


def symbolic_trace(model: nn.Module, leaf_paths: Iterable[str] = ()) -> fx.GraphModule:
    """Trace ``model``; raise UntraceableModelError naming the module that broke tracing."""
    tracer = _Tracer(leaf_paths)
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        where = f" in module {tracer.failed_in!r}" if tracer.failed_in else ""
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = f"--leaf {tracer.failed_in}" if tracer.failed_in else "--leaf MODULE_PATH"
        raise UntraceableModelError(
            f"torch.fx cannot trace {type(model).__name__}{where}: {reason[:200]}; "
            f"make the data-dependent code traceable or mark that module as a leaf ({hint})"
        ) from exc
    name = model.__class__.__name__
    return fx.GraphModule(tracer.root, graph, name)


def _shape_of(meta: Any) -> tuple[int, ...] | None:
    if meta is None:
        return None
    if hasattr(meta, "shape"):
        return tuple(int(s) for s in meta.shape)
    return None


def _classify(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[str, str, str]:
    """Return (op kind, target string, module type name)."""
    if node.op == "placeholder":
        return "input", node.target, ""
    if node.op == "output":
        return "output", "output", ""
    if node.op == "get_attr":
        return "const", str(node.target), ""
    if node.op == "call_module":
        m = modules[node.target]
        kind = ("conv" if isinstance(m, nn.Conv2d) else "linear" if isinstance(m, nn.Linear)
                else "bn" if isinstance(m, _BN_MODULES) else "act" if isinstance(m, _ACT_MODULES)
                else "pool" if isinstance(m, _POOL_MODULES) else "dropout" if isinstance(m, nn.Dropout)
                else "reshape" if isinstance(m, (nn.Flatten, nn.Identity)) else "other")
        return kind, str(node.target), type(m).__name__
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        return _FUNCTION_OPS.get(node.target, "other"), name, ""
    return _METHOD_OPS.get(str(node.target), "other"), str(node.target), ""


def _numel(shape: tuple[int, ...] | None) -> int:
    n = 1
    for s in shape or ():
        n *= s
    return n if shape else 0


@dataclass
class ModelGraph:
    """A traced model: the fx GraphModule and its networkx layer graph."""

    gm: fx.GraphModule
    graph: nx.DiGraph
    input_shape: tuple[int, ...]
    fingerprint: str
    leaf_paths: tuple[str, ...] = ()
    _order: list[str] = field(default_factory=list)

    @property
    def order(self) -> list[str]:
        """Node names in execution (topological) order."""
        return self._order

    def node(self, name: str) -> dict[str, Any]:
        return self.graph.nodes[name]

    def layers(self, *ops: str) -> list[str]:
        """Names of nodes whose op is one of ``ops``, in execution order."""
        return [n for n in self._order if self.graph.nodes[n]["op"] in ops]

    def node_of_module(self, path: str) -> str | None:
        for n in self._order:
            if self.graph.nodes[n]["target"] == path and self.graph.nodes[n]["module_type"]:
                return n
        return None

    def modules(self) -> dict[str, nn.Module]:
        return dict(self.gm.named_modules())

    def totals(self) -> dict[str, int]:
        attrs = self.graph.nodes
        return {
            "macs": sum(attrs[n]["macs"] for n in self._order),
            "params": sum(attrs[n]["params"] for n in self._order),
        }


def _layer_info(m: nn.Module, in_shape: tuple[int, ...] | None, out_shape: tuple[int, ...] | None) -> dict[str, Any]:
    info: dict[str, Any] = {}
    if isinstance(m, nn.Conv2d):
        info.update(in_ch=m.in_channels, out_ch=m.out_channels, kernel=tuple(m.kernel_size),
                    stride=tuple(m.stride), groups=m.groups, bias=m.bias is not None)
        spatial = _numel(out_shape[2:]) if out_shape else 0
        info["macs"] = (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1] * m.out_channels * spatial
    elif isinstance(m, nn.Linear):
        info.update(in_ch=m.in_features, out_ch=m.out_features, kernel=(1, 1), stride=(1, 1), groups=1,
                    bias=m.bias is not None)
        rows = _numel(out_shape[1:-1]) if out_shape and len(out_shape) > 2 else 1
        info["macs"] = m.in_features * m.out_features * rows
    elif isinstance(m, _BN_MODULES):
        info.update(in_ch=m.num_features, out_ch=m.num_features)
    return info


def trace(model: nn.Module, input_shape: tuple[int, ...], leaf_paths: Iterable[str] = ()) -> ModelGraph:
    """Trace ``model`` at ``input_shape`` (batch 1 is used for the per-sample costs)."""
    model = model.eval()
    gm = symbolic_trace(model, leaf_paths)
    shape = (1, *tuple(input_shape)[1:])
    example = torch.randn(shape)
    try:
        with torch.no_grad():
            gm(example)  # fails with the model's own message, before ShapeProp wraps it
            ShapeProp(gm).propagate(example)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UntraceableModelError(
            f"the model does not run at input shape {list(input_shape)}: {reason[:200]}; "
            "pass the right --input-shape N,C,H,W"
        ) from exc
    modules = dict(gm.named_modules())
    g = nx.DiGraph()
    order: list[str] = []
    seen_params: set[str] = set()
    for node in gm.graph.nodes:
        kind, target, mtype = _classify(node, modules)
        meta = node.meta.get("tensor_meta")
        out_shape = _shape_of(meta)
        in_nodes = [a for a in node.all_input_nodes]
        in_shapes = [_shape_of(a.meta.get("tensor_meta")) for a in in_nodes]
        attrs: dict[str, Any] = dict(op=kind, target=target, module_type=mtype, out_shape=out_shape,
                                     in_shapes=in_shapes, params=0, macs=0, weight_bytes=0,
                                     act_bytes=4 * _numel(out_shape))
        if node.op == "call_module":
            m = modules[node.target]
            attrs.update(_layer_info(m, in_shapes[0] if in_shapes else None, out_shape))
            if node.target not in seen_params:  # a module called twice owns its weights once
                seen_params.add(node.target)
                attrs["params"] = sum(p.numel() for p in m.parameters())
                attrs["weight_bytes"] = 4 * attrs["params"]
        g.add_node(node.name, **attrs)
        order.append(node.name)
        for a in in_nodes:
            g.add_edge(a.name, node.name)
    fp = fingerprint(g, order)
    return ModelGraph(gm, g, tuple(input_shape), fp, tuple(leaf_paths), order)


def fingerprint(g: nx.DiGraph, order: list[str]) -> str:
    """A hash of the architecture (ops, module paths, shapes, edges), independent of weights."""
    rows = []
    for n in order:
        a = g.nodes[n]
        rows.append([n, a["op"], a["target"], a["module_type"], a["out_shape"], a["params"],
                     sorted(g.predecessors(n))])
    blob = json.dumps(rows, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
