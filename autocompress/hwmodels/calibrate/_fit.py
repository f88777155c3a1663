"""Fitting a target's coefficients to measured latencies, and the error statistics of a fit."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from autocompress.errors import UserInputError
from autocompress.hwmodels.formula import (Coefficients, KernelArrays, OpArrays, conversion_us, latency_us,
                                          reorder_us)
from autocompress.hwmodels.fusion import structure
from autocompress.hwmodels.predict import PARTS, part_indices, predict
from autocompress.hwmodels.target import KERNEL_CLASSES, Target
from autocompress.space.costs import CostTable


@dataclass
class Sample:
    """One measured configuration: its cost table and measured latency (ms) at ``batch``."""

    name: str
    table: CostTable
    measured_ms: float
    batch: int = 1
    parts: dict[str, float] | None = None  # milliseconds per latency part, from a runtime profile
    weight: float = 1.0  # the sample's weight in the fit


# Profiled parts the fit matches besides the totals: few, large nodes whose share the totals cannot pin
# down (the choice and PART_WEIGHT are measured in docs/hwmodels.md, "Calibration").
FITTED_PARTS = ("qconv", "linear", "pool")
PART_WEIGHT = 0.3
# A single layer's weight beside variants of the searched networks (docs/hwmodels.md, "Calibration").
LAYER_WEIGHT = 0.25

# A network's scale (``network_scales``) needs this many of its own variants, and stays within these bounds:
# a larger bias than that means a term the model lacks, not a bias to paper over.
NETWORK_SCALE_MIN_SAMPLES = 4
NETWORK_SCALE_BOUNDS = (0.67, 1.5)

_GLOBAL = ("dram_gbs", "cache_gbs", "kernel_overhead_us", "elementwise_overhead_us", "call_overhead_us",
           "gemm_k0", "gemm_s0", "out_ns")
_OVERHEADS = ("kernel_overhead_us", "elementwise_overhead_us", "view_overhead_us")


def single_layer(table: CostTable) -> bool:
    """A table of at most one conv, linear or pool: a layer configuration, not a network."""
    return sum(r.op in ("conv", "linear", "pool") for r in table) <= 1


@dataclass(frozen=True)
class _SampleArrays:
    """One sample's kernels and standalone ops, the latency part each counts in, and its totals of
    conversions and reorders (their dispatches are linear in the count, so taken once per sample)."""

    kernels: KernelArrays
    ops: OpArrays
    kernel_parts: np.ndarray  # index into PARTS
    op_parts: np.ndarray
    conversions: int
    reordered_elements: float
    reorders: int


@dataclass(frozen=True)
class _ProfiledParts:
    """A sample's profiled ``FITTED_PARTS`` (µs); ``counted`` marks those at >= 2 % of its total."""

    sample: int
    measured_us: np.ndarray
    counted: np.ndarray
    floor_us: float


