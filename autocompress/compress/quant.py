"""Mixed-precision quantisation: per-layer weight and input-activation bit-widths.

Accuracy is simulated in PyTorch with fake quantisation. :class:`QuantConv2d`
(and its 1-D and 3-D twins) and :class:`QuantLinear` subclass ``nn.Conv2d`` / ``nn.Linear`` (so tracing,
cost tables and surgery still see a conv or a linear) and carry ``wbits`` and
``abits``:

* weights: per-output-channel symmetric, integer range ``[-(2^(b-1)-1), 2^(b-1)-1]``
  (the range ONNX Runtime uses for symmetric int8 weights);
* input activations: per-tensor affine (asymmetric, unsigned ``[0, 2^b-1]`` with a
  zero point) over a calibrated ``[min, max]`` range that always contains 0;
* 16 bits means fp16 rounding, 32 bits means untouched float.

Both use the straight-through estimator (Polino et al. 2018): the forward pass
and the loss see quantised values, the gradient goes to the float weights
unchanged, so fine-tuning trains the float copy through the quantised forward.
Deployment (``autocompress.export.int8``) starts from :func:`strip_fake_quant`'s
float model plus :func:`layer_bits`.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from autocompress.compress.base import ApplyContext, Chosen, Primitive, modules_under, rows_under
from autocompress.space.inputs import as_tuple
from autocompress.space.costs import CostTable
from autocompress.space.graph import ModelGraph
from autocompress.space.space import Decision, SearchSpace

FLOAT = 32
WBITS_CHOICES = (32, 16, 8, 4)
ABITS_CHOICES = (32, 16, 8)


def _ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``q`` in the forward pass, identity gradient to ``x`` in the backward pass."""
    return x + (q - x).detach()


def fake_quant_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel symmetric fake quantisation of a weight tensor (dim 0 = output channel)."""
    if bits >= FLOAT:
        return w
    if bits == 16:
        return _ste(w, w.half().to(w.dtype))
    qmax = 2 ** (bits - 1) - 1
    flat = w.flatten(1)  # (out channels, rest): no rank-dependent shapes, so fx can trace through
    scale = flat.detach().abs().amax(1, keepdim=True).clamp_min(1e-12) / qmax
    q = (torch.clamp(torch.round(flat / scale), -qmax, qmax) * scale).view_as(w)
    return _ste(w, q)


def fake_quant_activation(x: torch.Tensor, bits: int, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Per-tensor affine fake quantisation of ``x`` over ``[lo, hi]`` (widened to contain 0)."""
    if bits >= FLOAT:
        return x
    if bits == 16:
        return _ste(x, x.half().to(x.dtype))
    levels = 2 ** bits - 1
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    scale = ((hi - lo) / levels).clamp_min(1e-12)
    zero = torch.round(-lo / scale)
    q = (torch.clamp(torch.round(x / scale) + zero, 0, levels) - zero) * scale
    return _ste(x, q)


class _FakeQuant:
    """Shared state of the quantised layers: bit-widths and the observed input range."""

    wbits: int
    abits: int
    act_min: torch.Tensor
    act_max: torch.Tensor

    def _init_quant(self, wbits: int, abits: int) -> None:
        self.wbits, self.abits = int(wbits), int(abits)
        # inf/-inf mark "not calibrated yet"; the first batch seen then sets the range.
        self.register_buffer("act_min", torch.tensor(float("inf")))
        self.register_buffer("act_max", torch.tensor(float("-inf")))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Widen the activation range to cover ``x`` (running min/max)."""
        self.act_min.copy_(torch.minimum(self.act_min, x.detach().min()))
        self.act_max.copy_(torch.maximum(self.act_max, x.detach().max()))

    def reset_range(self) -> None:
        self.act_min.fill_(float("inf"))
        self.act_max.fill_(float("-inf"))

    def _quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.abits >= FLOAT:
            return x
        if self.training:
            self.observe(x)
        # An uncalibrated layer falls back to this batch's own range (no tensor branch: fx-friendly).
        lo = torch.where(torch.isfinite(self.act_min), self.act_min, x.detach().min())
        hi = torch.where(torch.isfinite(self.act_max), self.act_max, x.detach().max())
        return fake_quant_activation(x, self.abits, lo, hi)

    def extra_repr(self) -> str:  # type: ignore[override]
        return f"{super().extra_repr()}, wbits={self.wbits}, abits={self.abits}"  # type: ignore[misc]


class _QuantConv(_FakeQuant):
    """A conv of ``float_type`` whose weights and input are fake-quantised to ``wbits`` / ``abits``."""

    float_type: type[nn.Module] = nn.Conv2d

    def __init__(self, *args, wbits: int = FLOAT, abits: int = FLOAT, **kwargs) -> None:
        self.float_type.__init__(self, *args, **kwargs)
        self._init_quant(wbits, abits)

    @classmethod
    def from_float(cls, conv: nn.Module, wbits: int = FLOAT, abits: int = FLOAT) -> "_QuantConv":
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                padding_mode=conv.padding_mode, wbits=wbits, abits=abits,
                device=conv.weight.device, dtype=conv.weight.dtype)
        q.weight, q.bias = conv.weight, conv.bias  # keep the float parameters themselves
        q.train(conv.training)
        return q

    def to_float(self) -> nn.Module:
        conv = self.float_type(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                               padding=self.padding, dilation=self.dilation, groups=self.groups,
                               bias=self.bias is not None, padding_mode=self.padding_mode,
                               device=self.weight.device, dtype=self.weight.dtype)
        conv.weight = nn.Parameter(self.weight.detach().clone())
        if self.bias is not None:
            conv.bias = nn.Parameter(self.bias.detach().clone())
        return conv.train(self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._quant_input(x), fake_quant_weight(self.weight, self.wbits), self.bias)


class QuantConv1d(_QuantConv, nn.Conv1d):
    float_type = nn.Conv1d


class QuantConv2d(_QuantConv, nn.Conv2d):
    """An ``nn.Conv2d`` whose weights and input are fake-quantised to ``wbits`` / ``abits``."""

    float_type = nn.Conv2d


class QuantConv3d(_QuantConv, nn.Conv3d):
    float_type = nn.Conv3d


class QuantLinear(_FakeQuant, nn.Linear):
    """An ``nn.Linear`` whose weights and input are fake-quantised to ``wbits`` / ``abits``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, wbits: int = FLOAT,
                 abits: int = FLOAT, device=None, dtype=None) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_quant(wbits, abits)

    @classmethod
    def from_float(cls, linear: nn.Linear, wbits: int = FLOAT, abits: int = FLOAT) -> "QuantLinear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, wbits=wbits, abits=abits,
                device=linear.weight.device, dtype=linear.weight.dtype)
        q.weight, q.bias = linear.weight, linear.bias
        q.train(linear.training)
        return q

    def to_float(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        lin.weight = nn.Parameter(self.weight.detach().clone())
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.detach().clone())
        return lin.train(self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._quant_input(x), fake_quant_weight(self.weight, self.wbits), self.bias)


