"""Fusing a CostTable's rows into the kernels and standalone ops a runtime runs on a target.

A conv/linear heads a kernel and absorbs the BN and activations that follow it and one residual add
(whose other input is read as extra traffic), as long as each intermediate has no other consumer.
What is not absorbed runs as a standalone op. The model is deployed as a QDQ graph: a conv/linear that
``runs_int8`` runs in int8 (where the target has fast int8), and an add, pool or concat runs on int8
tensors when every tensor it reads is int8. Each int8 <-> float edge is a QuantizeLinear or
DequantizeLinear. On targets with ``block_fallback`` float tensors are blocked or plain, and each change
is a reorder pass. ``FUSION_RULES`` says, per op kind, what a row does; docs/hwmodels.md has the details.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable

from autocompress.hwmodels.kernels import (CACHE, CONVERSION_BYTES_PER_ELEMENT, DRAM, LAST_LEVEL_CACHE, Kernel,
                                          StandaloneOp, Structure, kernel_class)
from autocompress.hwmodels.target import Target
from autocompress.space.costs import FLOAT_BITS, INT8_BITS, CostTable, LayerCost

HEAD_OPS = ("conv", "linear")
FREE_OPS = ("input", "dropout", "getitem", "output", "const")
CLIP_FNS = ("ReLU6", "relu6")  # activations (graph op "act") that export as Clip
VIEW_TARGETS = ("view", "reshape", "flatten")  # reshapes that are views: dispatch cost only
SHAPE_TARGETS = ("size", "dim")  # ops that read a tensor's shape only
RUN_BITS = {"int8": INT8_BITS, "fp16": 16, "fp32": FLOAT_BITS}  # the width a kernel of each dtype reads and writes


def _padding_factor(n: int, block: int) -> float:
    """How much rounding ``n`` channels up to whole blocks adds, as a factor."""
    return (-(-n // block) * block) / n if n > 0 else 1.0


@dataclass
class _KernelDraft:
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


@dataclass
class _Passes:
    """The conversion and reorder passes that one kernel or op pays for."""

    conversion_bytes: float = 0.0
    conversions: int = 0
    reordered_elements: float = 0.0
    reorders: int = 0


_NO_PASSES = _Passes()  # read only: for a kernel or op that pays for none

@dataclass
class _OpDraft:
    name: str
    bytes_moved: float = 0.0
    output_elements: int = 0
    view: bool = False
    slow_pool_elements: int = 0
    plain_pool_elements: int = 0


class _Fuser:
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
        self.passes: dict[str, _Passes] = {}
        self.converted: set[tuple[str, object]] = set()  # (tensor, True) quantised; (tensor, reader) dequantised
        self.reordered: set[tuple[str, bool]] = set()  # (tensor, to blocked) already reordered
        self.kernels: dict[str, _KernelDraft] = {}
        self.kernel_of: dict[str, str] = {}
        self.ops: list[_OpDraft] = []

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

    def passes_of(self, consumer: str) -> _Passes:
        p = self.passes.get(consumer)
        if p is None:
            p = self.passes[consumer] = _Passes()
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
            p = self.passes.get(d.name, _NO_PASSES)
            nbytes = d.bytes_moved + p.conversion_bytes
            ops.append(StandaloneOp(d.name, nbytes, self.level(nbytes), d.output_elements, d.view,
                                    int(p.conversions), d.slow_pool_elements, p.reordered_elements,
                                    int(p.reorders), p.conversion_bytes, d.plain_pool_elements))
        model_weight_level = (self.level(sum(k.weight_bytes for k in self.kernels.values()))
                              if self.target.model_weights_level else CACHE)
        kernels = []
        for head, k in self.kernels.items():
            nbytes = k.weight_bytes + (k.input_bytes + k.output_bytes) * batch
            # A matrix-vector product streams its weights once, which hardware prefetch may serve at cache speed.
            gemv = k.kernel_class == "linear" and batch == 1 and self.target.gemv_from_cache
            lvl = CACHE if gemv else self.level(nbytes)
            p = self.passes.get(head, _NO_PASSES)
            kernels.append(Kernel(head, k.kernel_class, k.dtype, k.padded_macs * batch, k.macs * batch, nbytes, lvl,
                                  k.rf_bits_per_mac, k.weight_bytes, k.reduction_length, k.output_positions * batch,
                                  p.conversion_bytes, int(p.conversions), p.reordered_elements, int(p.reorders),
                                  k.output_elements * batch, k.plain, max(lvl, model_weight_level)))
        return Structure(tuple(kernels), tuple(ops), MappingProxyType(self.kernel_of))


# ---- the fusion rules, one per op kind -------------------------------------------------------

def _head_kernel(f: _Fuser, r: LayerCost) -> None:
    """A conv/linear starts a kernel. Float dense and depthwise convs run blocked (an output width that is
    not a multiple of the block is padded) when their input channels are a multiple of ``channel_align``,
    else a plain kernel; grouped convs, linear layers and int8 kernels (NHWC in ONNX Runtime) read and
    write plain tensors."""
    t, block = f.target, f.block
    dtype = t.compute_dtype(r.wbits, r.abits)
    cls = kernel_class(r.op, r.in_ch, r.groups, r.kernel)
    area = r.kernel[0] * r.kernel[1]
    is_blocked = f.layouts and dtype != "int8" and cls in ("conv", "pointwise", "depthwise")
    plain = False
    if is_blocked and t.channel_align > 1:
        is_blocked = r.in_ch % t.channel_align == 0 or (cls != "depthwise" and r.in_ch < block)
        plain = not is_blocked
    f.channels[r.name] = r.out_ch
    if cls == "depthwise":
        padding, reduction = _padding_factor(r.out_ch, block), area
    else:
        in_per_group, out_per_group = r.in_ch // r.groups, r.out_ch // r.groups
        # Inputs with fewer channels than a block (an RGB stem) are read unblocked.
        padding = _padding_factor(out_per_group, block) * (
            _padding_factor(in_per_group, block) if in_per_group >= block else 1.0)
        reduction = in_per_group * area
    abits = RUN_BITS[dtype]
    for src in r.inputs:
        f.convert(r.name, src, dtype == "int8")
        if not (is_blocked and r.in_ch < block):
            f.relayout(r.name, src, is_blocked)
    if dtype == "int8":
        f.int8_tensors.add(r.name)
    elif is_blocked:
        f.blocked.add(r.name)
    if plain:
        padding = 1.0
    # A layer whose weights are at <= 8 bits but that runs in float is deployed with float weights.
    wbits = r.wbits if dtype == "int8" else RUN_BITS[dtype]
    weight_bytes = r.weight_bytes + r.weight_numel * (wbits - r.wbits) / 8
    f.kernels[r.name] = _KernelDraft(cls, dtype, r.macs * padding, r.macs, weight_bytes, r.in_numel * abits / 8,
                                     r.out_numel * f.stored_bytes(r.name), False, r.wbits + 3 * abits, reduction,
                                     r.spatial, r.out_numel, plain)
    f.kernel_of[r.name] = r.name


def _pass_through(f: _Fuser, r: LayerCost) -> None:
    """Inputs, dropouts, getitems, constants: free, keeping their input's dtype and layout."""
    if f.all_int8(r):
        f.int8_tensors.add(r.name)
        if any(s in f.nchw_int8 for s in r.inputs):
            f.nchw_int8.add(r.name)
    elif r.inputs and all(s in f.blocked for s in r.inputs) and r.op != "output":
        f.blocked.add(r.name)
    elif r.op == "output":  # the graph output leaves in the plain layout: one reorder, its own dispatch
        for src in r.inputs:
            f.relayout(r.name, src, False)
        if r.name in f.passes:
            f.passes[r.name].reorders -= 1
            f.ops.append(_OpDraft(r.name))


