"""The latency and energy of kernels and standalone ops on a target: one formula for ``predict`` and the fit.

It is written over numpy arrays of kernel quantities (``KernelArrays``, ``OpArrays``): ``predict``
evaluates one model's kernels, the calibration fit every measured sample's at each step, so a fitted
coefficient means in ``predict`` exactly what it meant in the fit. A kernel takes
``max(compute, memory) + launches x overhead`` (a roofline plus a dispatch per dependent kernel it stands
for); a standalone op pays its memory traffic plus a dispatch. docs/hwmodels.md states the equations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from autocompress.hwmodels.kernels import CONVERSION_BYTES_PER_ELEMENT, DRAM, Kernel, StandaloneOp
from autocompress.hwmodels.target import DTYPES, KERNEL_CLASSES, Target

ADD_PJ = 0.9  # one fp32 add (Horowitz) per output element of a standalone op


@dataclass(frozen=True)
class Coefficients:
    """A target's numbers in the units the formula uses: microseconds, bytes, picojoules."""

    # µs per MAC = us_per_mac[dtype, class] / mac_divisor[dtype, class, plain], the rate reached being
    # peak x efficiency x int8 factors (x plain_efficiency for a plain kernel). ``of`` factors it as the
    # reciprocal rate over plain_efficiency; ``of(t, rate_as_divisor=True)`` as 1 over the whole rate in µs,
    # as the fit has always computed it (its pinned coefficients depend on that rounding).
    us_per_mac: np.ndarray
    mac_divisor: np.ndarray
    us_per_byte: np.ndarray  # [memory level]: cache, last-level cache, DRAM
    gemm_k0: float  # short reductions (K) run at K / (K + gemm_k0) of the rate
    gemm_s0: float  # few output positions (S) run at S / (S + gemm_s0) of the rate
    memory_overlap: float  # share of the shorter of compute and memory added to the longer
    kernel_overhead_us: float
    step_overhead_us: float
    elementwise_overhead_us: float
    view_overhead_us: float
    call_overhead_us: float
    out_ns: np.ndarray  # [dtype]: per output element of a kernel (epilogue, output layout)
    slow_pool_ns: float  # per output element of a uint8 NCHW pool
    plain_pool_ns: float  # per output element of a float pool in the plain layout
    math_ns: float  # per output element of an op heavy in arithmetic (GELU, softmax, layer norm)
    convert_us_per_byte: float  # per conversion byte, beyond the conversion's memory traffic
    reorder_us_per_element: float
    mac_pj: np.ndarray  # [dtype]
    rf_pj_per_byte: float
    buffer_pj_per_byte: float
    dram_pj_per_byte: float

    @classmethod
    def of(cls, t: Target, rate_as_divisor: bool = False) -> "Coefficients":
        rate = np.array([[t.peak_gmacs[d] * t.efficiency[c]
                          * (t.int8_efficiency * t.int8_class_efficiency.get(c, 1.0) if d == "int8" else 1.0)
                          for c in KERNEL_CLASSES] for d in DTYPES])
        plain = np.array([[1.0] * len(KERNEL_CLASSES), [t.plain_efficiency.get(c, 1.0) for c in KERNEL_CLASSES]])
        if rate_as_divisor:
            us_per_mac = np.ones_like(rate)
            mac_divisor = rate[:, :, None] * plain.T[None, :, :] * 1e3
        else:
            us_per_mac = 1.0 / (rate * 1e3)
            mac_divisor = np.broadcast_to(plain.T[None, :, :], (len(DTYPES), len(KERNEL_CLASSES), 2))
        us_per_dram_byte = 1.0 / (t.dram_gbs * 1e3)
        us_per_llc_byte = 1.0 / (t.llc_gbs * 1e3) if t.llc_bytes and t.llc_gbs else us_per_dram_byte
        e = t.energy_pj
        return cls(
            us_per_mac=us_per_mac, mac_divisor=mac_divisor,
            us_per_byte=np.array([1.0 / (t.cache_gbs * 1e3), us_per_llc_byte, us_per_dram_byte]),
            gemm_k0=t.gemm_k0, gemm_s0=t.gemm_s0, memory_overlap=t.memory_overlap,
            kernel_overhead_us=t.kernel_overhead_us,
            step_overhead_us=t.step_overhead_us,
            elementwise_overhead_us=t.elementwise_overhead_us,
            view_overhead_us=t.view_overhead_us or t.elementwise_overhead_us, call_overhead_us=t.call_overhead_us,
            out_ns=np.array([t.int8_out_ns if d == "int8" else t.out_ns for d in DTYPES]),
            slow_pool_ns=t.int8_pool_ns, plain_pool_ns=t.plain_pool_ns, math_ns=t.math_ns,
            convert_us_per_byte=t.convert_ns / (CONVERSION_BYTES_PER_ELEMENT * 1e3),
            reorder_us_per_element=t.reorder_ns / 1e3,
            mac_pj=np.array([e[f"mac_{d}"] for d in DTYPES]), rf_pj_per_byte=e["rf_byte"],
            buffer_pj_per_byte=e["buffer_byte"], dram_pj_per_byte=e["dram_byte"])


