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
# The parts of a model's latency, as a runtime profile splits it (``measure.profile_onnx``):
# float conv kernels, int8 conv kernels, linear layers, pools, concats/splits, layout reorders,
# int8 <-> float conversions, unfused elementwise ops, and the rest (reshapes, shape arithmetic).
PARTS = ("conv", "qconv", "linear", "pool", "concat", "reorder", "convert", "elementwise", "other")
_ELEM_PART = {"pool": "pool", "concat": "concat", "split": "concat", "add": "elementwise", "act": "elementwise",
              "bn": "elementwise", "output": "reorder"}


def kernel_part(cls: str, dtype: str) -> str:
    return "linear" if cls == "linear" else ("qconv" if dtype == "int8" else "conv")


def elem_part(op: str) -> str:
    return _ELEM_PART.get(op, "other")
FREE_OPS = ("input", "dropout", "getitem", "output", "const")
CLIP_FNS = ("ReLU6", "relu6")  # activations (graph op "act") that export as Clip
VIEW_TARGETS = ("view", "reshape", "flatten")  # reshapes that are views: dispatch cost only
SHAPE_TARGETS = ("size", "dim")  # ops that read a tensor's shape only


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
        self.ppool_us = t.plain_pool_ns / 1e3
        self.plain_eff = dict(t.plain_efficiency)
        self.kov, self.eov, self.call = t.kernel_overhead_us, t.elementwise_overhead_us, t.call_overhead_us
        self.block = max(1, t.channel_block)
        self.cvt_us = t.convert_ns / 5e3  # per conversion byte (5 bytes per element)
        self.ro_us = t.reorder_ns / 1e3
        self.vov = t.view_overhead_us or t.elementwise_overhead_us
        self.fout, self.i8out = t.out_ns / 1e3, t.int8_out_ns / 1e3
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
    """The kernels a runtime would run for a table: target-independent except for dtypes and layouts.

    ``kernels``: (head, class, dtype, padded MACs, MACs, bytes moved, memory level, RF bits per MAC,
    weight bytes, reduction length K, output positions S, int8<->float conversion bytes, conversions,
    reordered elements, reorders, output elements, runs a plain (unblocked) kernel, memory level of
    the weights).
    ``elems``: (name, bytes moved incl. conversions, memory level, output elements, is a view,
    conversions, output elements of a slow int8 windowed pool, reordered elements, reorders, conversion
    bytes, output elements of a windowed float pool in the plain layout).
    Bytes, MACs, S and elements include the batch; memory level 0 is the cache, 1 the last-level
    cache, 2 DRAM.
    """

    kernels: list[tuple[str, str, str, float, int, float, int, int, float, int, int, float, int, float, int, int, bool,
                        int]]
    elems: list[tuple[str, float, int, int, bool, int, int, float, int, float, int]]
    chain: dict[str, str]