def _fuse_into_kernel(f: _Fuser, r: LayerCost) -> bool:
    """A BN or activation joins the kernel of its only input, if it is that input's only reader."""
    if len(r.inputs) != 1:
        return False
    src = r.inputs[0]
    head = f.kernel_of.get(src)
    if head is None or f.n_consumers.get(src, 0) != 1:
        return False
    f.follow(r.name, head)
    f.kernels[head].output_bytes = r.out_numel * f.stored_bytes(r.name)
    return True


def _batch_norm(f: _Fuser, r: LayerCost) -> None:
    if not _fuse_into_kernel(f, r):
        _standalone(f, r)


def _activation(f: _Fuser, r: LayerCost) -> None:
    """ONNX Runtime folds a Clip (ReLU6) into an int8 kernel only when int8 kernels read its output: for a
    float reader it dequantises the kernel's output and clips it in float (a pass of its own); between int8
    kernels it requantises (a DequantizeLinear and a QuantizeLinear)."""
    float_clip = False
    if f.dq_per_reader and r.fn in CLIP_FNS and len(r.inputs) == 1:
        head = f.kernel_of.get(r.inputs[0])
        if head is not None and f.kernels[head].dtype == "int8":
            readers = f.consumers.get(r.name, [])
            float_clip = any(c not in f.int8_kernels for c in readers)
            if readers and not float_clip:
                p = f.passes_of(head)
                p.conversion_bytes += 2 * r.out_numel * CONVERSION_BYTES_PER_ELEMENT * f.batch
                p.conversions += 2
    if float_clip or not _fuse_into_kernel(f, r):
        _standalone(f, r, float_clip)


