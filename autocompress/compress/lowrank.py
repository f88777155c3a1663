"""Low-rank factorisation by truncated SVD.

A k x k conv (Cin -> Cout) becomes a k x k conv to ``r`` channels followed by a
1 x 1 conv (r -> Cout) that carries the bias (the channel decomposition of
Zhang et al., "Accelerating Very Deep Convolutional Networks", rather than the
k x 1 / 1 x k spatial split: it keeps the stride and padding in one place and
maps onto ordinary conv kernels every runtime has; Conv1d and Conv3d alike). A
linear layer becomes two linears. With W reshaped to (Cout, Cin*k*k) = U S V^T, the first layer gets
sqrt(S_r) V_r^T and the second U_r sqrt(S_r): the best rank-r approximation.

The choice is a fraction of the full rank min(Cout, Cin*k*k). A choice is
offered only where it cuts MACs: r * (Cin*k*k + Cout) < Cin*k*k * Cout. If an
earlier primitive (pruning) leaves a layer where the factorised form would no
longer be cheaper, the decision is skipped and noted, in ``estimate`` too.
"""

from __future__ import annotations

import torch
from torch import nn

from autocompress.compress.base import ApplyContext, Chosen, Primitive
from autocompress.space.costs import CostTable, LayerCost
from autocompress.space.graph import ModelGraph
from autocompress.space.space import Decision, SearchSpace

FRACTIONS = (1.0, 0.5, 0.25, 0.125)
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _kernel_numel(kernel: tuple[int, ...]) -> int:
    n = 1
    for k in kernel:
        n *= int(k)
    return n


def target_rank(cin_k: int, cout: int, fraction: float) -> int | None:
    """The rank for ``fraction``, or None where factorising would not cut MACs."""
    r = max(1, int(round(fraction * min(cout, cin_k))))
    return r if r * (cin_k + cout) < cin_k * cout else None


def _factor(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, second) with second @ first the best rank-``r`` approximation of ``weight`` as a matrix.

    Through the eigendecomposition of the smaller Gram matrix (W W^T or W^T W, in float64) rather
    than a full SVD: the same top singular vectors, ~10x faster on a 512 x 4608 conv; the product
    is the projection U_r U_r^T W (or W V_r V_r^T) even where singular values vanish."""
    mat = weight.detach().double().flatten(1)
    wide = mat.shape[0] <= mat.shape[1]
    gram = mat @ mat.T if wide else mat.T @ mat
    eigvals, vecs = torch.linalg.eigh(gram)  # ascending
    top = vecs[:, -r:].flip(1)
    sv = eigvals[-r:].flip(0).clamp_min(0).sqrt()
    root = sv.clamp_min(float(sv[0]) * 1e-12 + 1e-300).sqrt()
    if wide:  # W ~ U_r U_r^T W: first = U_r^T W / sqrt(s), second = U_r sqrt(s)
        first, second = (top.T @ mat) / root[:, None], top * root[None, :]
    else:  # W ~ W V_r V_r^T: first = sqrt(s) V_r^T, second = W V_r / sqrt(s)
        first, second = root[:, None] * top.T, (mat @ top) / root[None, :]
    return first.to(weight.dtype), second.to(weight.dtype)


def factorise(m: nn.Module, r: int) -> nn.Sequential:
    """The two-layer replacement of conv (1-, 2- or 3-D) or linear ``m`` at rank ``r``."""
    first_w, second_w = _factor(m.weight, r)
    if isinstance(m, nn.Linear):
        a = nn.Linear(m.in_features, r, bias=False)
        b = nn.Linear(r, m.out_features, bias=m.bias is not None)
        a.weight.data.copy_(first_w)
        b.weight.data.copy_(second_w)
    else:
        conv = next(t for t in CONV_TYPES if isinstance(m, t))
        a = conv(m.in_channels, r, m.kernel_size, m.stride, m.padding, m.dilation, bias=False,
                 padding_mode=m.padding_mode)
        b = conv(r, m.out_channels, 1, bias=m.bias is not None)
        a.weight.data.copy_(first_w.reshape(r, *m.weight.shape[1:]))
        b.weight.data.copy_(second_w.reshape(m.out_channels, r, *[1] * (m.weight.dim() - 2)))
    if m.bias is not None:
        b.bias.data.copy_(m.bias.detach())
    return nn.Sequential(a, b)


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


class LowRank(Primitive):
    kinds = ("rank",)

    def decisions(self, graph: ModelGraph) -> list[Decision]:
        out = []
        for n in graph.layers("conv", "linear"):
            a = graph.node(n)
            if a.get("groups", 1) != 1:
                continue
            cin_k = a["in_ch"] * _kernel_numel(a["kernel"])
            fracs = [f for f in FRACTIONS[1:] if target_rank(cin_k, a["out_ch"], f) is not None]
            if fracs:
                out.append(Decision(f"rank:{a['target']}", "rank", (a["target"],), (1.0, *fracs), 1.0))
        return out

    def estimate(self, table: CostTable, chosen: Chosen, space: SearchSpace) -> None:
        for d, frac in chosen:
            path = d.layers[0]
            row = table.by_target(path)
            if row is None or row.op not in ("conv", "linear") or row.groups != 1:
                continue
            r = target_rank(row.in_ch * _kernel_numel(row.kernel), row.out_ch, float(frac))
            if r is None:
                continue
            second = LayerCost(name=f"{row.name}__rank", op=row.op, target=f"{path}.1", out_numel=row.out_numel,
                               in_ch=r, out_ch=row.out_ch, spatial=row.spatial, bias=row.bias,
                               wbits=row.wbits, abits=row.abits)
            row.out_numel = row.out_numel * r // max(1, row.out_ch)
            row.out_ch, row.bias, row.target = r, False, f"{path}.0"
            row.params_fixed = 0
            table.insert_after(row.name, second)

    def transform(self, model: nn.Module, chosen: Chosen, ctx: ApplyContext) -> nn.Module:
        modules = dict(model.named_modules())
        for d, frac in chosen:
            path = d.layers[0]
            m = modules.get(path)
            if not isinstance(m, (*CONV_TYPES, nn.Linear)) or getattr(m, "groups", 1) != 1:
                ctx.notes.append(f"{d.id}: skipped, {path} was replaced by an earlier primitive")
                continue
            cin_k = m.weight[0].numel()
            r = target_rank(cin_k, m.weight.shape[0], float(frac))
            if r is None:
                ctx.notes.append(f"{d.id}: skipped, rank {frac} no longer cuts MACs at {path}'s pruned width")
                continue
            _set_module(model, path, factorise(m, r))
        return model
