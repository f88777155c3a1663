"""What each traced node is: its coarse op kind, and the geometry and MACs of the layers that compute.

The op vocabulary is the one ``space.costs`` and ``hwmodels`` cost: conv (1-d, 2-d and 3-d), linear,
matmul (between two activations), attention (scaled dot-product), mha (an nn.MultiheadAttention that
torch.fx keeps whole: projections and attention), rnn (LSTM, GRU, RNN), bn, norm
(LayerNorm, GroupNorm), softmax, embedding, act, pool, add, mul, concat, split, getitem, reshape,
dropout, input, output, const, other.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import fx, nn

_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh,
                nn.LeakyReLU, nn.PReLU, nn.ELU, nn.Mish)
_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                 nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_NORM_MODULES = (nn.LayerNorm, nn.GroupNorm)
_RNN_MODULES = (nn.LSTM, nn.GRU, nn.RNN)
# Gate blocks per step: LSTM input/forget/cell/output, GRU reset/update/new, a plain RNN one.
RNN_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
LEAF_TYPES: tuple[type[nn.Module], ...] = (*_CONV_MODULES, nn.Linear, *_BN_MODULES, *_ACT_MODULES, *_POOL_MODULES,
                                           *_NORM_MODULES, *_RNN_MODULES, nn.Embedding, nn.Softmax,
                                           nn.Dropout, nn.Flatten, nn.Identity, nn.LocalResponseNorm)

_F = torch.nn.functional
_FUNCTION_OPS = {
    operator.add: "add", operator.iadd: "add", torch.add: "add", operator.mul: "mul", torch.mul: "mul",
    torch.cat: "concat", torch.concat: "concat", torch.flatten: "reshape", torch.chunk: "split",
    torch.split: "split", operator.getitem: "getitem", torch.relu: "act", _F.relu: "act",
    _F.relu6: "act", _F.hardswish: "act", torch.sigmoid: "act", _F.silu: "act",
    _F.adaptive_avg_pool2d: "pool", _F.max_pool2d: "pool", _F.avg_pool2d: "pool", _F.adaptive_avg_pool1d: "pool",
    _F.max_pool1d: "pool", _F.avg_pool1d: "pool", torch.mean: "pool", torch.transpose: "reshape",
    _F.dropout: "dropout", torch.matmul: "matmul", torch.bmm: "matmul", operator.matmul: "matmul",
    _F.scaled_dot_product_attention: "attention", torch.softmax: "softmax", _F.softmax: "softmax",
    _F.layer_norm: "norm", _F.group_norm: "norm", _F.gelu: "act", torch.tanh: "act", _F.embedding: "embedding",
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
    for types, kind in _MODULE_KINDS:
        if isinstance(m, types):
            return kind
    return "other"


_MODULE_KINDS: tuple[tuple[Any, str], ...] = (
    (_CONV_MODULES, "conv"), (nn.Linear, "linear"), (_BN_MODULES, "bn"), (_ACT_MODULES, "act"),
    (_POOL_MODULES, "pool"), (nn.Dropout, "dropout"), ((nn.Flatten, nn.Identity), "reshape"),
    (_NORM_MODULES, "norm"), (_RNN_MODULES, "rnn"), (nn.Embedding, "embedding"), (nn.Softmax, "softmax"),
    (nn.MultiheadAttention, "mha"))


def conv_weight_numel(in_ch: int, out_ch: int, kernel: tuple[int, ...], groups: int) -> int:
    """Weights of a conv of any number of dims (a linear layer is a conv with kernel (1, 1))."""
    return (in_ch // groups) * math.prod(kernel) * out_ch


def rnn_weight_numel(input_size: int, hidden: int, layers: int, directions: int, gates: int) -> int:
    """Input and recurrent weights of a stacked RNN: layer l > 0 reads the previous layer's hidden * directions.
    Each weight is used once per step, so its MACs are seq_len times this."""
    reads = input_size + (layers - 1) * hidden * directions + layers * hidden
    return directions * gates * hidden * reads


def mha_macs(embed: int, seq_q: int, seq_k: int) -> int:
    """An nn.MultiheadAttention: Q and output projections over the queries, K and V over the keys (key and
    value widths taken as ``embed``), then Q.K^T and .V over all heads (heads x head_dim = embed)."""
    return 2 * (seq_q + seq_k) * embed * embed + 2 * seq_q * seq_k * embed


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
    if isinstance(m, _CONV_MODULES):
        kernel = tuple(m.kernel_size)
        info.update(in_ch=m.in_channels, out_ch=m.out_channels, kernel=kernel, stride=tuple(m.stride),
                    groups=m.groups, bias=m.bias is not None)
        spatial = numel(out_shape[2:]) if out_shape else 0
        info["macs"] = conv_weight_numel(m.in_channels, m.out_channels, kernel, m.groups) * spatial
    elif isinstance(m, nn.Linear):
        info.update(in_ch=m.in_features, out_ch=m.out_features, kernel=(1, 1), stride=(1, 1), groups=1,
                    bias=m.bias is not None)
        rows = numel(out_shape[1:-1]) if out_shape and len(out_shape) > 2 else 1
        info["macs"] = m.in_features * m.out_features * rows
    elif isinstance(m, _BN_MODULES):
        info.update(in_ch=m.num_features, out_ch=m.num_features)
    elif isinstance(m, _RNN_MODULES):
        info.update(rnn_info(m, in_shape))
    elif isinstance(m, nn.MultiheadAttention):  # self-attention here; the cost table reads the keys' length
        seq = seq_len_of(m.batch_first, in_shape)
        info.update(in_ch=m.embed_dim, out_ch=m.embed_dim, heads=m.num_heads, head_dim=m.head_dim, seq_q=seq,
                    seq_k=seq, batch_first=m.batch_first, macs=mha_macs(m.embed_dim, seq, seq))
    return info


def rnn_info(m: nn.RNNBase, in_shape: tuple[int, ...] | None) -> dict[str, Any]:
    """Geometry and MACs of an LSTM/GRU/RNN on a (batch 1) input sequence.

    The sequence is dim 1 of a batch-first input, else dim 0 (an unbatched input is (seq, features)).
    ``proj_size`` projections are not in the MACs (their weights are still counted as parameters).
    """
    seq = seq_len_of(m.batch_first, in_shape)
    directions = 2 if m.bidirectional else 1
    gates = RNN_GATES[_rnn_base(m)]
    weights = rnn_weight_numel(m.input_size, m.hidden_size, m.num_layers, directions, gates)
    return dict(in_ch=m.input_size, out_ch=m.hidden_size, rnn_layers=m.num_layers, directions=directions,
                gates=gates, seq_len=seq, batch_first=m.batch_first, bias=m.bias, macs=seq * weights)


def seq_len_of(batch_first: bool, in_shape: tuple[int, ...] | None) -> int:
    """The sequence length of an RNN's or MultiheadAttention's input: dim 1 of a batch-first (batch, seq,
    features) input, else dim 0 ((seq, batch, features), or an unbatched (seq, features))."""
    if not in_shape:
        return 0
    return in_shape[1] if batch_first and len(in_shape) == 3 else in_shape[0]


def _rnn_base(m: nn.Module) -> str:
    """The torch class (LSTM, GRU or RNN) that ``m`` is or derives from."""
    return next(base.__name__ for base in _RNN_MODULES if isinstance(m, base))