def _residual_add(f: _Fuser, r: LayerCost) -> None:
    """A kernel absorbs one residual add (an int8 one only where the target says so); the add's other
    input is read as extra traffic."""
    absorbable = []
    if len(r.inputs) == 2:
        for s in r.inputs:
            head = f.kernel_of.get(s)
            if head is None or f.n_consumers.get(s, 0) != 1:
                continue
            k = f.kernels[head]
            if not k.absorbed_add and (f.target.int8_fuses_add or k.dtype != "int8"):
                absorbable.append(s)
    if not absorbable:
        _standalone(f, r)
        return
    src = absorbable[-1]
    other = r.inputs[0] if r.inputs[1] == src else r.inputs[1]
    head = f.kernel_of[src]
    k = f.kernels[head]
    f.convert(head, other, k.dtype == "int8")
    f.relayout(head, other, head in f.blocked)
    other_row = f.by_name.get(other)
    k.input_bytes += other_row.out_numel * f.stored_bytes(other) if other_row is not None else 0
    f.follow(r.name, head)
    k.output_bytes = r.out_numel * f.stored_bytes(r.name)
    k.absorbed_add = True


def _reshape(f: _Fuser, r: LayerCost) -> None:
    if r.target not in VIEW_TARGETS:
        _standalone(f, r)
        return
    if f.all_int8(r):
        f.int8_tensors.add(r.name)
    else:
        for src in r.inputs:
            f.relayout(r.name, src, False)
    f.ops.append(_OpDraft(r.name, view=True))


def _other(f: _Fuser, r: LayerCost) -> None:
    if r.target in SHAPE_TARGETS:  # reads only its input's shape: no traffic, no conversion, no reorder
        f.ops.append(_OpDraft(r.name))
    else:
        _standalone(f, r)


