"""Fusing a CostTable's rows into the kernels and standalone ops a runtime runs on a target.

A conv/linear heads a kernel and absorbs the BN and activations that follow it and one residual add
(whose other input is read as extra traffic), as long as each intermediate has no other consumer.
What is not absorbed runs as a standalone op. The model is deployed as a QDQ graph: a conv/linear that
``runs_int8`` runs in int8 (where the target has fast int8), and an add, pool or concat runs on int8
tensors when every tensor it reads is int8. Each int8 <-> float edge is a QuantizeLinear or
DequantizeLinear. On targets with ``block_fallback`` float tensors are blocked or plain, and each change
is a reorder pass. Batched matmuls, attention and recurrent layers are GEMM kernels of their own, and
embeddings gathers (``hwmodels.sequence``). ``FUSION_RULES`` says, per op kind, what a row does;
docs/hwmodels.md has the details.
"""

from __future__ import annotations

import math
from typing import Callable

from autocompress.hwmodels.fuser import (HEAD_OPS, RUN_BITS, Fuser, KernelDraft, OpDraft, padding_factor)
from autocompress.hwmodels.kernels import CONVERSION_BYTES_PER_ELEMENT, Structure, kernel_class
from autocompress.hwmodels.sequence import SEQUENCE_RULES
from autocompress.hwmodels.target import Target
from autocompress.space.costs import CostTable, LayerCost

FREE_OPS = ("input", "dropout", "getitem", "output", "const")
CLIP_FNS = ("ReLU6", "relu6")  # activations (graph op "act") that export as Clip
GELU_FNS = ("GELU", "gelu")  # activations that only some runtimes fuse into a GEMM (Target.fuses_gelu)
# Standalone ops whose arithmetic outweighs their traffic (Target.math_ns): transcendental activations,
# softmax and normalisation over a feature axis (batch norm folds into convs; on its own it is a scale).
MATH_FNS = (*GELU_FNS, "Sigmoid", "sigmoid", "SiLU", "silu", "Tanh", "tanh", "Mish", "mish", "Softplus", "softplus",
            "ELU", "elu")
MATH_OPS = ("norm", "softmax")
VIEW_TARGETS = ("view", "reshape", "flatten")  # reshapes that are views: dispatch cost only
SHAPE_TARGETS = ("size", "dim")  # ops that read a tensor's shape only


# ---- the fusion rules, one per op kind -------------------------------------------------------

def _head_kernel(f: Fuser, r: LayerCost) -> None:
    """A conv/linear starts a kernel. Float dense and depthwise convs run blocked (an output width that is
    not a multiple of the block is padded) when their input channels are a multiple of ``channel_align``,
    else a plain kernel; grouped convs, linear layers and int8 kernels (NHWC in ONNX Runtime) read and
    write plain tensors. The blocked layout is for 2-d convs only: 1-d and 3-d float convs read and write
    plain tensors like grouped convs (ONNX Runtime's NCHWc rewrite takes 4-d tensors only) at their class's
    efficiency (a 64-channel Conv1d measured no slower than the same conv as a blocked 1 x 3 Conv2d)."""
    t, block = f.target, f.block
    dtype = t.compute_dtype(r.wbits, r.abits)
    cls = kernel_class(r.op, r.in_ch, r.groups, r.kernel)
    area = math.prod(r.kernel)
    is_blocked = f.layouts and dtype != "int8" and cls in ("conv", "pointwise", "depthwise")
    plain = False
    if is_blocked and len(r.kernel) != 2:
        is_blocked = False
    elif is_blocked and t.channel_align > 1:
        is_blocked = r.in_ch % t.channel_align == 0 or (cls != "depthwise" and r.in_ch < block)
        plain = not is_blocked
    f.channels[r.name] = r.out_ch
    if cls == "depthwise":
        padding, reduction = padding_factor(r.out_ch, block), area
    else:
        in_per_group, out_per_group = r.in_ch // r.groups, r.out_ch // r.groups
        # Inputs with fewer channels than a block (an RGB stem) are read unblocked.
        padding = padding_factor(out_per_group, block) * (
            padding_factor(in_per_group, block) if in_per_group >= block else 1.0)
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
    k = f.kernels[r.name] = KernelDraft(cls, dtype, r.macs * padding, r.macs, weight_bytes, r.in_numel * abits / 8,
                                         r.out_numel * f.stored_bytes(r.name), False, r.wbits + 3 * abits, reduction,
                                         r.spatial, r.out_numel, plain)
    f.kernel_of[r.name] = r.name
    if r.op == "linear" and r.spatial > 1 and not t.sequence_linear_epilogue:
        # A MatMul, then the bias as an Add of its own (read and write the output, read the bias).
        k.epilogue = False
        if r.bias:
            k.bias_pass_bytes = 2 * r.out_numel * f.stored_bytes(r.name) + r.out_ch * 4
            k.input_bytes += k.bias_pass_bytes
            k.launches += 1


