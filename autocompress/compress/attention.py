"""``nn.MultiheadAttention`` as explicit q/k/v/out ``nn.Linear`` layers and scaled-dot-product attention.

``nn.MultiheadAttention`` keeps its q/k/v projections in one packed parameter
and, in inference, runs a fused kernel (``_native_multi_head_attention``) that
neither torch.fx nor ONNX can see into. :func:`split_attention` replaces every
instance by :class:`SplitAttention`: the same weights in four ``nn.Linear``
layers and ``F.scaled_dot_product_attention``, the same forward signature and
return value. The projections then trace as linear layers (bit-widths, low
rank and head pruning apply to them) and the model exports to ONNX.

:func:`attention_units` finds multi-head attention on a layer graph by
structure (the units the ``heads`` decisions cut), whatever module holds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import networkx as nx
import torch
import torch.nn.functional as F
from torch import nn

from autocompress.errors import UntraceableModelError
from autocompress.space.graph import ModelGraph


class SplitAttention(nn.Module):
    """Multi-head attention over explicit ``q_proj``/``k_proj``/``v_proj``/``out_proj`` linear layers.

    ``num_heads`` and ``head_dim`` describe the current heads (head pruning
    lowers ``num_heads``); the projections hold ``num_heads * head_dim`` rows.
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, *, kdim: int | None = None,
                 vdim: int | None = None, bias: bool = True, out_bias: bool = True, dropout: float = 0.0,
                 batch_first: bool = False) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.dropout, self.batch_first = float(dropout), bool(batch_first)
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, inner, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=out_bias)
        # nn.TransformerEncoderLayer reads these to choose its fused fast path; None and False turn it off.
        self.in_proj_weight = None
        self.in_proj_bias = None
        self._qkv_same_embed_dim = False

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> "SplitAttention":
        """The equivalent module, sharing no storage with ``mha`` (its parameters are copied)."""
        if mha.bias_k is not None or mha.bias_v is not None or mha.add_zero_attn:
            raise UntraceableModelError("split_attention: nn.MultiheadAttention with add_bias_kv or add_zero_attn "
                                        "is not supported (its extra key/value rows have no linear-layer form)")
        e = mha.embed_dim
        bias = mha.in_proj_bias is not None
        new = cls(e, mha.num_heads, mha.head_dim, kdim=mha.kdim, vdim=mha.vdim, bias=bias,
                  out_bias=mha.out_proj.bias is not None, dropout=mha.dropout, batch_first=mha.batch_first)
        if mha.in_proj_weight is not None:
            weights = mha.in_proj_weight.detach().split(e)
        else:
            weights = tuple(w.detach() for w in (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight))
        biases = mha.in_proj_bias.detach().split(e) if bias else (None, None, None)
        with torch.no_grad():
            for layer, w, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases):
                layer.weight.copy_(w)
                if b is not None:
                    layer.bias.copy_(b)
            new.out_proj.weight.copy_(mha.out_proj.weight.detach())
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias.detach())
        ref = mha.out_proj.weight
        return new.to(device=ref.device, dtype=ref.dtype).train(mha.training)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint")  # as nn.MultiheadAttention
        # Only a real tensor can be unbatched: under torch.fx the query is a Proxy and taken as batched.
        unbatched = isinstance(query, torch.Tensor) and query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        q = self.q_proj(query).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_proj(key).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(value).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        mask = self._mask(key_padding_mask, attn_mask, q)
        p = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores + mask
            weights = F.dropout(torch.softmax(scores, dim=-1), p)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
            weights = None
        out = self.out_proj(out.transpose(1, 2).flatten(2))
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None:
            if average_attn_weights:
                weights = weights.mean(1)
            if unbatched:
                weights = weights.squeeze(0)
        return out, weights

    def _mask(self, key_padding_mask: torch.Tensor | None, attn_mask: torch.Tensor | None,
              q: torch.Tensor) -> torch.Tensor | None:
        """One additive mask broadcastable to (batch, heads, L, S), as nn.MultiheadAttention merges them."""
        mask = None
        if attn_mask is not None:
            m = _additive(attn_mask, q.dtype)
            # (L, S) for every sample and head, or (batch * heads, L, S)
            mask = m.unflatten(0, (-1, self.num_heads)) if m.dim() == 3 else m
        if key_padding_mask is not None:
            kp = _additive(key_padding_mask, q.dtype)[:, None, None, :]
            mask = kp if mask is None else mask + kp
        return mask

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"batch_first={self.batch_first}")


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = may not attend) as 0 / -inf; a float mask is added as it is."""
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def split_attention(model: nn.Module) -> nn.Module:
    """``model`` with every ``nn.MultiheadAttention`` replaced, in place, by an equivalent :class:`SplitAttention`.

    Outputs match the original to float rounding. Raises UntraceableModelError
    for attention with ``add_bias_kv`` or ``add_zero_attn``.
    """
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    for name, mha in targets:
        parent_path, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, SplitAttention.from_mha(mha))
    if targets:
        for m in model.modules():
            if isinstance(m, nn.TransformerEncoder):
                # Its nested-tensor fast path reads the packed projection weights, which are gone.
                m.use_nested_tensor = False
    return model


# -- finding attention units on a layer graph -----------------------------------------------

HEADS_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head", "num_head")
_VIEW_OPS = ("reshape", "other", "mul")  # views, unflatten, and scaling by a constant between a projection and QK
_SCORE_OPS = ("reshape", "other", "mul", "add", "dropout")  # scaling, masks and dropout around the softmax


@dataclass(frozen=True)
class AttentionUnit:
    """One multi-head attention: its projections' module paths, ``heads`` x ``head_dim``, and its graph rows."""

    holder: str  # the module holding q/k/v (and its head-count attributes)
    q: str
    k: str
    v: str
    out: str
    heads: int
    head_dim: int
    region: tuple[str, ...]  # graph nodes between the projections and the output projection

    @property
    def layers(self) -> tuple[str, ...]:
        return (self.q, self.k, self.v, self.out)


