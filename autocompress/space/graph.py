"""Trace a model with torch.fx into a networkx graph of layers with shapes and costs.

One graph node per fx node. Attributes: ``op`` (a coarse kind: conv, linear,
bn, act, pool, add, mul, concat, split, getitem, reshape, dropout, input,
output, other), ``target`` (module path or function name), ``module_type``,
``in_shapes``, ``out_shape`` (per sample, batch dimension included as 1),
``params``, ``macs``, ``weight_bytes``, ``act_bytes``, plus layer geometry for
conv/linear (``in_ch``, ``out_ch``, ``kernel``, ``stride``, ``groups``).
MACs count conv and linear layers only, as torchvision's model docs do.

Shapes are propagated on the meta device (tensors with shapes and no data), so
costing a model takes milliseconds and no memory at any input size; a model
that reads tensor values runs on real data instead, up to ``REAL_RUN_ELEMENTS``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import networkx as nx
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

from autocompress.errors import UntraceableModelError, UserInputError
from autocompress.space.export_graph import capture, quiet
from autocompress.space.inputs import Inputs
from autocompress.space.ops import LEAF_TYPES, classify, function_macs, layer_info, numel, shape_of

# Past this many elements per sample no machine holds even the input, and sizes near int64's range.
MAX_INPUT_ELEMENTS = 2 ** 40
# A model that reads tensor values cannot run on shapes alone; up to this many input elements per sample
# (a 1024x1024 RGB image) it runs once on real random data instead, which costs at most a few hundred MB.
REAL_RUN_ELEMENTS = 2 ** 22

class _Tracer(fx.Tracer):
    """An fx tracer that knows which module it is in, so a failure can name it."""

    def __init__(self, leaf_paths: Iterable[str] = ()) -> None:
        super().__init__()
        self.leaf_paths = set(leaf_paths)
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, LEAF_TYPES) or qualname in self.leaf_paths or super().is_leaf_module(m, qualname)

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
        # fx would trace through a custom autograd.Function's forward, dropping its backward and running
        # code meant for the Function's no-grad forward with grad on: keep each call one opaque node instead.
        original = torch.autograd.Function.__dict__["apply"]
        torch.autograd.Function.apply = classmethod(functools.partial(_traced_apply, self, original))
        try:
            return super().trace(root, concrete_args)
        finally:
            torch.autograd.Function.apply = original

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m) or type(m).__name__
            raise


def _traced_apply(tracer: fx.Tracer, apply: Any, cls: type, *args: Any, **kwargs: Any) -> Any:
    if any(isinstance(a, fx.Proxy) for a in (*args, *kwargs.values())):
        return tracer.create_proxy("call_function", _applier(cls), args, kwargs)
    return apply.__get__(None, cls)(*args, **kwargs)  # the original classmethod, bound to the Function


@functools.lru_cache(maxsize=None)
def _applier(cls: type) -> Any:
    """A named function calling ``cls.apply``: what the traced graph calls for the Function."""
    def apply(*args: Any, **kwargs: Any) -> Any:
        return cls.apply(*args, **kwargs)

    apply.__name__ = apply.__qualname__ = f"{cls.__name__}_apply"
    apply.__module__ = cls.__module__
    return apply


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

    def on_shapes(self, fn: Any, grad: bool = False) -> Any:
        """``fn(*example)`` with the traced model's tensors and one example sample on the meta device, quietly:
        for passes that need shapes but no data (Torch-Pruning's dependency graph), at any input size."""
        with quiet("a shape-only pass"):
            return on_meta(self.gm, fn, *meta_example(self.inputs), grad=grad)

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


def _run_error(exc: Exception, inputs: Inputs, from_shape: bool, shapes_only: bool = False) -> UntraceableModelError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    # Run on shapes alone, a model that reads tensor values fails as surely as one that rejects the input.
    real = (f"; a model that reads tensor values runs on real data only up to {REAL_RUN_ELEMENTS:,} input "
            "elements per sample") if shapes_only else ""
    if from_shape:
        return UntraceableModelError(f"the model does not run at input shape {list(inputs.first_shape)}: "
                                     f"{reason[:200]}{real}; pass the right --input-shape N,C,H,W")
    described = ", ".join(f"{s.name} {list(s.shape)} {s.dtype}" for s in inputs.specs)
    return UntraceableModelError(f"the model rejects its example input ({described}): {reason[:200]}{real}; "
                                 "give the task an example_input the model's forward accepts")


def sample_elements(inputs: Inputs) -> int:
    """Elements of the largest input for one sample."""
    return max(numel((1, *s.shape[1:])) for s in inputs.specs)


def _check_size(inputs: Inputs, from_shape: bool) -> None:
    n = sample_elements(inputs)
    if n > MAX_INPUT_ELEMENTS:
        what = f"input shape {list(inputs.first_shape)}" if from_shape else "the example input"
        raise UserInputError(f"{what} has {n:.3g} elements per sample, more than any model can run on "
                             f"(at most {MAX_INPUT_ELEMENTS:.3g}); pass a smaller "
                             f"{'--input-shape' if from_shape else 'example_input'}")


def meta_example(inputs: Inputs) -> tuple[torch.Tensor, ...]:
    """One sample of each input on the meta device: shapes and dtypes, no memory."""
    return tuple(torch.empty((1, *s.shape[1:]), dtype=getattr(torch, s.dtype), device="meta") for s in inputs.specs)


class _Call(nn.Module):
    """Holds ``module`` and calls ``fn``: lets functional_call swap the module's tensors around any callable."""

    def __init__(self, module: nn.Module, fn: Any) -> None:
        super().__init__()
        self.module = module
        self.fn = [fn]  # in a list, so that a module passed as fn is not registered twice

    def forward(self, *args: Any) -> Any:
        return self.fn[0](*args)


def on_meta(module: nn.Module, fn: Any, *args: Any, grad: bool = False) -> Any:
    """``fn(*args)`` with ``module``'s parameters and buffers swapped for meta tensors and tensor factories on
    meta: shapes without data or memory. The module gets its own tensors back afterwards (functional_call).
    ``grad`` keeps parameters requiring grad, for passes that read the autograd graph (Torch-Pruning)."""
    with torch.no_grad():
        tensors = {f"module.{n}": t.to("meta").requires_grad_(grad and t.requires_grad)
                   for n, t in module.named_parameters()}
        tensors.update({f"module.{n}": t.to("meta") for n, t in module.named_buffers()})
    with torch.device("meta"), torch.set_grad_enabled(grad):
        return torch.func.functional_call(_Call(module, fn), tensors, args, strict=False, tie_weights=True)


def trace(model: nn.Module, input_shape: tuple[int, ...] | None = None, leaf_paths: Iterable[str] = (),
          inputs: Inputs | None = None) -> ModelGraph:
    """Trace ``model`` for ``inputs`` (or one float input of ``input_shape``); costs are per sample (batch 1).

    torch.fx is tried first (its module-level graph is what the fx-based
    primitives rewrite); a model fx cannot trace, such as a ``transformers``
    encoder, is captured with ``torch.export`` instead. What the libraries
    print meanwhile goes to the debug log (``quiet``).
    """
    model = model.eval()
    from_shape = inputs is None
    if inputs is None:
        if input_shape is None:
            raise ValueError("trace needs input_shape or inputs")
        inputs = Inputs.from_shape(input_shape)
    shape = tuple(input_shape) if input_shape is not None else inputs.first_shape
    _check_size(inputs, from_shape)
    example = None  # real data, only where a real run is affordable
    if sample_elements(inputs) <= REAL_RUN_ELEMENTS:
        example = inputs.example(1, seed=0) if not inputs.single_float else (torch.randn((1, *shape[1:])),)
    with quiet("tracing"):
        traced = _trace_or_capture(model, leaf_paths, inputs, from_shape, example)
    if not isinstance(traced, fx.GraphModule):  # torch.export's layer graph
        g, order = traced
        return ModelGraph(model, g, shape, fingerprint(g, order, inputs), tuple(leaf_paths), order, inputs,
                          fx_traced=False)
    gm = traced
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


def _run(model: nn.Module, fn: Any, inputs: Inputs, from_shape: bool, example: tuple | None) -> None:
    """``fn`` on meta inputs, or where that fails and the input is small enough, on real ones."""
    running: list[tuple[nn.Module, Any]] = []
    try:
        with _innermost_module(running):
            on_meta(model, fn, *meta_example(inputs))
        return
    except Exception as exc:
        if example is None:  # shape checks on meta say less than the real kernels: name the module too
            raise _run_error(_where(exc, model, running), inputs, from_shape, shapes_only=True) from exc
    try:
        with torch.no_grad():
            fn(*example)  # fails with the model's own message
    except Exception as exc:
        raise _run_error(exc, inputs, from_shape) from exc


@contextlib.contextmanager
def _innermost_module(running: list[tuple[nn.Module, Any]]) -> Iterator[None]:
    """Keeps the modules whose forward has not returned, with their inputs: after a failure, where it failed."""
    def enter(m: nn.Module, args: Any) -> None:
        running.append((m, args))

    def leave(m: nn.Module, args: Any, out: Any) -> None:
        running.pop()

    hooks = (register_module_forward_pre_hook(enter), register_module_forward_hook(leave))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def _where(exc: Exception, model: nn.Module, running: list[tuple[nn.Module, Any]]) -> Exception:
    """``exc`` with the innermost module that raised it and its input shapes appended."""
    names = {m: n for n, m in model.named_modules()}
    inner = next(((m, args) for m, args in reversed(running) if names.get(m)), None)
    if inner is None:
        return exc
    m, args = inner
    shapes = ", ".join(str(list(a.shape)) for a in args if isinstance(a, torch.Tensor))
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return RuntimeError(f"{reason} in module {names[m]!r} ({type(m).__name__}({m.extra_repr()}) given {shapes})")


def _trace_or_capture(model: nn.Module, leaf_paths: Iterable[str], inputs: Inputs, from_shape: bool,
                      example: tuple | None) -> fx.GraphModule | tuple[nx.DiGraph, list[str]]:
    """The fx GraphModule with shapes on its nodes, or torch.export's (graph, order) where fx fails."""
    _run(model, model, inputs, from_shape, example)  # the model's own complaint comes first
    try:
        gm = symbolic_trace(model, leaf_paths)
    except UntraceableModelError as fx_error:
        return capture(model, example if example is not None else meta_example(inputs), fx_error,
                       on_meta=example is None)
    _run(gm, ShapeProp(gm).propagate, inputs, from_shape, example)
    return gm


def fingerprint(g: nx.DiGraph, order: list[str], inputs: Inputs | None = None) -> str:
    """A hash of the architecture (ops, module paths, shapes, edges, input kinds), independent of weights."""
    rows: list[Any] = [] if inputs is None or inputs.single_float else [inputs.to_json()]
    for n in order:
        a = g.nodes[n]
        rows.append([n, a["op"], a["target"], a["module_type"], a["out_shape"], a["params"],
                     sorted(g.predecessors(n))])
    blob = json.dumps(rows, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