def structure(table: CostTable, t: Target, batch: int = 1) -> Structure:
    """Fuse the table's rows into kernels and standalone ops, as the runtime would.

    A model is deployed as a QDQ graph: a conv/linear at <= 8 bits runs in int8 (where the target
    has fast int8), and an add, pool or concat runs on int8 tensors when every tensor it reads is
    int8. Each int8 <-> float edge is a QuantizeLinear or DequantizeLinear. On targets with
    ``block_fallback`` float tensors are tracked in blocked or plain layout, and each change is a
    reorder pass.
    """
    block = max(1, t.channel_block)
    l1, l2 = t.cache_bytes, max(t.llc_bytes, t.cache_bytes)
    layouts = t.block_fallback and block > 1

    def level(nbytes: float) -> int:
        return 0 if nbytes <= l1 else (1 if nbytes <= l2 else 2)

    rows = list(table)
    by_name = {r.name: r for r in rows}
    n_cons: dict[str, int] = {}
    consumers: dict[str, list[str]] = {}
    for r in rows:
        for src in r.inputs:
            n_cons[src] = n_cons.get(src, 0) + 1
            consumers.setdefault(src, []).append(r.name)

    def windowed_pool(r: Any) -> bool:  # a pool with a window (not a global one)
        src = by_name.get(r.inputs[0]) if r.inputs else None
        return src is not None and 0 < src.out_numel <= 16 * r.out_numel
    def run_bits(r: Any) -> int:  # the activation width a conv/linear runs at on this target
        dtype = t.compute_dtype(r.wbits, r.abits)
        return 8 if dtype == "int8" else (16 if dtype == "fp16" else FLOAT_BITS)

    # Bits each tensor is stored at as deployed: 8 when every reader is an int8 kernel, else the widest
    # width a reader runs at (a layer at 16-bit activations runs in float where there is no fast fp16).
    bits: dict[str, int] = {}
    for r in rows:
        for src in r.inputs:
            bits[src] = max(bits.get(src, 0), run_bits(r) if r.op in ("conv", "linear") else FLOAT_BITS)
    # Runtimes keep an int8 kernel's output in int8 unless a float conv/linear reads it
    # (quantised residual adds and pools run on int8 tensors too).
    float_read = {s for r in rows if r.op in ("conv", "linear") and r.abits > 8 for s in r.inputs}
    int8_out: set[str] = set()
    nchw_int8: set[str] = set()  # int8 tensors that ONNX Runtime keeps in NCHW (int8 concats and what pools them)
    blocked: set[str] = set()  # float tensors in the blocked layout

    def stored(name: str) -> float:
        if name in int8_out and name not in float_read:
            return 1.0
        return bits.get(name, FLOAT_BITS) / 8

    # An int8 kernel reading a float tensor needs a QuantizeLinear, a float op reading an int8
    # tensor a DequantizeLinear: each one pass over the tensor (4 + 1 bytes per element) plus dispatch.
    # [conversion bytes, conversions, reordered elements, reorders] per consumer
    cvt: dict[str, list[float]] = {}
    converted: set[tuple[str, Any]] = set()
    reordered: set[tuple[str, bool]] = set()

    def convert(consumer: str, src: str, to_int8: bool) -> None:
        """One QuantizeLinear per float tensor that int8 kernels read. The quantiser puts the Q/DQ pair on
        the tensor for all its readers, and ONNX Runtime gives each float reader its own DequantizeLinear,
        so a float reader of an int8 or quantised tensor pays one pass of its own."""
        if src not in by_name:
            return
        if to_int8:
            if src in int8_out or (src, True) in converted:
                return
            converted.add((src, True))
        else:
            if not (src in int8_out or (quantised_reads and src in int8_read)) or (src, consumer) in converted:
                return
            converted.add((src, consumer))
        c = cvt.setdefault(consumer, [0.0, 0, 0.0, 0])
        c[0] += by_name[src].out_numel * 5 * batch
        c[1] += 1

    def layout(consumer: str, src: str, want_blocked: bool) -> None:
        """A reorder when ``consumer`` reads ``src`` in the other layout (int8 tensors are plain)."""
        if not layouts or src not in by_name or ((src in blocked) == want_blocked) or (src, want_blocked) in reordered:
            return
        reordered.add((src, want_blocked))
        c = cvt.setdefault(consumer, [0.0, 0, 0.0, 0])
        c[2] += by_name[src].out_numel * batch
        c[3] += 1

    # Float dense and depthwise convs run blocked (an output width that is not a multiple of the block is
    # padded) when their input channels are a multiple of ``channel_align``, else a plain kernel; grouped
    # convs, linear layers and int8 kernels (NHWC in ONNX Runtime) read and write plain tensors. Pools and
    # concats stay blocked only on whole blocks of channels.
    chans: dict[str, int] = {}
    int8_kernels = {r.name for r in rows if r.op in ("conv", "linear") and t.compute_dtype(r.wbits, r.abits) == "int8"}
    int8_read = {s for r in rows if r.name in int8_kernels for s in r.inputs}
    quantised_reads = t.dq_per_reader

    # head -> [class, dtype, padded macs, macs, w_bytes, in_bytes, out_bytes, has_add, rf_bits, K, S, out, plain]
    kernels: dict[str, list[Any]] = {}
    chain: dict[str, str] = {}
    elems_raw: list[tuple[str, float, int, bool, int, int]] = []
    for r in rows:
        op = r.op
        if op in ("conv", "linear"):
            dtype = t.compute_dtype(r.wbits, r.abits)
            cls = kernel_class(op, r.in_ch, r.groups, r.kernel)
            kk = r.kernel[0] * r.kernel[1]
            is_blocked = layouts and dtype != "int8" and cls in ("conv", "pointwise", "depthwise")
            plain = False
            if is_blocked and t.channel_align > 1:
                a = t.channel_align
                is_blocked = r.in_ch % a == 0 or (cls != "depthwise" and r.in_ch < block)
                plain = not is_blocked
            chans[r.name] = r.out_ch
            if cls == "depthwise":
                pad, k_len = _padded(r.out_ch, block), kk
            else:
                icg, ocg = r.in_ch // r.groups, r.out_ch // r.groups
                # Inputs with fewer channels than a block (an RGB stem) are read unblocked.
                pad = _padded(ocg, block) * (_padded(icg, block) if icg >= block else 1.0)
                k_len = icg * kk
            abits = run_bits(r)
            for src in r.inputs:
                convert(r.name, src, dtype == "int8")
                if not (is_blocked and r.in_ch < block):
                    layout(r.name, src, is_blocked)
            if dtype == "int8":
                int8_out.add(r.name)
            elif is_blocked:
                blocked.add(r.name)
            if plain:
                pad = 1.0
            # A kernel reads its weights as it runs: a layer whose weights are at <= 8 bits but that runs in
            # float (its activations are wider) is deployed with float weights.
            wbits = r.wbits if dtype == "int8" else (16 if dtype == "fp16" else FLOAT_BITS)
            w_bytes = r.weight_bytes + r.weight_numel * (wbits - r.wbits) / 8
            kernels[r.name] = [cls, dtype, r.macs * pad, r.macs, w_bytes, r.in_numel * abits / 8,
                               r.out_numel * stored(r.name), False, r.wbits + 3 * abits, k_len, r.spatial, r.out_numel,
                               plain]
            chain[r.name] = r.name
            continue
        if r.inputs:
            chans[r.name] = (sum(chans.get(s, 0) for s in r.inputs) if op == "concat"
                             else chans.get(r.inputs[0], 0))
        if op in FREE_OPS:
            if r.inputs and all(s in int8_out for s in r.inputs):
                int8_out.add(r.name)
                if any(s in nchw_int8 for s in r.inputs):
                    nchw_int8.add(r.name)
            elif r.inputs and all(s in blocked for s in r.inputs) and op != "output":
                blocked.add(r.name)
            elif op == "output":  # the graph output leaves in the plain layout: one reorder, its own dispatch
                for src in r.inputs:
                    layout(r.name, src, False)
                if r.name in cvt:
                    cvt[r.name][3] -= 1
                    elems_raw.append((r.name, 0.0, 0, False, 0, 0))
            continue
        # ONNX Runtime folds a Clip (ReLU6) into an int8 kernel only when int8 kernels read its output: for a
        # float reader it dequantises the kernel's output and clips it in float (a pass of its own); between
        # int8 kernels it requantises (a DequantizeLinear and a QuantizeLinear).
        float_clip = False
        if op == "act" and quantised_reads and r.fn in CLIP_FNS and len(r.inputs) == 1:
            head = chain.get(r.inputs[0])
            if head is not None and kernels[head][1] == "int8":
                readers = consumers.get(r.name, [])
                float_clip = any(c not in int8_kernels for c in readers)
                if readers and not float_clip:
                    c = cvt.setdefault(head, [0.0, 0, 0.0, 0])
                    c[0] += 2 * r.out_numel * 5 * batch
                    c[1] += 2
        if op in FUSABLE and len(r.inputs) == 1 and not float_clip:
            src = r.inputs[0]
            head = chain.get(src)
            if head is not None and n_cons.get(src, 0) == 1:
                chain[r.name] = head
                if kernels[head][1] == "int8":
                    int8_out.add(r.name)
                elif head in blocked:
                    blocked.add(r.name)
                kernels[head][6] = r.out_numel * stored(r.name)
                continue
        if op == "add" and len(r.inputs) == 2:
            # A kernel absorbs one residual add; int8 ones only where the target says so.
            fusable = [s for s in r.inputs if s in chain and n_cons.get(s, 0) == 1 and not kernels[chain[s]][7]
                       and (t.int8_fuses_add or kernels[chain[s]][1] != "int8")]
            if fusable:
                src = fusable[-1]
                other = r.inputs[0] if r.inputs[1] == src else r.inputs[1]
                head = chain[src]
                k = kernels[head]
                o = by_name.get(other)
                convert(head, other, k[1] == "int8")
                layout(head, other, head in blocked)
                k[5] += o.out_numel * stored(other) if o is not None else 0
                if k[1] == "int8":
                    int8_out.add(r.name)
                elif head in blocked:
                    blocked.add(r.name)
                k[6] = r.out_numel * stored(r.name)
                k[7] = True
                chain[r.name] = head
                continue
        # A standalone op: memory traffic plus dispatch. It runs on int8 tensors when every input is int8.
        all_int8 = bool(r.inputs) and all(s in int8_out for s in r.inputs) and not float_clip
        if op == "other" and r.target in SHAPE_TARGETS:  # reads only its input's shape: no conversion, no reorder
            elems_raw.append((r.name, 0.0, 0, False, 0, 0))
            continue
        if op == "reshape" and r.target in VIEW_TARGETS:
            if all_int8:
                int8_out.add(r.name)
            else:
                for src in r.inputs:
                    layout(r.name, src, False)
            elems_raw.append((r.name, 0.0, 0, True, 0, 0))
            continue
        # The slow uint8 pool (QDQ graphs): a windowed pool of a float tensor that is quantised, either because
        # another reader of it is an int8 kernel (the quantiser puts one Q/DQ pair on a tensor for all its
        # readers, and a max-pool of a quantised tensor is quantised too, whoever reads it) or because the
        # pool is its only reader and an int8 kernel reads the pool (ONNX Runtime then moves the
        # QuantizeLinear above the pool). It pools uint8 in the plain NCHW layout, a slow kernel. Else the
        # pool runs in float; between int8 kernels it runs the fast NHWC one.
        windowed = op == "pool" and windowed_pool(r)
        siblings = [c for c in consumers.get(r.inputs[0], ()) if c != r.name] if r.inputs else []
        slow_pool = (quantised_reads and not all_int8 and windowed
                     and (any(c in int8_kernels for c in siblings) or (not siblings and r.name in int8_read)))
        # ONNX Runtime runs int8 ops in NHWC where their input comes from an int8 kernel (NHWC), else in
        # NCHW: a windowed pool of an NCHW int8 tensor is the slow uint8 pool too. NCHW int8 tensors are the
        # slow pools' outputs, single-input int8 concats, and what reads an NCHW int8 tensor.
        nchw_in = quantised_reads and any(s in nchw_int8 for s in r.inputs)
        if all_int8 and windowed and nchw_in:
            slow_pool = True
        if quantised_reads and (slow_pool or (all_int8 and (nchw_in or (op == "concat" and len(r.inputs) == 1)))):
            nchw_int8.add(r.name)
        if all_int8:
            int8_out.add(r.name)  # pools, concats, adds and reshapes of int8 tensors stay int8
        elif slow_pool:
            for src in r.inputs:
                convert(r.name, src, True)
                layout(r.name, src, False)
            int8_out.add(r.name)
        else:
            for src in r.inputs:
                convert(r.name, src, False)
            # Pools, adds, concats and activations keep the blocked layout when every input has it.
            keep = op in ("pool", "add", "concat", "act", "bn") and bool(r.inputs) and all(s in blocked for s in r.inputs)
            whole = all(chans.get(s, 0) % block == 0 and chans.get(s, 0) > 0 for s in r.inputs)
            if op in ("pool", "concat"):
                keep = keep and whole
            # A windowed pool on whole blocks of channels runs blocked whatever its input's layout
            # (a plain input is reordered first), as convs do.
            if op == "pool" and layouts and whole and len(r.inputs) == 1 and windowed:
                keep = True
            if keep:
                blocked.add(r.name)
                for src in r.inputs:
                    layout(r.name, src, True)
            else:
                for src in r.inputs:
                    layout(r.name, src, False)
        nbytes = r.out_numel * stored(r.name)
        for src in r.inputs:
            o = by_name.get(src)
            if o is not None:
                nbytes += o.out_numel * stored(src)
        qpool = r.out_numel * batch if slow_pool else 0
        ppool = r.out_numel * batch if layouts and not all_int8 and windowed and r.name not in blocked and not qpool else 0
        elems_raw.append((r.name, nbytes * batch, r.out_numel * batch, False, qpool, ppool))
    elems = []
    for name, nbytes, n_out, is_view, qpool, ppool in elems_raw:
        c = cvt.get(name, (0.0, 0, 0.0, 0))
        nbytes += c[0]
        elems.append((name, nbytes, level(nbytes), n_out, is_view, int(c[1]), qpool, c[2], int(c[3]), c[0], ppool))
    out = []
    model_wlvl = level(sum(k[4] for k in kernels.values())) if t.model_weights_level else 0
    for head, (cls, dtype, macs_eff, macs, wb, ib, ob, _, rf_bits, k_len, spatial, n_out, plain) in kernels.items():
        nbytes = wb + (ib + ob) * batch
        # A matrix-vector product streams its weights once, which hardware prefetch may serve at cache speed.
        lvl = 0 if cls == "linear" and batch == 1 and t.gemv_from_cache else level(nbytes)
        c = cvt.get(head, (0.0, 0, 0.0, 0))
        out.append((head, cls, dtype, macs_eff * batch, macs * batch, nbytes, lvl, rf_bits, wb,
                    k_len, spatial * batch, c[0], int(c[1]), c[2], int(c[3]), n_out * batch, plain,
                    max(lvl, model_wlvl)))
    return Structure(out, elems, chain)