def _single_pred(g: nx.DiGraph, n: str) -> str | None:
    preds = list(g.predecessors(n))
    return preds[0] if len(preds) == 1 else None


def _source_linear(g: nx.DiGraph, n: str, ops: tuple[str, ...] = _VIEW_OPS) -> str | None:
    """The linear node ``n`` comes from through single-input views, if any."""
    for _ in range(8):
        a = g.nodes[n]
        if a["op"] == "linear":
            return n
        if a["op"] not in ops:
            return None
        n = _single_pred(g, n)
        if n is None:
            return None
    return None


def _sink_linear(g: nx.DiGraph, n: str) -> str | None:
    """The one linear node the output of ``n`` reaches through single-use views."""
    for _ in range(8):
        succ = list(g.successors(n))
        if len(succ) != 1:
            return None
        n = succ[0]
        a = g.nodes[n]
        if a["op"] == "linear":
            return n
        if a["op"] not in ("reshape", "other") or len(list(g.predecessors(n))) != 1:
            return None
    return None


def _eager_qkv(g: nx.DiGraph, softmax: str) -> tuple[list[str], str] | None:
    """(q, k, v linear nodes, the output matmul) of ``matmul(q, k^T) -> [scale/mask] -> softmax -> matmul(., v)``."""
    n, scores = softmax, None
    for _ in range(4):  # back from the softmax to the score matmul, through scaling and mask adds
        preds = [p for p in g.predecessors(n) if g.nodes[p]["op"] in (*_SCORE_OPS, "matmul")]
        if len(preds) != 1:
            return None
        n = preds[0]
        if g.nodes[n]["op"] == "matmul":
            scores = n
            break
    n, weighted = softmax, None
    for _ in range(3):  # forward to the matmul with the values, through dropout
        succ = list(g.successors(n))
        if len(succ) != 1:
            return None
        n = succ[0]
        if g.nodes[n]["op"] == "matmul":
            weighted = n
            break
        if g.nodes[n]["op"] not in ("dropout", "reshape"):
            return None
    if scores is None or weighted is None:
        return None
    qk = list(g.predecessors(scores))
    v = [p for p in g.predecessors(weighted) if not nx.has_path(g, softmax, p)]
    if len(qk) != 2 or len(v) != 1:
        return None
    return [_source_linear(g, qk[0]), _source_linear(g, qk[1]), _source_linear(g, v[0])], weighted


def _common_parent(paths: list[str]) -> str:
    parts = [p.split(".")[:-1] for p in paths]
    common: list[str] = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def attention_units(mg: ModelGraph) -> list[AttentionUnit]:
    """Every multi-head attention of ``mg`` whose heads can be cut (see the module docstring)."""
    g = mg.graph
    units: list[AttentionUnit] = []
    seen: set[str] = set()
    for n in mg.order:
        a = g.nodes[n]
        if a["op"] == "attention":
            preds = list(g.predecessors(n))[:3]
            if len(preds) != 3 or not a["in_shapes"][0] or len(a["in_shapes"][0]) != 4:
                continue
            qkv, end = [_source_linear(g, p) for p in preds], n
            heads, head_dim = a["in_shapes"][0][1], a["in_shapes"][0][3]
        elif a["op"] == "softmax":
            found = _eager_qkv(g, n)
            if found is None:
                continue
            qkv, end = found
            shape = g.nodes[end]["out_shape"]
            if not shape or len(shape) != 4:
                continue
            heads, head_dim = shape[1], shape[3]
        else:
            continue
        out = _sink_linear(g, end)
        if out is None or None in qkv or len(set(qkv)) != 3 or heads < 2:
            continue
        paths = [g.nodes[x]["target"] for x in (*qkv, out)]
        inner = heads * head_dim
        if len(set(paths)) != 4 or any(p in seen for p in paths) or \
                any(g.nodes[x]["out_ch"] != inner for x in qkv) or g.nodes[out]["in_ch"] != inner:
            continue
        holder = _common_parent(paths[:3])
        if not mg.fx_traced and not any(getattr(mg.modules().get(holder), h, None) == heads for h in HEADS_ATTRS):
            continue  # the module must store its head count where we can update it
        between = set().union(*(nx.descendants(g, x) for x in qkv)) & nx.ancestors(g, out)
        region = tuple(x for x in mg.order if x in between)
        seen.update(paths)
        units.append(AttentionUnit(holder, *paths, heads=heads, head_dim=head_dim, region=region))
    return units
