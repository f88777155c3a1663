"""Latency, energy and memory of a CostTable on a target, without building the model.

Kernels are formed as runtimes fuse them: a conv/linear absorbs the BN and
activations that follow it and one residual add (whose other input is read as
extra traffic), as long as each intermediate has no other consumer. A kernel
takes ``max(compute, memory) + overhead`` (a roofline plus per-kernel cost);
an op that is not fused pays its memory traffic plus an elementwise overhead.
See docs/hwmodels.md for the equations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from autocompress.hwmodels.target import Target
from autocompress.hwmodels.targets import get_target
from autocompress.space.costs import FLOAT_BITS, CostTable

FUSABLE = ("bn", "act")
FREE_OPS = ("input", "dropout", "getitem", "output", "const")
VIEW_TARGETS = ("view", "reshape", "flatten")  # reshapes that are views: dispatch cost only


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
                "energy_mj": self.energy_mj, "weight_bytes": self.weight_bytes,
                "peak_activation_bytes": self.peak_activation_bytes,
                "layers": [{"name": l.name, "op": l.op, "latency_ms": l.latency_ms, "energy_mj": l.energy_mj,
                            "fused_into": l.fused_into} for l in self.layers]}


class _Consts:
    """Per-target numbers in the units the row loop uses (microseconds, bytes, picojoules)."""

    def __init__(self, t: Target) -> None:
        self.inv_mac: dict[tuple[str, str], float] = {}
        for dtype in ("fp32", "fp16", "int8"):
            for cls, eff in t.efficiency.items():
                extra = t.int8_efficiency * t.int8_class_efficiency.get(cls, 1.0) if dtype == "int8" else 1.0
                self.inv_mac[(dtype, cls)] = 1.0 / (t.peak_gmacs[dtype] * eff * extra * 1e3)
        inv_dram = 1.0 / (t.dram_gbs * 1e3)
        inv_llc = 1.0 / (t.llc_gbs * 1e3) if t.llc_bytes and t.llc_gbs else inv_dram
        self.inv_mem = (1.0 / (t.cache_gbs * 1e3), inv_llc, inv_dram)
        self.k0, self.s0 = t.gemm_k0, t.gemm_s0
        self.qpool_us = t.int8_pool_ns / 1e3
        self.kov, self.eov, self.call = t.kernel_overhead_us, t.elementwise_overhead_us, t.call_overhead_us
        self.block = max(1, t.channel_block)
        e = t.energy_pj
        self.e_mac = {"fp32": e["mac_fp32"], "fp16": e["mac_fp16"], "int8": e["mac_int8"]}
        self.e_rf, self.e_buf, self.e_dram = e["rf_byte"], e["buffer_byte"], e["dram_byte"]
        self.e_add = 0.9  # one fp32 add (Horowitz) per elementwise output


_CONSTS: dict[int, tuple[Target, _Consts]] = {}


def _consts(t: Target) -> _Consts:
    hit = _CONSTS.get(id(t))
    if hit is None or hit[0] is not t:
        if len(_CONSTS) > 64:
            _CONSTS.clear()
        hit = (t, _Consts(t))
        _CONSTS[id(t)] = hit
    return hit[1]


def kernel_class(op: str, in_ch: int, groups: int, kernel: tuple[int, int]) -> str:
    if op == "linear":
        return "linear"
    if groups > 1:
        return "depthwise" if groups == in_ch else "grouped"
    return "pointwise" if kernel[0] * kernel[1] == 1 else "conv"


def _padded(n: int, block: int) -> float:
    return (-(-n // block) * block) / n if n > 0 else 1.0


@dataclass
class Structure:
    """The kernels a runtime would run for a table: target-independent except for dtypes and blocking.

    ``kernels``: (head, class, dtype, padded MACs, MACs, bytes moved, memory level, RF bits per MAC,
    weight bytes, reduction length K, output positions S, int8<->float conversion bytes, conversions).
    ``elems``: (name, bytes moved incl. conversions, memory level, output elements, is a view,
    conversions, input elements of an int8 windowed pool). Bytes, MACs and S include the batch; memory level 0 is the cache, 1 the last-level
    cache, 2 DRAM.
    """

    kernels: list[tuple[str, str, str, float, int, float, int, int, float, int, int, float, int]]
    elems: list[tuple[str, float, int, int, bool, int, int]]
    chain: dict[str, str]


def structure(table: CostTable, t: Target, batch: int = 1) -> Structure:
    """Fuse the table's rows into kernels and standalone ops, as the runtime would."""
    block = max(1, t.channel_block)
    l1, l2 = t.cache_bytes, max(t.llc_bytes, t.cache_bytes)

    def level(nbytes: float) -> int:
        return 0 if nbytes <= l1 else (1 if nbytes <= l2 else 2)

    rows = list(table)
    by_name = {r.name: r for r in rows}
    n_cons: dict[str, int] = {}
    for r in rows:
        for src in r.inputs:
            n_cons[src] = n_cons.get(src, 0) + 1
    bits = table.activation_bits()
    # Runtimes keep an int8 kernel's output in int8 unless a float conv/linear reads it
    # (quantised residual adds and pools run on int8 tensors too).
    float_read = {s for r in rows if r.op in ("conv", "linear") and r.abits > 8 for s in r.inputs}
    int8_out: set[str] = set()
    # A model with any int8 layer is deployed as a QDQ graph: its pools, concats, adds and splits are
    # quantised too and run on int8 tensors, converting wherever a float layer feeds or reads them.
    qdq = t.fast_int8 and any(r.op in ("conv", "linear") and r.wbits <= 8 and r.abits <= 8 for r in rows)

    def stored(name: str) -> float:
        if name in int8_out and name not in float_read:
            return 1.0
        return bits.get(name, FLOAT_BITS) / 8

    # An int8 kernel reading a float tensor needs a QuantizeLinear, a float op reading an int8
    # tensor a DequantizeLinear: each one pass over the tensor (4 + 1 bytes per element) plus dispatch.
    cvt: dict[str, list[float]] = {}
    converted: set[tuple[str, bool]] = set()

    def convert(consumer: str, src: str, to_int8: bool) -> None:
        if (src in int8_out) == to_int8 or (src, to_int8) in converted or src not in by_name:
            return
        converted.add((src, to_int8))
        c = cvt.setdefault(consumer, [0.0, 0])
        c[0] += by_name[src].out_numel * 5 * batch
        c[1] += 1

    # head -> [class, dtype, padded macs, macs, w_bytes, in_bytes, out_bytes, has_add, rf_bits, K, S]
    kernels: dict[str, list[Any]] = {}
    chain: dict[str, str] = {}
    elems: list[tuple[str, float, int, int, bool, int, int]] = []
    for r in rows:
        op = r.op
        if op in ("conv", "linear"):
            dtype = t.compute_dtype(r.wbits, r.abits)
            cls = kernel_class(op, r.in_ch, r.groups, r.kernel)
            kk = r.kernel[0] * r.kernel[1]
            if cls == "depthwise":
                pad, k_len = _padded(r.out_ch, block), kk
            else:
                icg, ocg = r.in_ch // r.groups, r.out_ch // r.groups
                # Inputs with fewer channels than a block (an RGB stem) are read unblocked.
                pad = _padded(ocg, block) * (_padded(icg, block) if icg >= block else 1.0)
                k_len = icg * kk
            abits = min(r.abits, FLOAT_BITS)
            for src in r.inputs:
                convert(r.name, src, dtype == "int8")
            if dtype == "int8":
                int8_out.add(r.name)
            kernels[r.name] = [cls, dtype, r.macs * pad, r.macs, r.weight_bytes, r.in_numel * abits / 8,
                               r.out_numel * stored(r.name), False, r.wbits + 3 * abits, k_len, r.spatial]
            chain[r.name] = r.name
            continue
        if op in FREE_OPS:
            if r.inputs and all(s in int8_out for s in r.inputs):
                int8_out.add(r.name)
            continue
        if op in FUSABLE and len(r.inputs) == 1:
            src = r.inputs[0]
            head = chain.get(src)
            if head is not None and n_cons.get(src, 0) == 1:
                chain[r.name] = head
                if kernels[head][1] == "int8":
                    int8_out.add(r.name)
                kernels[head][6] = r.out_numel * stored(r.name)
                continue
        if op == "add" and len(r.inputs) == 2:
            fusable = [s for s in r.inputs if s in chain and n_cons.get(s, 0) == 1 and not kernels[chain[s]][7]]
            if fusable:
                src = fusable[-1]
                other = r.inputs[0] if r.inputs[1] == src else r.inputs[1]
                head = chain[src]
                k = kernels[head]
                o = by_name.get(other)
                convert(head, other, k[1] == "int8")
                k[5] += o.out_numel * stored(other) if o is not None else 0
                if k[1] == "int8":
                    int8_out.add(r.name)
                k[6] = r.out_numel * stored(r.name)
                k[7] = True
                chain[r.name] = head
                continue
        # A standalone op: memory traffic plus dispatch.
        all_int8 = bool(r.inputs) and all(s in int8_out for s in r.inputs)
        if op == "reshape" and r.target in VIEW_TARGETS:
            if all_int8:
                int8_out.add(r.name)
            elems.append((r.name, 0.0, 0, 0, True, 0, 0))
            continue
        if qdq and op != "other":
            for src in r.inputs:
                convert(r.name, src, True)
            int8_out.add(r.name)
        elif all_int8:
            int8_out.add(r.name)  # pools, concats and reshapes of int8 tensors stay int8
        else:
            for src in r.inputs:
                convert(r.name, src, False)
        nbytes = r.out_numel * stored(r.name)
        in_elems = 0
        for src in r.inputs:
            o = by_name.get(src)
            if o is not None:
                nbytes += o.out_numel * stored(src)
                in_elems += o.out_numel
        c = cvt.get(r.name, (0.0, 0))
        nbytes = nbytes * batch + c[0]
        # Windowed pools (not global ones) on int8 tensors run a slower, unblocked kernel.
        qpool = in_elems * batch if qdq and op == "pool" and 0 < in_elems <= 16 * r.out_numel else 0
        elems.append((r.name, nbytes, level(nbytes), r.out_numel * batch, False, int(c[1]), qpool))
    out = []
    for head, (cls, dtype, macs_eff, macs, wb, ib, ob, _, rf_bits, k_len, spatial) in kernels.items():
        nbytes = wb + (ib + ob) * batch
        # A matrix-vector product streams its weights once, which hardware prefetch serves at cache speed.
        lvl = 0 if cls == "linear" and batch == 1 else level(nbytes)
        c = cvt.get(head, (0.0, 0))
        out.append((head, cls, dtype, macs_eff * batch, macs * batch, nbytes, lvl, rf_bits, wb,
                    k_len, spatial * batch, c[0], int(c[1])))
    return Structure(out, elems, chain)