def predict(table: CostTable, target: str | Target, batch: int = 1) -> Prediction:
    """Predict one call of the model described by ``table`` at ``batch`` on ``target``."""
    t = get_target(target)
    c = _consts(t)
    st = structure(table, t, batch)
    lat: dict[str, float] = {}
    eng: dict[str, float] = {}
    inv_mem, k0, s0 = c.inv_mem, c.k0, c.s0
    cvt_us, ro_us = c.cvt_us, c.ro_us
    parts = dict.fromkeys(PARTS, 0.0)
    for (head, cls, dtype, macs_eff, macs, nbytes, lvl, rf_bits, wb, k_len, spatial, cv_b, cv_n, ro_e, ro_n,
         n_out, plain, wlvl) in st.kernels:
        mem_us = (nbytes - wb) * inv_mem[lvl] + wb * inv_mem[wlvl]
        slow = 1.0 if cls == "linear" else (1.0 + s0 / spatial) * (1.0 if cls == "depthwise" else 1.0 + k0 / k_len)
        comp_us = macs_eff * slow * c.inv_mac[(dtype, cls)] / (c.plain_eff.get(cls, 1.0) if plain else 1.0)
        core = (comp_us if comp_us > mem_us else mem_us) + c.kov + n_out * (c.i8out if dtype == "int8" else c.fout)
        cv = cv_b * (inv_mem[lvl] + cvt_us) + cv_n * c.eov
        ro = ro_e * ro_us + ro_n * c.eov
        lat[head] = core + cv + ro
        parts[kernel_part(cls, dtype)] += core
        parts["convert"] += cv
        parts["reorder"] += ro
        dram = nbytes if lvl == 2 else wb  # weights come from DRAM each call; activations when they spill
        eng[head] = (macs * (c.e_mac[dtype] + rf_bits / 8 * c.e_rf) + (nbytes + cv_b) * c.e_buf
                     + dram * c.e_dram)
    ops = {r.name: r.op for r in table}
    for name, nbytes, lvl, n_out, is_view, cv_n, qpool, ro_e, ro_n, cv_b, ppool in st.elems:
        core = (nbytes - cv_b) * inv_mem[lvl] + (c.vov if is_view else c.eov) + qpool * c.qpool_us + ppool * c.ppool_us
        cv = cv_b * (inv_mem[lvl] + cvt_us) + cv_n * c.eov
        ro = ro_e * ro_us + ro_n * c.eov
        lat[name] = core + cv + ro
        parts[elem_part(ops.get(name, ""))] += core
        parts["convert"] += cv
        parts["reorder"] += ro
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
                      table.peak_activation_bytes() * batch, layers, {k: v / 1e3 for k, v in parts.items()})