def _standalone(f: _Fuser, r: LayerCost, float_clip: bool = False) -> None:
    """Memory traffic plus dispatch; on int8 tensors when every input is int8.

    The slow uint8 pool (QDQ graphs): a windowed pool of a float tensor that is quantised, either because
    another reader of it is an int8 kernel (the quantiser puts one Q/DQ pair on a tensor for all its
    readers, and a max-pool of a quantised tensor is quantised too, whoever reads it) or because the pool is
    its only reader and an int8 kernel reads the pool (ONNX Runtime then moves the QuantizeLinear above the
    pool). It pools uint8 in the plain NCHW layout. Else the pool runs in float; between int8 kernels it
    runs the fast NHWC one. ONNX Runtime runs int8 ops in NHWC where their input comes from an int8 kernel,
    else in NCHW: a windowed pool of an NCHW int8 tensor is the slow uint8 pool too.
    """
    op, quantised_reads = r.op, f.dq_per_reader
    all_int8 = f.all_int8(r) and not float_clip
    windowed = op == "pool" and f.windowed_pool(r)
    siblings = [c for c in f.consumers.get(r.inputs[0], ()) if c != r.name] if r.inputs else []
    slow_pool = (quantised_reads and not all_int8 and windowed
                 and (any(c in f.int8_kernels for c in siblings) or (not siblings and r.name in f.int8_inputs)))
    nchw_in = quantised_reads and any(s in f.nchw_int8 for s in r.inputs)
    if all_int8 and windowed and nchw_in:
        slow_pool = True
    if quantised_reads and (slow_pool or (all_int8 and (nchw_in or (op == "concat" and len(r.inputs) == 1)))):
        f.nchw_int8.add(r.name)
    if all_int8:
        f.int8_tensors.add(r.name)
    elif slow_pool:
        for src in r.inputs:
            f.convert(r.name, src, True)
            f.relayout(r.name, src, False)
        f.int8_tensors.add(r.name)
    else:
        for src in r.inputs:
            f.convert(r.name, src, False)
        _choose_layout(f, r, windowed)
    nbytes = r.out_numel * f.stored_bytes(r.name)
    for src in r.inputs:
        src_row = f.by_name.get(src)
        if src_row is not None:
            nbytes += src_row.out_numel * f.stored_bytes(src)
    slow_elements = r.out_numel * f.batch if slow_pool else 0
    plain_pool = f.layouts and not all_int8 and windowed and r.name not in f.blocked and not slow_elements
    f.ops.append(_OpDraft(r.name, nbytes * f.batch, r.out_numel * f.batch, False, slow_elements,
                          r.out_numel * f.batch if plain_pool else 0))


def _choose_layout(f: _Fuser, r: LayerCost, windowed: bool) -> None:
    """A float op keeps the blocked layout when every input has it (pools and concats only on whole
    blocks of channels); a windowed pool on whole blocks runs blocked whatever its input's layout."""
    op = r.op
    keep = op in ("pool", "add", "concat", "act", "bn") and bool(r.inputs) and all(s in f.blocked for s in r.inputs)
    whole = all(f.channels.get(s, 0) % f.block == 0 and f.channels.get(s, 0) > 0 for s in r.inputs)
    if op in ("pool", "concat"):
        keep = keep and whole
    if op == "pool" and f.layouts and whole and len(r.inputs) == 1 and windowed:
        keep = True
    if keep:
        f.blocked.add(r.name)
    for src in r.inputs:
        f.relayout(r.name, src, keep)


FUSION_RULES: dict[str, Callable[[_Fuser, LayerCost], None]] = {
    "conv": _head_kernel, "linear": _head_kernel,
    **{op: _pass_through for op in FREE_OPS},
    "bn": _batch_norm, "act": _activation, "add": _residual_add, "reshape": _reshape, "other": _other,
}


def structure(table: CostTable, t: Target, batch: int = 1) -> Structure:
    """Fuse the table's rows into kernels and standalone ops, as the runtime would."""
    f = _Fuser(table, t, batch)
    for r in f.rows:
        if r.op not in HEAD_OPS and r.inputs:
            f.channels[r.name] = (sum(f.channels.get(s, 0) for s in r.inputs) if r.op == "concat"
                                  else f.channels.get(r.inputs[0], 0))
        FUSION_RULES.get(r.op, _standalone)(f, r)
    return f.structure()
