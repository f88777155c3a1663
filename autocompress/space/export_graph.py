"""Capture a model torch.fx cannot trace (e.g. a ``transformers`` encoder) with ``torch.export``.

``torch.export`` records ATen ops with the module stack each came from. The
layer graph collapses every op inside a leaf module (Linear, LayerNorm,
Embedding, activations, ...) into one node named after the module, the way
torch.fx's call_module nodes are, so decisions and costs key on module paths
exactly as for traced CNNs. Ops between modules (attention's matmuls and
softmax, residual adds, reshapes) stay one node each. Parameters that ops
read outside a leaf module (nn.MultiheadAttention's packed projection, read by
``F.multi_head_attention_forward``) are counted once, on the first node that
reads them. ``quiet`` keeps what torch.export and other exporters print off the
terminal.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import io
import logging
import os
import sys
import tempfile
import warnings
from typing import IO, Any, Iterator

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


_debug_log = logging.getLogger("autocompress.debug")


@contextlib.contextmanager
def quiet(what: str) -> Iterator[None]:
    """Run library code with what it prints kept off the terminal: its stdout and stderr (file descriptors
    too, for what C++ writes), Python warnings and torch's log handlers go to the ``autocompress.debug``
    logger at DEBUG level instead. With AUTOCOMPRESS_DEBUG set everything passes through as it happens."""
    if os.environ.get("AUTOCOMPRESS_DEBUG"):
        yield
        return
    text = io.StringIO()
    caught: list[warnings.WarningMessage] = []
    with tempfile.TemporaryFile() as sink:
        try:
            with contextlib.ExitStack() as stack:
                caught = stack.enter_context(warnings.catch_warnings(record=True))
                warnings.simplefilter("always")
                stack.enter_context(contextlib.redirect_stdout(text))
                stack.enter_context(contextlib.redirect_stderr(text))
                stack.enter_context(_torch_logs_to(text))
                stack.enter_context(_fds_to(sink))
                yield
        finally:
            sink.seek(0)
            printed = sink.read().decode(errors="replace") + text.getvalue() + "".join(
                warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught)
            if printed.strip():
                _debug_log.debug("%s printed:\n%s", what, printed.rstrip())


@contextlib.contextmanager
def _fds_to(sink: IO[bytes]) -> Iterator[None]:
    """File descriptors 1 and 2 into ``sink``: C++ code (the ONNX exporter's IR dumps) writes there, not to sys."""
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # no standard streams (a daemon): nothing to keep quiet
        yield
        return
    _flush()
    os.dup2(sink.fileno(), 1)
    os.dup2(sink.fileno(), 2)
    try:
        yield
    finally:
        _flush()
        for fd, old in ((1, saved[0]), (2, saved[1])):
            os.dup2(old, fd)
            os.close(old)


def _flush() -> None:
    for stream in (sys.__stdout__, sys.__stderr__):
        if stream is not None:
            stream.flush()
    try:  # C stdio buffers what C++ writes to a file or pipe: flush it before the descriptor changes
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):
        pass


