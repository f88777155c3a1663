"""The state of fusing one CostTable on one target: what ``fusion``'s rules read and change.

``Fuser`` walks a table's rows in order; each rule (``fusion.FUSION_RULES``) opens a kernel draft, joins
a row to one, or adds a standalone op draft, and records the dtype and layout of the row's output and
the conversion and reorder passes it pays for. ``Fuser.structure`` turns the drafts into the frozen
records of ``kernels``.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from autocompress.hwmodels.kernels import (CACHE, CONVERSION_BYTES_PER_ELEMENT, DRAM, LAST_LEVEL_CACHE, Kernel,
                                          StandaloneOp, Structure)
from autocompress.hwmodels.target import Target
from autocompress.space.costs import FLOAT_BITS, INT8_BITS, CostTable, LayerCost

HEAD_OPS = ("conv", "linear")  # the layers with weights that quantisation can put in int8
RUN_BITS = {"int8": INT8_BITS, "fp16": 16, "fp32": FLOAT_BITS}  # the width a kernel of each dtype reads and writes


def padding_factor(n: int, block: int) -> float:
    """How much rounding ``n`` channels up to whole blocks adds, as a factor."""
    return (-(-n // block) * block) / n if n > 0 else 1.0


@dataclass
class KernelDraft:
    """A kernel while rows are being fused into it; activation bytes are per sample."""

    kernel_class: str
    dtype: str
    padded_macs: float
    macs: int
    weight_bytes: float
    input_bytes: float
    output_bytes: float
    absorbed_add: bool
    rf_bits_per_mac: int
    reduction_length: int
    output_positions: int
    output_elements: int
    plain: bool
    epilogue: bool = True  # absorbs the BN, activations and residual add that follow (conv/linear)
    launches: int = 1  # dependent kernels it runs as, each dispatched (unfused attention, RNN layers)
    steps: int = 0  # dependent steps inside it, each synchronised (an RNN's time steps)
    reread_bytes: float = 0.0  # weights read again from cache, once per call whatever the batch (RNN steps)
    working_set: float = 0.0  # bytes whose level its traffic comes from (0: its whole traffic)
    bias_pass_bytes: float = 0.0  # per sample: a bias added in a pass of its own (in input_bytes, one launch)
    math_elements: int = 0  # per sample: attention's softmax, as ``Target.math_ns`` costs it


@dataclass
class Passes:
    """The conversion and reorder passes that one kernel or op pays for."""

    conversion_bytes: float = 0.0
    conversions: int = 0
    reordered_elements: float = 0.0
    reorders: int = 0


NO_PASSES = Passes()  # read only: for a kernel or op that pays for none

@dataclass
class OpDraft:
    name: str
    bytes_moved: float = 0.0
    output_elements: int = 0
    view: bool = False
    slow_pool_elements: int = 0
    plain_pool_elements: int = 0
    math_elements: int = 0
    working_set: float = 0.0  # bytes whose level its traffic comes from (0: its traffic): an embedding's table


class Fuser:
    """What the fusion rules read and change while walking a table's rows in order."""

    def __init__(self, table: CostTable, t: Target, batch: int) -> None:
        self.target, self.batch = t, batch
        self.block = max(1, t.channel_block)
        self.cache_bytes, self.llc_bytes = t.cache_bytes, max(t.llc_bytes, t.cache_bytes)
        self.layouts = t.block_fallback and self.block > 1
        self.dq_per_reader = t.dq_per_reader
        self.rows = list(table)
        self.by_name = {r.name: r for r in self.rows}
        self.n_consumers: dict[str, int] = {}
        self.consumers: dict[str, list[str]] = {}
        for r in self.rows:
            for src in r.inputs:
                self.n_consumers[src] = self.n_consumers.get(src, 0) + 1
                self.consumers.setdefault(src, []).append(r.name)
        # Bits each tensor is stored at as deployed: 8 when every reader is an int8 kernel, else the widest
        # width a reader runs at (a layer at 16-bit activations runs in float where there is no fast fp16).
        self.bits: dict[str, int] = {}
        for r in self.rows:
            for src in r.inputs:
                self.bits[src] = max(self.bits.get(src, 0), self.run_bits(r) if r.op in HEAD_OPS else FLOAT_BITS)
        # An int8 kernel's output stays int8 unless a conv/linear with wide activations reads it.
        self.wide_reads = {s for r in self.rows if r.op in HEAD_OPS and r.abits > INT8_BITS for s in r.inputs}
        self.int8_kernels = {r.name for r in self.rows
                             if r.op in HEAD_OPS and t.compute_dtype(r.wbits, r.abits) == "int8"}
        self.int8_inputs = {s for r in self.rows if r.name in self.int8_kernels for s in r.inputs}  # what they read
        self.int8_tensors: set[str] = set()  # tensors stored in int8
        self.nchw_int8: set[str] = set()  # int8 tensors ONNX Runtime keeps in NCHW (int8 concats, what pools them)
        self.blocked: set[str] = set()  # float tensors in the blocked layout
        self.channels: dict[str, int] = {}
        self.passes: dict[str, Passes] = {}
        self.converted: set[tuple[str, object]] = set()  # (tensor, True) quantised; (tensor, reader) dequantised
        self.reordered: set[tuple[str, bool]] = set()  # (tensor, to blocked) already reordered
        self.kernels: dict[str, KernelDraft] = {}
        self.kernel_of: dict[str, str] = {}
        self.ops: list[OpDraft] = []

    def level(self, nbytes: float) -> int:
        return CACHE if nbytes <= self.cache_bytes else (LAST_LEVEL_CACHE if nbytes <= self.llc_bytes else DRAM)

    def run_bits(self, r: LayerCost) -> int:
        """The activation width a conv/linear runs at on this target."""
        return RUN_BITS[self.target.compute_dtype(r.wbits, r.abits)]

    def stored_bytes(self, name: str) -> float:
        """Bytes per element of a tensor as deployed."""
        if name in self.int8_tensors and name not in self.wide_reads:
            return 1.0
        return self.bits.get(name, FLOAT_BITS) / 8

    def windowed_pool(self, r: LayerCost) -> bool:
        """A pool with a window (not a global one)."""
        src = self.by_name.get(r.inputs[0]) if r.inputs else None
        return src is not None and 0 < src.out_numel <= 16 * r.out_numel

    def all_int8(self, r: LayerCost) -> bool:
        return bool(r.inputs) and all(s in self.int8_tensors for s in r.inputs)

    def passes_of(self, consumer: str) -> Passes:
        p = self.passes.get(consumer)
        if p is None:
            p = self.passes[consumer] = Passes()
        return p

    def convert(self, consumer: str, src: str, to_int8: bool) -> None:
        """One QuantizeLinear per float tensor that int8 kernels read. The quantiser puts the Q/DQ pair on
        the tensor for all its readers, and ONNX Runtime gives each float reader its own DequantizeLinear,
        so a float reader of an int8 or quantised tensor pays one pass of its own."""
        if src not in self.by_name:
            return
        if to_int8:
            if src in self.int8_tensors or (src, True) in self.converted:
                return
            self.converted.add((src, True))
        else:
            quantised = src in self.int8_tensors or (self.dq_per_reader and src in self.int8_inputs)
            if not quantised or (src, consumer) in self.converted:
                return
            self.converted.add((src, consumer))
        p = self.passes_of(consumer)
        p.conversion_bytes += self.by_name[src].out_numel * CONVERSION_BYTES_PER_ELEMENT * self.batch
        p.conversions += 1

    def relayout(self, consumer: str, src: str, want_blocked: bool) -> None:
        """A reorder when ``consumer`` reads ``src`` in the other layout (int8 tensors are plain)."""
        if (not self.layouts or src not in self.by_name or (src in self.blocked) == want_blocked
                or (src, want_blocked) in self.reordered):
            return
        self.reordered.add((src, want_blocked))
        p = self.passes_of(consumer)
        p.reordered_elements += self.by_name[src].out_numel * self.batch
        p.reorders += 1

    def follow(self, name: str, head: str) -> None:
        """``name`` is fused into ``head``'s kernel: its output has the kernel's dtype and layout."""
        self.kernel_of[name] = head
        if self.kernels[head].dtype == "int8":
            self.int8_tensors.add(name)
        elif head in self.blocked:
            self.blocked.add(name)

    def structure(self) -> Structure:
        batch = self.batch
        ops = []
        for d in self.ops:
            p = self.passes.get(d.name, NO_PASSES)
            nbytes = d.bytes_moved + p.conversion_bytes
            ops.append(StandaloneOp(d.name, nbytes, self.level(max(nbytes, d.working_set)), d.output_elements, d.view,
                                    int(p.conversions), d.slow_pool_elements, p.reordered_elements,
                                    int(p.reorders), p.conversion_bytes, d.plain_pool_elements, d.math_elements))
        weight_bytes = sum(k.weight_bytes for k in self.kernels.values())
        model_weight_level = self.level(weight_bytes) if self.target.model_weights_level else CACHE
        call_bytes = weight_bytes + sum(k.output_bytes for k in self.kernels.values()) * batch
        output_floor = self.level(call_bytes) if self.target.cold_outputs else CACHE
        kernels = []
        for head, k in self.kernels.items():
            nbytes = k.weight_bytes + (k.input_bytes + k.output_bytes) * batch + k.reread_bytes
            # A matrix-vector product (one row) streams its weights once, which prefetch may serve at cache speed.
            gemv = k.kernel_class == "linear" and k.output_positions * batch == 1 and self.target.gemv_from_cache
            lvl = CACHE if gemv else self.level(k.working_set or nbytes)
            p = self.passes.get(head, NO_PASSES)
            kernels.append(Kernel(head, k.kernel_class, k.dtype, k.padded_macs * batch, k.macs * batch, nbytes, lvl,
                                  k.rf_bits_per_mac, k.weight_bytes, k.reduction_length, k.output_positions * batch,
                                  p.conversion_bytes, int(p.conversions), p.reordered_elements, int(p.reorders),
                                  k.output_elements * batch, k.plain, max(lvl, model_weight_level), k.launches,
                                  k.steps, k.math_elements * batch, k.output_bytes * batch, max(lvl, output_floor)))
        return Structure(tuple(kernels), tuple(ops), MappingProxyType(self.kernel_of))