class FitProblem:
    """Samples as arrays of kernel quantities, so one evaluation of ``formula.latency_us`` covers a sample."""

    def __init__(self, base: Target, samples: Sequence[Sample], layer_weight: float = 1.0) -> None:
        self.base = base
        self.measured_us = np.array([s.measured_ms * 1e3 for s in samples])
        self.weight = np.array([s.weight * (layer_weight if single_layer(s.table) else 1.0) for s in samples])
        self.samples: list[_SampleArrays] = []
        self.profiled: list[_ProfiledParts] = []
        self.fitted_parts = np.array([PARTS.index(p) for p in FITTED_PARTS], dtype=int)
        used, int8, plain = set(), set(), set()
        present = {"slow_pool": False, "plain_pool": False, "reorder": False, "convert": False, "view": False,
                   "steps": False, "math": False}
        for i, s in enumerate(samples):
            if s.parts and len(self.fitted_parts):
                measured = np.array([s.parts.get(p, 0.0) * 1e3 for p in PARTS])[self.fitted_parts]
                floor = 0.02 * s.measured_ms * 1e3
                self.profiled.append(_ProfiledParts(i, measured, measured >= floor, floor))
            st = structure(s.table, base, s.batch)
            self.samples.append(_SampleArrays(
                KernelArrays.of(st.kernels), OpArrays.of(st.ops), *part_indices(st, s.table),
                sum(k.conversions for k in st.kernels) + sum(o.conversions for o in st.ops),
                sum(k.reordered_elements for k in st.kernels) + sum(o.reordered_elements for o in st.ops),
                sum(k.reorders for k in st.kernels) + sum(o.reorders for o in st.ops)))
            used.update(k.kernel_class for k in st.kernels)
            int8.update(k.kernel_class for k in st.kernels if k.dtype == "int8")
            plain.update(k.kernel_class for k in st.kernels if k.plain)
            present["slow_pool"] |= any(o.slow_pool_elements for o in st.ops)
            present["plain_pool"] |= any(o.plain_pool_elements for o in st.ops)
            present["reorder"] |= any(k.reordered_elements for k in st.kernels) or any(
                o.reordered_elements for o in st.ops)
            present["convert"] |= any(k.conversion_bytes for k in st.kernels) or any(
                o.conversion_bytes for o in st.ops)
            present["view"] |= any(o.view for o in st.ops)
            present["math"] |= any(o.math_elements for o in st.ops) or any(k.math_elements for k in st.kernels)
            present["steps"] |= any(k.steps for k in st.kernels)
        self.classes = [c for c in KERNEL_CLASSES if c in used]
        self.int8_classes = [c for c in KERNEL_CLASSES if c in int8]
        self.plain_classes = [c for c in KERNEL_CLASSES if c in plain]
        # The coefficients fitted: only those some sample exercises.
        self.names = ([f"efficiency.{c}" for c in self.classes]
                      + [f"int8_class_efficiency.{c}" for c in self.int8_classes]
                      + [f"plain_efficiency.{c}" for c in self.plain_classes]
                      + (["plain_pool_ns"] if present["plain_pool"] else [])
                      + (["int8_out_ns"] if self.int8_classes else [])
                      + list(_GLOBAL) + (["llc_gbs"] if base.llc_bytes else [])
                      + (["int8_pool_ns"] if present["slow_pool"] else [])
                      + (["reorder_ns"] if present["reorder"] else []) + (["convert_ns"] if present["convert"] else [])
                      + (["view_overhead_us"] if present["view"] else [])
                      + (["step_overhead_us"] if present["steps"] else [])
                      + (["math_ns"] if present["math"] else [])
                      + (["memory_overlap"] if base.memory_overlap > 0 else []))

    def x0(self) -> list[float]:
        return [math.log(self._value(self.base, n)) for n in self.names]

    @staticmethod
    def _value(t: Target, name: str) -> float:
        if name.startswith("efficiency."):
            return t.efficiency[name.split(".", 1)[1]]
        if name.startswith("int8_class_efficiency."):
            return t.int8_class_efficiency.get(name.split(".", 1)[1], 1.0)
        if name.startswith("plain_efficiency."):
            return t.plain_efficiency.get(name.split(".", 1)[1], 1.0)
        return max(float(getattr(t, name)), 1e-3)

    def target(self, x: Sequence[float], **extra: Any) -> Target:
        values = dict(zip(self.names, (math.exp(v) for v in x)))
        efficiency = dict(self.base.efficiency)
        for c in self.classes:
            efficiency[c] = values.pop(f"efficiency.{c}")
        int8 = dict(self.base.int8_class_efficiency)
        for c in self.int8_classes:
            int8[c] = values.pop(f"int8_class_efficiency.{c}")
        plain = dict(self.base.plain_efficiency)
        for c in self.plain_classes:
            plain[c] = values.pop(f"plain_efficiency.{c}")
        return self.base.with_(efficiency=efficiency, int8_class_efficiency=int8, plain_efficiency=plain,
                               **values, **extra)

    def predicted_parts(self, x: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        """(total µs per sample, µs per part per sample), as ``predict`` gives them."""
        c = Coefficients.of(self.target(x), rate_as_divisor=True)
        n_parts = len(PARTS)
        convert, reorder = PARTS.index("convert"), PARTS.index("reorder")
        parts = np.zeros((len(self.samples), n_parts))
        for i, s in enumerate(self.samples):
            lat = latency_us(c, s.kernels, s.ops)
            row = np.bincount(s.kernel_parts, lat.kernel_core, n_parts) + np.bincount(s.op_parts, lat.op_core, n_parts)
            traffic = lat.kernel_conversion_traffic.sum() + lat.op_conversion_traffic.sum()
            row[convert] += conversion_us(c, traffic, s.conversions)
            row[reorder] += reorder_us(c, s.reordered_elements, s.reorders)
            parts[i] = row
        return parts.sum(axis=1) + c.call_overhead_us, parts

    def predicted_us(self, x: Sequence[float]) -> np.ndarray:
        return self.predicted_parts(x)[0]

    def residuals(self, x: Sequence[float]) -> np.ndarray:
        """Log error of each sample's total, plus ``PART_WEIGHT`` times the log error of each of its
        profiled ``FITTED_PARTS`` that holds at least 2 % of the total."""
        total, parts = self.predicted_parts(x)
        res = [self.weight * np.log(total / self.measured_us)]
        for p in self.profiled:
            predicted = parts[p.sample][self.fitted_parts]
            res.append(self.weight[p.sample] * PART_WEIGHT * p.counted
                       * np.log((predicted + p.floor_us) / (p.measured_us + p.floor_us)))
        return np.concatenate(res)


def error_stats(predicted_ms: Sequence[float], measured_ms: Sequence[float]) -> dict[str, float]:
    """nn-Meter's accuracy measures: share within ±10 % and ±5 %, RMSPE, plus the median |error| and the
    median signed error (below 0: underpredicted)."""
    errs = [(p - m) / m for p, m in zip(predicted_ms, measured_ms)]
    if not errs:
        return {"samples": 0}
    abs_errs = sorted(abs(e) for e in errs)
    n = len(errs)
    return {"samples": n, "within_10": sum(e <= 0.10 for e in abs_errs) / n,
            "within_5": sum(e <= 0.05 for e in abs_errs) / n,
            "rmspe": math.sqrt(sum(e * e for e in errs) / n), "median_abs_err": abs_errs[n // 2],
            "max_abs_err": abs_errs[-1], "median_err": sorted(errs)[n // 2]}


def fit_target(base: Target, samples: Sequence[Sample], name: str | None = None,
               sources_note: str = "fitted by autocompress calibrate", llc_choices: Sequence[int] = (),
               layer_weight: float = 1.0) -> Target:
    """Least-squares fit of ``base``'s efficiencies, bandwidths and overheads to ``samples``.

    Each sample's residual is weighted by its ``weight``, times ``layer_weight`` for a single-layer
    configuration (``single_layer``; ``LAYER_WEIGHT`` when variants of the searched networks are in).

    ``llc_choices``: last-level cache sizes (bytes) to try; the one whose fit has the lowest loss is
    kept. A cache size is a threshold, not a smooth parameter, so it is chosen by refitting at each.
    """
    from scipy.optimize import least_squares

    if len(samples) < 4:
        raise UserInputError(f"calibration needs at least 4 measured configurations, got {len(samples)}")
    best = None
    for llc in dict.fromkeys(llc_choices or [base.llc_bytes]):
        prob = FitProblem(base.with_(llc_bytes=int(llc)), samples, layer_weight)
        x0 = np.array(prob.x0())
        # Efficiencies up to 3x the stated peak; a runtime op's dispatch costs at least ~0.5 µs on any CPU
        # (without that floor the fit trades per-op overheads against bandwidths).
        lo = np.array([math.log(0.5) if n in _OVERHEADS else math.log(1e-3) for n in prob.names])
        hi = np.array([math.log(3.0) if n.startswith(("efficiency", "int8_class", "plain_eff"))
                       else math.log(1.0) if n == "memory_overlap" else math.log(1e6) for n in prob.names])
        x0 = np.clip(x0, lo + 1e-6, hi - 1e-6)
        res = least_squares(prob.residuals, x0, bounds=(lo, hi), loss="soft_l1", f_scale=0.05, max_nfev=400)
        if best is None or res.cost < best[1].cost:
            best = (prob, res)
    prob, res = best
    pred_ms = prob.predicted_us(res.x) / 1e3
    stats = error_stats(list(pred_ms), [s.measured_ms for s in samples])
    sources = dict(base.sources)
    sources["fitted"] = f"{sources_note}: {', '.join(prob.names)} from {len(samples)} measurements"
    if len(set(llc_choices)) > 1:
        sizes = ", ".join(f"{c / 2**20:g}" for c in sorted(set(llc_choices)))
        sources["llc_bytes"] = f"the best fit of {sizes} MiB (this machine's last-level cache and its fractions)"
    return prob.target(res.x, name=name or base.name, calibrated=True, sources=sources, network_scale={},
                       fit={k: (round(v, 4) if isinstance(v, float) else v) for k, v in stats.items()})


def network_scales(target: Target, samples: Sequence[Sample]) -> dict[str, float]:
    """Per network (``CostTable.network``) with at least ``NETWORK_SCALE_MIN_SAMPLES`` samples: the median
    of measured / predicted latency under ``target``, clipped to ``NETWORK_SCALE_BOUNDS``.

    Coefficients shared by layers and many networks leave each network a bias of a few per cent of its
    own (MobileNetV2 at 224x224 ran 3-4 % slower than its kernels predict on two machine states); its
    calibration variants measure that bias, and ``Target.network_scale`` takes it out of its predictions.
    """
    unscaled = target.with_(network_scale={})  # one target, so predict's coefficient cache serves every sample
    ratios: dict[str, list[float]] = {}
    for s in samples:
        if s.table.network:
            ratios.setdefault(s.table.network, []).append(s.measured_ms / predict(s.table, unscaled, s.batch).latency_ms)
    lo, hi = NETWORK_SCALE_BOUNDS
    return {net: round(min(hi, max(lo, float(np.median(r)))), 4) for net, r in ratios.items()
            if len(r) >= NETWORK_SCALE_MIN_SAMPLES}


def llc_choices(t: Target) -> list[int]:
    """Last-level cache sizes for ``fit_target`` to try on this machine: powers of two above
    ``t.cache_bytes`` up to the largest CPU cache the OS reports. On a shared machine other tenants
    hold part of that cache, so the share a model keeps between calls is found by the fit.
    With no cache reported, just ``t.llc_bytes``."""
    largest = 0
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        try:
            size = int(text.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(text[-1:], 0)
        except ValueError:
            continue
        largest = max(largest, size)
    choices = []
    size = max(t.cache_bytes, 1) * 2
    while size <= largest:
        choices.append(size)
        size *= 2
    return choices or [t.llc_bytes]