QUANT_TYPES = (QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear)
_QUANT_CONV = {nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Conv3d: QuantConv3d}
LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # the layers that take bit-widths


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the submodule at ``path`` through its parent (works in an fx GraphModule too)."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def quantise_module(m: nn.Module, wbits: int, abits: int) -> nn.Module:
    """``m`` as a fake-quant layer at the given bits (an existing one is updated in place)."""
    if isinstance(m, QUANT_TYPES):
        m.wbits, m.abits = int(wbits), int(abits)
        return m
    for float_type, quant_type in _QUANT_CONV.items():
        if isinstance(m, float_type):
            return quant_type.from_float(m, wbits, abits)
    if isinstance(m, nn.Linear):
        return QuantLinear.from_float(m, wbits, abits)
    raise TypeError(f"cannot quantise a {type(m).__name__}; only Conv1d/2d/3d and Linear")


@torch.no_grad()
def calibrate_activations(model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Set every quantised layer's input range to the min/max seen over ``batches`` (eval mode)."""
    layers = [m for m in model.modules() if isinstance(m, QUANT_TYPES) and m.abits < FLOAT]
    for m in layers:
        m.reset_range()
    hooks = [m.register_forward_pre_hook(lambda mod, args: mod.observe(args[0])) for m in layers]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(*as_tuple(batch))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return model


def strip_fake_quant(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with plain float convs / ``Linear`` in place of the fake-quant layers."""
    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        if isinstance(m, QUANT_TYPES):
            _set_module(out, name, m.to_float())
    return out


def layer_bits(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Module path -> (wbits, abits) for every conv and linear; float layers are (32, 32)."""
    return {name: ((m.wbits, m.abits) if isinstance(m, QUANT_TYPES) else (FLOAT, FLOAT))
            for name, m in model.named_modules() if isinstance(m, LAYER_TYPES)}


class Quantize(Primitive):
    """``wbits:<path>`` and ``abits:<path>`` on every conv and linear, first and last included."""

    kinds = ("wbits", "abits")

    def decisions(self, graph: ModelGraph) -> list[Decision]:
        out: list[Decision] = []
        seen: set[str] = set()
        for node in graph.layers("conv", "linear"):
            path = graph.node(node)["target"]
            if path in seen:  # a module called twice is one decision
                continue
            seen.add(path)
            info = {"path": path, "node": node}
            out.append(Decision(f"wbits:{path}", "wbits", (path,), WBITS_CHOICES, FLOAT, info))
            out.append(Decision(f"abits:{path}", "abits", (path,), ABITS_CHOICES, FLOAT, info))
        return out

    def estimate(self, table: CostTable, chosen: Chosen, space: SearchSpace) -> None:
        for d, bits in chosen:
            for row in rows_under(table, _path(d)):
                setattr(row, d.kind, int(bits))

    def transform(self, model: nn.Module, chosen: Chosen, ctx: ApplyContext) -> nn.Module:
        wanted: dict[str, dict[str, int]] = {}
        for d, bits in chosen:
            wanted.setdefault(_path(d), {})[d.kind] = int(bits)
        changed = False
        for path, bits in wanted.items():
            targets = modules_under(model, path, LAYER_TYPES)
            if not targets:
                ctx.notes.append(f"quant: {path!r} no longer exists (an earlier primitive removed it); "
                                 f"its {', '.join(f'{k}={v}' for k, v in sorted(bits.items()))} was skipped")
                continue
            for name, m in targets:
                wb = bits.get("wbits", getattr(m, "wbits", FLOAT))
                ab = bits.get("abits", getattr(m, "abits", FLOAT))
                q = quantise_module(m, wb, ab)
                if q is not m:
                    _set_module(model, name, q)
                changed = True
        if changed:
            batch = ctx.calibration if ctx.calibration is not None else ctx.example_input
            if ctx.calibration is None:
                ctx.notes.append("quant: activation ranges come from the example input only; pass calibration "
                                 "data (or fine-tune, which widens them) for realistic ranges")
            calibrate_activations(model, [batch])
        return model


def _path(d: Decision) -> str:
    return str(d.info.get("path", d.layers[0])) if d.info else d.layers[0]
