"""Latency, energy and memory of a CostTable on a target, without building the model.

``fusion.structure`` fuses the table's rows into kernels and standalone ops as the runtime would;
``formula`` gives each its latency and energy. See docs/hwmodels.md for the equations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from autocompress.hwmodels.formula import KernelArrays, OpArrays, coefficients, energy_pj, latency_us
from autocompress.hwmodels.fusion import structure
from autocompress.hwmodels.kernels import Structure
from autocompress.hwmodels.target import Target
from autocompress.hwmodels.targets import get_target
from autocompress.space.costs import CostTable

# The parts of a model's latency, as a runtime profile splits it (``measure.profile_onnx``):
# float conv kernels, int8 conv kernels, linear layers, pools, concats/splits, layout reorders,
# int8 <-> float conversions, unfused elementwise ops, and the rest (reshapes, shape arithmetic).
PARTS = ("conv", "qconv", "linear", "pool", "concat", "reorder", "convert", "elementwise", "other")
_PART_INDEX = {p: i for i, p in enumerate(PARTS)}
_OP_PART = {"pool": "pool", "concat": "concat", "split": "concat", "add": "elementwise", "act": "elementwise",
            "bn": "elementwise", "output": "reorder", "norm": "elementwise", "softmax": "elementwise"}


def kernel_part(kernel_class: str, dtype: str) -> str:
    return "linear" if kernel_class == "linear" else ("qconv" if dtype == "int8" else "conv")


def op_part(op: str) -> str:
    """The part a standalone op of graph op kind ``op`` counts in."""
    return _OP_PART.get(op, "other")


@dataclass(frozen=True)
class LayerPrediction:
    """One CostTable row. A fused row carries 0; its share is in its kernel's head row."""

    name: str
    op: str
    latency_ms: float
    energy_mj: float
    fused_into: str = ""


@dataclass(frozen=True)
class Prediction:
    """Whole-model prediction for one call at ``batch``."""

    target: str
    batch: int
    latency_ms: float
    energy_mj: float
    weight_bytes: int
    peak_activation_bytes: int
    layers: list[LayerPrediction] = field(default_factory=list)
    parts: dict[str, float] = field(default_factory=dict)  # latency (ms) per part, see PARTS

    @property
    def size_bytes(self) -> int:
        return self.weight_bytes

    def layer(self, name: str) -> LayerPrediction:
        for l in self.layers:
            if l.name == name:
                return l
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "batch": self.batch, "latency_ms": self.latency_ms,
                "energy_mj": self.energy_mj, "weight_bytes": self.weight_bytes, "parts": dict(self.parts),
                "peak_activation_bytes": self.peak_activation_bytes,
                "layers": [{"name": l.name, "op": l.op, "latency_ms": l.latency_ms, "energy_mj": l.energy_mj,
                            "fused_into": l.fused_into} for l in self.layers]}


def part_indices(st: Structure, table: CostTable) -> tuple[np.ndarray, np.ndarray]:
    """The index in PARTS of each kernel's and each standalone op's part."""
    op_kinds = {r.name: r.op for r in table}
    return (np.array([_PART_INDEX[kernel_part(k.kernel_class, k.dtype)] for k in st.kernels], dtype=int),
            np.array([_PART_INDEX[op_part(op_kinds.get(o.name, ""))] for o in st.ops], dtype=int))


def network_scale(t: Target, table: CostTable) -> float:
    """The factor ``t`` measured for ``table``'s network (``Target.network_scale``), else 1."""
    return float(t.network_scale.get(table.network, 1.0)) if t.network_scale else 1.0


def predict(table: CostTable, target: str | Target, batch: int = 1) -> Prediction:
    """Predict one call of the model described by ``table`` at ``batch`` on ``target``."""
    t = get_target(target)
    c = coefficients(t)
    st = structure(table, t, batch)
    kernels, ops = KernelArrays.of(st.kernels), OpArrays.of(st.ops)
    lat = latency_us(c, kernels, ops)
    kernel_pj, op_pj = energy_pj(c, kernels, ops)
    latency = dict(zip([k.head for k in st.kernels], (lat.kernel_core + lat.kernel_convert + lat.kernel_reorder).tolist()))
    latency.update(zip([o.name for o in st.ops], (lat.op_core + lat.op_convert + lat.op_reorder).tolist()))
    energy = dict(zip([k.head for k in st.kernels], kernel_pj.tolist()))
    energy.update(zip([o.name for o in st.ops], op_pj.tolist()))
    kernel_parts, op_parts = part_indices(st, table)
    parts = np.bincount(kernel_parts, lat.kernel_core, len(PARTS)) + np.bincount(op_parts, lat.op_core, len(PARTS))
    parts[_PART_INDEX["convert"]] += lat.kernel_convert.sum() + lat.op_convert.sum()
    parts[_PART_INDEX["reorder"]] += lat.kernel_reorder.sum() + lat.op_reorder.sum()
    scale = network_scale(t, table)
    if scale != 1.0:
        latency = {name: us * scale for name, us in latency.items()}
        parts = parts * scale

    layers = []
    total_us = c.call_overhead_us * scale
    total_pj = 0.0
    for r in table:
        row_us, row_pj = latency.get(r.name, 0.0), energy.get(r.name, 0.0)
        total_us += row_us
        total_pj += row_pj
        head = st.kernel_of.get(r.name, "")
        layers.append(LayerPrediction(r.name, r.op, row_us / 1e3, row_pj * 1e-9, head if head != r.name else ""))
    return Prediction(t.name, batch, total_us / 1e3, total_pj * 1e-9, int(sum(r.weight_bytes for r in table)),
                      table.peak_activation_bytes() * batch, layers, dict(zip(PARTS, (parts / 1e3).tolist())))
