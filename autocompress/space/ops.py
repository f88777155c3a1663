"""What each traced node is: its coarse op kind, and the geometry and MACs of conv/linear layers.

The op vocabulary is the one ``space.costs`` and ``hwmodels`` cost: conv,
linear, bn, act, pool, add, mul, concat, split, getitem, reshape, dropout,
input, output, const, other.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx, nn

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
    torch.nn.functional.dropout: "dropout", torch.matmul: "matmul", torch.bmm: "matmul", operator.matmul: "matmul",
    torch.nn.functional.scaled_dot_product_attention: "attention", torch.softmax: "softmax",
    torch.nn.functional.softmax: "softmax", torch.nn.functional.layer_norm: "norm", torch.nn.functional.gelu: "act",
    torch.tanh: "act",
}
_METHOD_OPS = {
    "view": "reshape", "reshape": "reshape", "flatten": "reshape", "transpose": "reshape", "permute": "reshape",
    "contiguous": "reshape", "chunk": "split", "split": "split", "mean": "pool", "add": "add", "add_": "add",
    "mul": "mul", "mul_": "mul", "relu": "act", "relu_": "act", "sigmoid": "act", "size": "other",
    "matmul": "matmul", "bmm": "matmul", "softmax": "softmax", "tanh": "act",
}


def shape_of(meta: Any) -> tuple[int, ...] | None:
    if meta is None:
        return None
    if hasattr(meta, "shape"):
        return tuple(int(s) for s in meta.shape)
    return None


def module_kind(m: nn.Module) -> str:
    """The op kind of a leaf module."""
    return ("conv" if isinstance(m, nn.Conv2d) else "linear" if isinstance(m, nn.Linear)
            else "bn" if isinstance(m, _BN_MODULES) else "act" if isinstance(m, _ACT_MODULES)
            else "pool" if isinstance(m, _POOL_MODULES) else "dropout" if isinstance(m, nn.Dropout)
            else "reshape" if isinstance(m, (nn.Flatten, nn.Identity)) else "other")


def function_macs(kind: str, in_shapes: list[tuple[int, ...] | None], out_shape: tuple[int, ...] | None) -> int:
    """MACs of a function between activations: a batched matmul, or scaled-dot-product attention."""
    if kind == "matmul" and out_shape and len(in_shapes) >= 2 and in_shapes[0]:
        return numel(out_shape) * in_shapes[0][-1]  # every output element is a K-long dot product
    if kind == "attention" and out_shape and len(in_shapes) >= 2 and in_shapes[0] and in_shapes[1]:
        q, k = in_shapes[0], in_shapes[1]
        heads = numel(q[:-2]) if len(q) > 2 else 1
        return 2 * heads * q[-2] * k[-2] * q[-1]  # Q K^T, then the weights times V
    return 0


def classify(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[str, str, str]:
    """Return (op kind, target string, module type name)."""
    if node.op == "placeholder":
        return "input", node.target, ""
    if node.op == "output":
        return "output", "output", ""
    if node.op == "get_attr":
        return "const", str(node.target), ""
    if node.op == "call_module":
        m = modules[node.target]
        kind = module_kind(m)
        return kind, str(node.target), type(m).__name__
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        return _FUNCTION_OPS.get(node.target, "other"), name, ""
    return _METHOD_OPS.get(str(node.target), "other"), str(node.target), ""


def numel(shape: tuple[int, ...] | None) -> int:
    n = 1
    for s in shape or ():
        n *= s
    return n if shape else 0


def layer_info(m: nn.Module, in_shape: tuple[int, ...] | None, out_shape: tuple[int, ...] | None) -> dict[str, Any]:
    info: dict[str, Any] = {}
    if isinstance(m, nn.Conv2d):
        info.update(in_ch=m.in_channels, out_ch=m.out_channels, kernel=tuple(m.kernel_size),
                    stride=tuple(m.stride), groups=m.groups, bias=m.bias is not None)
        spatial = numel(out_shape[2:]) if out_shape else 0
        info["macs"] = (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1] * m.out_channels * spatial
    elif isinstance(m, nn.Linear):
        info.update(in_ch=m.in_features, out_ch=m.out_features, kernel=(1, 1), stride=(1, 1), groups=1,
                    bias=m.bias is not None)
        rows = numel(out_shape[1:-1]) if out_shape and len(out_shape) > 2 else 1
        info["macs"] = m.in_features * m.out_features * rows
    elif isinstance(m, _BN_MODULES):
        info.update(in_ch=m.num_features, out_ch=m.num_features)
    return info