_CACHE: dict[int, tuple[Target, Coefficients]] = {}


def coefficients(t: Target) -> Coefficients:
    """``Coefficients.of(t)``, kept for the targets ``predict`` sees again and again."""
    hit = _CACHE.get(id(t))
    if hit is None or hit[0] is not t:
        if len(_CACHE) > 64:
            _CACHE.clear()
        hit = (t, Coefficients.of(t))
        _CACHE[id(t)] = hit
    return hit[1]


# A length so large that its penalty vanishes (finite: the pinned fit computed with this value).
_NO_PENALTY = 1e12
_KERNEL_FIELDS = ("padded_macs", "macs", "bytes_moved", "weight_bytes", "memory_level", "weight_level",
                  "rf_bits_per_mac", "conversion_bytes", "conversions", "reordered_elements", "reorders",
                  "output_elements", "plain", "launches", "steps", "math_elements")


def _columns(records: Sequence[object], names: Sequence[str]) -> np.ndarray:
    return np.array([[getattr(r, n) for n in names] for r in records], dtype=float).reshape(len(records), len(names)).T


@dataclass(frozen=True)
class KernelArrays:
    """Kernels as one array per quantity (see ``kernels.Kernel``)."""

    kernel_class: np.ndarray  # index into KERNEL_CLASSES
    dtype: np.ndarray  # index into DTYPES
    padded_macs: np.ndarray
    macs: np.ndarray
    bytes_moved: np.ndarray
    weight_bytes: np.ndarray
    activation_bytes: np.ndarray
    memory_level: np.ndarray
    weight_level: np.ndarray
    rf_bits_per_mac: np.ndarray
    reduction_length: np.ndarray  # inf where the class has no short-reduction penalty (depthwise, linear)
    output_positions: np.ndarray  # inf where the class has no few-positions penalty (linear)
    conversion_bytes: np.ndarray
    conversions: np.ndarray
    reordered_elements: np.ndarray
    reorders: np.ndarray
    output_elements: np.ndarray
    plain: np.ndarray  # bool
    launches: np.ndarray  # dispatches: dependent kernels it stands for
    steps: np.ndarray  # synchronised dependent steps inside it
    math_elements: np.ndarray
    output_bytes: np.ndarray  # of activation_bytes: the output written
    output_level: np.ndarray

    @classmethod
    def of(cls, kernels: Sequence[Kernel]) -> "KernelArrays":
        (padded_macs, macs, bytes_moved, weight_bytes, level, weight_level, rf_bits, conversion_bytes, conversions,
         reordered, reorders, output_elements, plain, launches, steps, math_elements) = _columns(kernels, _KERNEL_FIELDS)
        return cls(
            kernel_class=np.array([KERNEL_CLASSES.index(k.kernel_class) for k in kernels], dtype=int),
            dtype=np.array([DTYPES.index(k.dtype) for k in kernels], dtype=int),
            padded_macs=padded_macs, macs=macs, bytes_moved=bytes_moved, weight_bytes=weight_bytes,
            activation_bytes=np.array([k.activation_bytes for k in kernels], dtype=float),
            memory_level=level.astype(int), weight_level=weight_level.astype(int), rf_bits_per_mac=rf_bits,
            reduction_length=np.array([k.reduction_length if k.kernel_class not in ("depthwise", "linear")
                                       else _NO_PENALTY for k in kernels], dtype=float),
            output_positions=np.array([k.output_positions if k.kernel_class != "linear" else _NO_PENALTY
                                       for k in kernels], dtype=float),
            conversion_bytes=conversion_bytes, conversions=conversions, reordered_elements=reordered,
            reorders=reorders, output_elements=output_elements, plain=plain.astype(bool), launches=launches,
            steps=steps, math_elements=math_elements,
            output_bytes=np.array([k.output_bytes for k in kernels], dtype=float),
            output_level=np.array([k.output_level for k in kernels], dtype=int))


_OP_FIELDS = ("bytes_moved", "traffic_bytes", "memory_level", "output_elements", "view", "conversions",
              "slow_pool_elements", "reordered_elements", "reorders", "conversion_bytes", "plain_pool_elements",
              "math_elements")