def predict(table: CostTable, target: str | Target, batch: int = 1) -> Prediction:
    """Predict one call of the model described by ``table`` at ``batch`` on ``target``."""
    t = get_target(target)
    c = _consts(t)
    st = structure(table, t, batch)
    lat: dict[str, float] = {}
    eng: dict[str, float] = {}
    inv_mem, k0, s0 = c.inv_mem, c.k0, c.s0
    for head, cls, dtype, macs_eff, macs, nbytes, lvl, rf_bits, wb, k_len, spatial, cv_b, cv_n in st.kernels:
        mem_us = nbytes * inv_mem[lvl]
        slow = 1.0 if cls == "linear" else (1.0 + s0 / spatial) * (1.0 if cls == "depthwise" else 1.0 + k0 / k_len)
        comp_us = macs_eff * slow * c.inv_mac[(dtype, cls)]
        lat[head] = (comp_us if comp_us > mem_us else mem_us) + c.kov + cv_b * inv_mem[lvl] + cv_n * c.eov
        dram = nbytes if lvl == 2 else wb  # weights come from DRAM each call; activations when they spill
        eng[head] = (macs * (c.e_mac[dtype] + rf_bits / 8 * c.e_rf) + (nbytes + cv_b) * c.e_buf
                     + dram * c.e_dram)
    for name, nbytes, lvl, n_out, is_view, cv_n, qpool in st.elems:
        lat[name] = nbytes * inv_mem[lvl] + (1 + cv_n) * c.eov + qpool * c.qpool_us
        eng[name] = n_out * c.e_add + nbytes * c.e_buf + (nbytes * c.e_dram if lvl == 2 else 0.0)

    layers = []
    total_us = c.call
    total_pj = 0.0
    chain = st.chain
    for r in table:
        l_us, e_pj = lat.get(r.name, 0.0), eng.get(r.name, 0.0)
        total_us += l_us
        total_pj += e_pj
        head = chain.get(r.name, "")
        layers.append(LayerPrediction(r.name, r.op, l_us / 1e3, e_pj * 1e-9, head if head != r.name else ""))
    return Prediction(t.name, batch, total_us / 1e3, total_pj * 1e-9, int(sum(r.weight_bytes for r in table)),
                      table.peak_activation_bytes() * batch, layers)
