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
from dataclasses import dataclass, field
from typing import Any, Iterable

import networkx as nx
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from autocompress.errors import UntraceableModelError
from autocompress.space.inputs import Inputs
from autocompress.space.ops import LEAF_TYPES, classify, function_macs, layer_info, numel, shape_of

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


@dataclass
class ModelGraph:
    """A traced model and its networkx layer graph.

    ``gm`` is the fx GraphModule when torch.fx traced the model (``fx_traced``);
    a model only ``torch.export`` can capture (e.g. a ``transformers`` encoder)
    keeps the model itself there, so module paths still resolve.
    """

    gm: nn.Module
    graph: nx.DiGraph
    input_shape: tuple[int, ...]
    fingerprint: str
    leaf_paths: tuple[str, ...] = ()
    _order: list[str] = field(default_factory=list)
    inputs: Inputs | None = None
    fx_traced: bool = True

    def __post_init__(self) -> None:
        if self.inputs is None:
            self.inputs = Inputs.from_shape(self.input_shape)

    def example(self, batch: int = 1, seed: int | None = None) -> tuple[torch.Tensor, ...]:
        """Random example inputs for ``batch`` samples, one tensor per model input."""
        return self.inputs.example(batch, seed)

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


def _run_error(exc: Exception, inputs: Inputs, from_shape: bool) -> UntraceableModelError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if from_shape:
        return UntraceableModelError(f"the model does not run at input shape {list(inputs.first_shape)}: "
                                     f"{reason[:200]}; pass the right --input-shape N,C,H,W")
    described = ", ".join(f"{s.name} {list(s.shape)} {s.dtype}" for s in inputs.specs)
    return UntraceableModelError(f"the model rejects its example input ({described}): {reason[:200]}; "
                                 "give the task an example_input the model's forward accepts")


def trace(model: nn.Module, input_shape: tuple[int, ...] | None = None, leaf_paths: Iterable[str] = (),
          inputs: Inputs | None = None) -> ModelGraph:
    """Trace ``model`` for ``inputs`` (or one float input of ``input_shape``); costs are per sample (batch 1).

    torch.fx is tried first (its module-level graph is what the fx-based
    primitives rewrite); a model fx cannot trace, such as a ``transformers``
    encoder, is captured with ``torch.export`` instead.
    """
    model = model.eval()
    from_shape = inputs is None
    if inputs is None:
        if input_shape is None:
            raise ValueError("trace needs input_shape or inputs")
        inputs = Inputs.from_shape(input_shape)
    shape = tuple(input_shape) if input_shape is not None else inputs.first_shape
    example = inputs.example(1, seed=0) if not inputs.single_float else (torch.randn((1, *shape[1:])),)
    try:
        with torch.no_grad():
            model(*example)  # fails with the model's own message first
    except Exception as exc:
        raise _run_error(exc, inputs, from_shape) from exc
    try:
        gm = symbolic_trace(model, leaf_paths)
    except UntraceableModelError as fx_error:
        from autocompress.space.export_graph import capture

        g, order = capture(model, example, fx_error)
        fp = fingerprint(g, order, inputs)
        return ModelGraph(model, g, shape, fp, tuple(leaf_paths), order, inputs, fx_traced=False)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example)
    except Exception as exc:
        raise _run_error(exc, inputs, from_shape) from exc
    modules = dict(gm.named_modules())
    g = nx.DiGraph()
    order: list[str] = []
    seen_params: set[str] = set()
    for node in gm.graph.nodes:
        kind, target, mtype = classify(node, modules)
        meta = node.meta.get("tensor_meta")
        out_shape = shape_of(meta)
        in_nodes = [a for a in node.all_input_nodes]
        in_shapes = [shape_of(a.meta.get("tensor_meta")) for a in in_nodes]
        attrs: dict[str, Any] = dict(op=kind, target=target, module_type=mtype, out_shape=out_shape,
                                     in_shapes=in_shapes, params=0, macs=0, weight_bytes=0,
                                     act_bytes=4 * numel(out_shape))
        if node.op == "call_module":
            m = modules[node.target]
            attrs.update(layer_info(m, in_shapes[0] if in_shapes else None, out_shape))
            if node.target not in seen_params:  # a module called twice owns its weights once
                seen_params.add(node.target)
                attrs["params"] = sum(p.numel() for p in m.parameters())
                attrs["weight_bytes"] = 4 * attrs["params"]
        elif kind in ("matmul", "attention"):
            attrs["macs"] = function_macs(kind, in_shapes, out_shape)
        g.add_node(node.name, **attrs)
        order.append(node.name)
        for a in in_nodes:
            g.add_edge(a.name, node.name)
    fp = fingerprint(g, order, inputs)
    return ModelGraph(gm, g, shape, fp, tuple(leaf_paths), order, inputs)


def fingerprint(g: nx.DiGraph, order: list[str], inputs: Inputs | None = None) -> str:
    """A hash of the architecture (ops, module paths, shapes, edges, input kinds), independent of weights."""
    rows: list[Any] = [] if inputs is None or inputs.single_float else [inputs.to_json()]
    for n in order:
        a = g.nodes[n]
        rows.append([n, a["op"], a["target"], a["module_type"], a["out_shape"], a["params"],
                     sorted(g.predecessors(n))])
    blob = json.dumps(rows, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