def _pass_through(f: Fuser, r: LayerCost) -> None:
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
            f.ops.append(OpDraft(r.name))


def _fuse_into_kernel(f: Fuser, r: LayerCost) -> bool:
    """A BN or activation joins the kernel of its only input, if it is that input's only reader."""
    if len(r.inputs) != 1:
        return False
    src = r.inputs[0]
    head = f.kernel_of.get(src)
    if head is None or f.n_consumers.get(src, 0) != 1 or not f.kernels[head].epilogue:
        return False
    f.follow(r.name, head)
    f.kernels[head].output_bytes = r.out_numel * f.stored_bytes(r.name)
    return True


def _batch_norm(f: Fuser, r: LayerCost) -> None:
    if not _fuse_into_kernel(f, r):
        _standalone(f, r)


def _activation(f: Fuser, r: LayerCost) -> None:
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
    # GELU is its own pass except where the runtime fuses it into the GEMM (Target.fuses_gelu).
    own_pass = r.fn in GELU_FNS and not f.target.fuses_gelu
    if own_pass and len(r.inputs) == 1 and f.n_consumers.get(r.inputs[0], 0) == 1:
        _merge_bias_pass(f, f.kernel_of.get(r.inputs[0]))
    if float_clip or own_pass or not _fuse_into_kernel(f, r):
        _standalone(f, r, float_clip)


def _merge_bias_pass(f: Fuser, head: str | None) -> None:
    """A GELU pass that reads a linear's output takes over its separate bias add (ONNX Runtime's BiasGelu)."""
    k = f.kernels.get(head) if head is not None else None
    if k is not None and k.bias_pass_bytes:
        k.input_bytes -= k.bias_pass_bytes
        k.launches -= 1
        k.bias_pass_bytes = 0.0


def _residual_add(f: Fuser, r: LayerCost) -> None:
    """A kernel absorbs one residual add (an int8 one only where the target says so); the add's other
    input is read as extra traffic."""
    absorbable = []
    if len(r.inputs) == 2:
        for s in r.inputs:
            head = f.kernel_of.get(s)
            if head is None or f.n_consumers.get(s, 0) != 1 or not f.kernels[head].epilogue:
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


def _reshape(f: Fuser, r: LayerCost) -> None:
    if r.target not in VIEW_TARGETS:
        _standalone(f, r)
        return
    if f.all_int8(r):
        f.int8_tensors.add(r.name)
    else:
        for src in r.inputs:
            f.relayout(r.name, src, False)
    f.ops.append(OpDraft(r.name, view=True))


def _other(f: Fuser, r: LayerCost) -> None:
    if r.target in SHAPE_TARGETS:  # reads only its input's shape: no traffic, no conversion, no reorder
        f.ops.append(OpDraft(r.name))
    else:
        _standalone(f, r)


def _standalone(f: Fuser, r: LayerCost, float_clip: bool = False) -> None:
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
    math = r.op in MATH_OPS or (r.op == "act" and r.fn in MATH_FNS)
    f.ops.append(OpDraft(r.name, nbytes * f.batch, r.out_numel * f.batch, False, slow_elements,
                          r.out_numel * f.batch if plain_pool else 0, r.out_numel * f.batch if math else 0))


def _choose_layout(f: Fuser, r: LayerCost, windowed: bool) -> None:
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


FUSION_RULES: dict[str, Callable[[Fuser, LayerCost], None]] = {
    "conv": _head_kernel, "linear": _head_kernel,
    **{op: _pass_through for op in FREE_OPS},
    "bn": _batch_norm, "act": _activation, "add": _residual_add, "reshape": _reshape, "other": _other,
    "norm": _standalone, "softmax": _standalone,  # memory-bound passes (ONNX Runtime's LayerNormalization, Softmax)
    **SEQUENCE_RULES,
}


def structure(table: CostTable, t: Target, batch: int = 1) -> Structure:
    """Fuse the table's rows into kernels and standalone ops, as the runtime would."""
    f = Fuser(table, t, batch)
    for r in f.rows:
        if r.op not in HEAD_OPS and r.inputs:
            f.channels[r.name] = (sum(f.channels.get(s, 0) for s in r.inputs) if r.op == "concat"
                                  else f.channels.get(r.inputs[0], 0))
        FUSION_RULES.get(r.op, _standalone)(f, r)
    return f.structure()