@dataclass(frozen=True)
class OpArrays:
    """Standalone ops as one array per quantity (see ``kernels.StandaloneOp``)."""

    bytes_moved: np.ndarray
    traffic_bytes: np.ndarray
    memory_level: np.ndarray
    output_elements: np.ndarray
    view: np.ndarray  # bool
    conversions: np.ndarray
    slow_pool_elements: np.ndarray
    reordered_elements: np.ndarray
    reorders: np.ndarray
    conversion_bytes: np.ndarray
    plain_pool_elements: np.ndarray
    math_elements: np.ndarray

    @classmethod
    def of(cls, ops: Sequence[StandaloneOp]) -> "OpArrays":
        cols = dict(zip(_OP_FIELDS, _columns(ops, _OP_FIELDS)))
        cols["memory_level"] = cols["memory_level"].astype(int)
        cols["view"] = cols["view"].astype(bool)
        return cls(**cols)


@dataclass(frozen=True)
class Latency:
    """Microseconds per kernel and per standalone op: the core (compute or traffic, plus dispatch), the
    int8 <-> float conversions and the layout reorders each pays for, and the conversions' traffic
    alone. The call overhead comes on top."""

    kernel_core: np.ndarray
    kernel_convert: np.ndarray
    kernel_reorder: np.ndarray
    kernel_conversion_traffic: np.ndarray
    op_core: np.ndarray
    op_convert: np.ndarray
    op_reorder: np.ndarray
    op_conversion_traffic: np.ndarray


def conversion_us(c: Coefficients, traffic_us: Any, conversions: Any) -> Any:
    """Conversions: their traffic plus a dispatch each (linear in the count: per kernel or in total)."""
    return traffic_us + conversions * c.elementwise_overhead_us


def reorder_us(c: Coefficients, reordered_elements: Any, reorders: Any) -> Any:
    """Layout reorders: a pass over the elements plus a dispatch each (linear: per kernel or in total)."""
    return reordered_elements * c.reorder_us_per_element + reorders * c.elementwise_overhead_us


def latency_us(c: Coefficients, k: KernelArrays, o: OpArrays) -> Latency:
    """The latency formula, over every kernel and standalone op at once."""
    slowdown = (1.0 + c.gemm_k0 / k.reduction_length) * (1.0 + c.gemm_s0 / k.output_positions)
    compute = (k.padded_macs * slowdown * c.us_per_mac[k.dtype, k.kernel_class]
               / c.mac_divisor[k.dtype, k.kernel_class, k.plain.astype(int)])
    memory = ((k.activation_bytes - k.output_bytes) * c.us_per_byte[k.memory_level]
              + k.output_bytes * c.us_per_byte[k.output_level] + k.weight_bytes * c.us_per_byte[k.weight_level])
    kernel_core = (np.maximum(compute, memory) + c.memory_overlap * np.minimum(compute, memory)
                   + k.launches * c.kernel_overhead_us + k.steps * c.step_overhead_us
                   + k.output_elements * c.out_ns[k.dtype] / 1e3 + k.math_elements * c.math_ns / 1e3)
    op_core = (o.traffic_bytes * c.us_per_byte[o.memory_level]
               + np.where(o.view, c.view_overhead_us, c.elementwise_overhead_us)
               + o.slow_pool_elements * c.slow_pool_ns / 1e3 + o.plain_pool_elements * c.plain_pool_ns / 1e3
               + o.math_elements * c.math_ns / 1e3)
    kernel_traffic = k.conversion_bytes * (c.us_per_byte[k.memory_level] + c.convert_us_per_byte)
    op_traffic = o.conversion_bytes * (c.us_per_byte[o.memory_level] + c.convert_us_per_byte)
    return Latency(
        kernel_core=kernel_core, kernel_convert=conversion_us(c, kernel_traffic, k.conversions),
        kernel_reorder=reorder_us(c, k.reordered_elements, k.reorders), kernel_conversion_traffic=kernel_traffic,
        op_core=op_core, op_convert=conversion_us(c, op_traffic, o.conversions),
        op_reorder=reorder_us(c, o.reordered_elements, o.reorders), op_conversion_traffic=op_traffic)


def energy_pj(c: Coefficients, k: KernelArrays, o: OpArrays) -> tuple[np.ndarray, np.ndarray]:
    """The energy formula: picojoules per kernel and per standalone op. Weights come from DRAM on every
    call; activations when they spill there."""
    kernel = (k.macs * (c.mac_pj[k.dtype] + k.rf_bits_per_mac / 8 * c.rf_pj_per_byte)
              + (k.bytes_moved + k.conversion_bytes) * c.buffer_pj_per_byte
              + np.where(k.memory_level == DRAM, k.bytes_moved, k.weight_bytes) * c.dram_pj_per_byte)
    op = (o.output_elements * ADD_PJ + o.bytes_moved * c.buffer_pj_per_byte
          + np.where(o.memory_level == DRAM, o.bytes_moved * c.dram_pj_per_byte, 0.0))
    return kernel, op