@contextlib.contextmanager
def _torch_logs_to(stream: IO[str]) -> Iterator[None]:
    """torch's log handlers (symbolic_shapes' warnings) write to ``stream``: they hold the stderr of import time."""
    swapped = []
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if (name == "torch" or name.startswith("torch.")) and isinstance(logger, logging.Logger):
            for h in logger.handlers:
                if type(h) is logging.StreamHandler:  # console handlers; torch's own trace handlers keep files
                    swapped.append((h, h.setStream(stream)))
    try:
        yield
    finally:
        for h, old in reversed(swapped):
            if old is not None:
                h.setStream(old)


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


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are on the meta device; nothing is copied but structure."""
    memo: dict[int, Any] = {}
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            if id(t) not in memo:  # tied tensors stay tied
                meta = t.to("meta")
                memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def _export(model: nn.Module, example: tuple[torch.Tensor, ...], fx_error: Exception, on_meta: bool):
    try:
        with quiet("torch.export"), torch.no_grad():
            return torch.export.export(meta_copy(model) if on_meta else model, example, strict=False)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UntraceableModelError(f"{fx_error} (torch.export failed too: {reason[:120]}; "
                                    "AUTOCOMPRESS_DEBUG=1 shows its log)") from exc


def capture(model: nn.Module, example: tuple[torch.Tensor, ...], fx_error: Exception,
            on_meta: bool = False) -> tuple[nx.DiGraph, list[str]]:
    """The layer graph of ``model`` on ``example`` (batch 1) from ``torch.export``; returns (graph, order).

    ``on_meta``: ``example`` is on the meta device and a meta copy of the model is exported (no memory at any
    input size; the model itself is untouched)."""
    ep = _export(model, example, fx_error, on_meta)
    modules = dict(model.named_modules())
    sig = ep.graph_signature
    user_inputs = list(sig.user_inputs)
    param_of = dict(sig.inputs_to_parameters)  # placeholder -> parameter path
    reads: dict[str, set[str]] = {}  # fx node -> parameter paths it reads, itself or through dropped constants
    counted: set[int] = set()  # parameters already in some node's params
    g = nx.DiGraph()
    order: list[str] = []
    owner: dict[str, str] = {}  # fx node name -> layer-graph node name
    leaves: dict[str, nn.Module] = {}  # layer-graph node -> its leaf module
    calls: dict[str, int] = {}
    for node in ep.graph.nodes:
        if node.op == "placeholder":
            if node.name in user_inputs:
                g.add_node(node.name, op="input", target=node.name, module_type="", out_shape=_shape(node),
                           in_shapes=[], params=0, macs=0, weight_bytes=0, act_bytes=4 * numel(_shape(node)))
                order.append(node.name)
                owner[node.name] = node.name
            elif node.name in param_of:
                reads[node.name] = {param_of[node.name]}
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
                _extend(g, current, node, srcs)
                continue
            if any(g.nodes[s].get("target") == path for s in srcs):
                calls[path] = calls.get(path, 0) + 1  # the same module called again on its own output
                current = _module_node(path, calls)
            m = modules[path]
            attrs: dict[str, Any] = dict(op=module_kind_ext(m), target=path, module_type=type(m).__name__,
                                         out_shape=_shape(node), in_shapes=[g.nodes[s]["out_shape"] for s in srcs],
                                         params=0, macs=0, weight_bytes=0, act_bytes=4 * numel(_shape(node)))
            own = [p for p in m.parameters() if id(p) not in counted]  # a module called twice owns them once
            counted.update(id(p) for p in own)
            attrs["params"] = sum(p.numel() for p in own)
            name = current
            leaves[name] = m
        else:
            reads[node.name] = set().union(*(reads.get(a.name, set()) for a in node.all_input_nodes))
            if not srcs:
                continue  # built from constants or parameters only (arange, masks, a weight's transpose)
            attrs = _function_attrs(node, [_shape(a) for a in node.all_input_nodes if a.name in owner])
            fresh = [p for p in map(model.get_parameter, sorted(reads[node.name])) if id(p) not in counted]
            counted.update(id(p) for p in fresh)
            attrs["params"] = sum(p.numel() for p in fresh)
            name = node.name
        attrs["weight_bytes"] = 4 * attrs["params"]
        g.add_node(name, **attrs)
        order.append(name)
        owner[node.name] = name
        for s in dict.fromkeys(srcs):
            g.add_edge(s, name)
    for name, m in leaves.items():  # once all of a module's inputs are in (an RNN's first op makes its state)
        a = g.nodes[name]
        a.update(layer_info(m, a["in_shapes"][0] if a["in_shapes"] else None, a["out_shape"]))
    return g, order


def _extend(g: nx.DiGraph, current: str, node: torch.fx.Node, srcs: list[str]) -> None:
    """Add a later op of a module call to its node: its outside inputs, and its output as the module's."""
    unpacks = _aten_name(node.target) == "getitem" and all(s == current for s in srcs)
    if not unpacks:  # an LSTM's (output, (h, c)) unpacked: the module's output stays its first
        g.nodes[current]["out_shape"] = _shape(node)
        g.nodes[current]["act_bytes"] = 4 * numel(_shape(node))
    for s in srcs:
        if s != current and not g.has_edge(s, current):
            g.add_edge(s, current)
            g.nodes[current]["in_shapes"].append(g.nodes[s]["out_shape"])


def _function_attrs(node: torch.fx.Node, in_shapes: list[tuple[int, ...] | None]) -> dict[str, Any]:
    kind = _ATEN_KINDS.get(_aten_name(node.target), "other")
    out_shape = _shape(node)
    macs = function_macs(kind, in_shapes, out_shape)
    if kind == "linear" and in_shapes and in_shapes[0] and out_shape:  # on a parameter: a K-long dot per output
        macs = numel(out_shape) * in_shapes[0][-1]
    return dict(op=kind, target=_aten_name(node.target), module_type="", out_shape=out_shape, in_shapes=in_shapes,
                params=0, macs=macs, weight_bytes=0, act_bytes=4 * numel(out_shape))


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
