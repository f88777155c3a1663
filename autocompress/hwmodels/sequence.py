"""Fusion rules of the sequence-model ops: batched matmuls, attention, recurrent layers and embedding gathers.

Matmuls, attention and recurrent layers are GEMM kernels: their MACs run at the target's float rate of
the ``linear`` class (every runtime here runs them on its GEMM: ONNX Runtime's MatMul and LSTM call the
same MLAS GEMM as Gemm), they read and write plain tensors (a quantised input is dequantised first: int8
matmuls between activations are not modelled yet), and they absorb nothing that follows them (ONNX
Runtime fuses a bias add or activation into a 2-d Gemm only, never into a batched MatMul).
An embedding is a gather, a memory-bound standalone op. LayerNorm/GroupNorm and softmax rows run as
memory-bound standalone ops (``fusion._standalone``). docs/hwmodels.md states each rule.
"""

from __future__ import annotations

from typing import Callable

from autocompress.hwmodels.fuser import RUN_BITS, Fuser, KernelDraft, OpDraft, padding_factor
from autocompress.space.costs import FLOAT_BITS, LayerCost

ID_BYTES = 8  # token ids are int64


def _float_dtype(f: Fuser, r: LayerCost) -> str:
    """fp16 where the row is at 16 bits and the target has fast fp16; else fp32 (int8 is not modelled yet)."""
    dtype = f.target.compute_dtype(r.wbits, r.abits)
    return "fp32" if dtype == "int8" else dtype


def _read_plain(f: Fuser, r: LayerCost) -> float:
    """Bytes per sample of the tensors ``r`` reads, in float and in the plain layout (paying the passes)."""
    nbytes = 0.0
    for src in r.inputs:
        f.convert(r.name, src, False)
        f.relayout(r.name, src, False)
        row = f.by_name.get(src)
        nbytes += row.out_numel * f.stored_bytes(src) if row is not None else 0.0
    return nbytes


def _open(f: Fuser, r: LayerCost, draft: KernelDraft) -> None:
    f.kernels[r.name] = draft
    f.kernel_of[r.name] = r.name


def _matmul(f: Fuser, r: LayerCost) -> None:
    """A batched matmul between two activations: per sample a GEMM of M = spatial rows, K = in_ch,
    N = out_ch, with no weights; both operands are read from memory. Channels pad as a linear layer's do."""
    dtype = _float_dtype(f, r)
    bits = RUN_BITS[dtype]
    padding = padding_factor(r.out_ch, f.block) * (padding_factor(r.in_ch, f.block) if r.in_ch >= f.block else 1.0)
    _open(f, r, KernelDraft("linear", dtype, r.macs * padding, r.macs, 0.0, _read_plain(f, r),
                            r.out_numel * f.stored_bytes(r.name), False, 4 * bits, r.in_ch, r.spatial, r.out_numel,
                            False, epilogue=False))


def _scores(f: Fuser, r: LayerCost) -> tuple[int, float, int]:
    """(score elements, bytes the scores move per sample, kernels) of attention on this target."""
    scores = r.heads * r.seq_q * r.seq_k
    if f.target.fused_attention:
        return scores, 0.0, 1
    return scores, 2 * scores * FLOAT_BITS / 8, 3  # each way: the scores and the softmax's output


def _attention(f: Fuser, r: LayerCost) -> None:
    """Scaled-dot-product attention: Q.K^T then .V, 2 x heads x seq_q x seq_k x head_dim MACs, reading
    Q, K, V (and a mask) and writing the output.

    Where the runtime fuses attention (``Target.fused_attention``: TensorRT's fused MHA, flash attention)
    the heads x seq_q x seq_k scores never leave the chip: one kernel. Elsewhere (ONNX Runtime runs the
    exported MatMul, Softmax, MatMul; TFLite and ncnn alike) it is three dependent kernels, each
    dispatched, and the fp32 scores cross memory four times: written by Q.K^T, read and written by the
    softmax, read by .V. The softmax's traffic is counted in this kernel, so one roofline covers all
    three (their sum of max(compute, memory) would be at most twice that)."""
    dtype = _float_dtype(f, r)
    bits = RUN_BITS[dtype]
    scores, score_bytes, launches = _scores(f, r)
    _open(f, r, KernelDraft("linear", dtype, float(r.macs), r.macs, 0.0, _read_plain(f, r) + score_bytes,
                            r.out_numel * f.stored_bytes(r.name) + score_bytes, False, 4 * bits, r.head_dim,
                            r.seq_q, r.out_numel + scores, False, epilogue=False, launches=launches,
                            math_elements=scores))


def _multihead_attention(f: Fuser, r: LayerCost) -> None:
    """A whole nn.MultiheadAttention: the packed Q/K/V projection and the output projection (two GEMMs with
    its weights), and attention between them as ``_attention`` costs it; Q, K, V and the attention output
    are written and read back in between."""
    dtype = _float_dtype(f, r)
    bits = RUN_BITS[dtype]
    scores, score_bytes, launches = _scores(f, r)
    between = (2 * r.seq_q + 2 * r.seq_k) * r.in_ch * bits / 8  # q, k, v and the heads' output, each way
    weight_bytes = r.weight_bytes + r.weight_numel * (bits - r.wbits) / 8
    _open(f, r, KernelDraft("linear", dtype, float(r.macs), r.macs, weight_bytes,
                            _read_plain(f, r) + score_bytes + between / 2,
                            r.out_numel * f.stored_bytes(r.name) + score_bytes + between / 2, False, 4 * bits, r.in_ch,
                            r.seq_q, r.out_numel + scores, False, epilogue=False, launches=2 + launches,
                            math_elements=scores))


def _rnn(f: Fuser, r: LayerCost) -> None:
    """An LSTM/GRU/RNN: per layer and direction, one GEMM of the inputs over the whole sequence (M = seq_len,
    N = gates x hidden) and then seq_len dependent recurrent steps, each a one-row GEMM with the previous
    hidden state plus the gate nonlinearities. Runtimes run one op per layer (ONNX Runtime's LSTM node,
    TFLite's sequence LSTM, ncnn's LSTM layer: a ``kernel_overhead_us`` dispatch each) that loops over the
    steps; a step cannot start before the previous one ends, so each step of each layer and direction
    pays ``step_overhead_us`` on top of its MACs: on small hidden sizes an RNN is latency-bound.

    Traffic: the weights once (from where the model's weights live), the recurrent weights again at every
    later step from where one layer-direction's weights fit (whatever the batch: a step's GEMM has the batch
    as its rows), the input sequence, the gate pre-activations (written by the input GEMM and read by the
    steps), the inner layers' outputs (written and read) and the output sequence."""
    dtype = _float_dtype(f, r)
    bits = RUN_BITS[dtype]
    pairs = max(1, r.rnn_layers * r.directions)
    weight_bytes = r.weight_bytes + r.weight_numel * (bits - r.wbits) / 8  # deployed at the width it runs at
    recurrent = r.gates * r.out_ch * r.out_ch * pairs * bits / 8
    gate_values = r.spatial * r.gates * r.out_ch * pairs
    inner = (r.rnn_layers - 1) * r.spatial * r.out_ch * r.directions
    internal = 2 * (gate_values + inner) * bits / 8
    padding = padding_factor(r.out_ch, f.block) if r.out_ch >= f.block else 1.0
    _open(f, r, KernelDraft("linear", dtype, r.macs * padding, r.macs, weight_bytes, _read_plain(f, r) + internal / 2,
                            r.out_numel * f.stored_bytes(r.name) + internal / 2, False, 4 * bits, r.in_ch + r.out_ch,
                            r.spatial, gate_values, False, epilogue=False, launches=max(1, r.rnn_layers),
                            steps=pairs * r.spatial,
                            reread_bytes=recurrent * max(0, r.spatial - 1), working_set=weight_bytes / pairs))


def _embedding(f: Fuser, r: LayerCost) -> None:
    """A gather: it reads the ids and the rows it gathers (as many fp32 elements as it writes, not the whole
    table) and writes them; the rows come from the level the table fits."""
    ids = sum(f.by_name[s].out_numel * ID_BYTES for s in r.inputs if s in f.by_name)
    nbytes = ids + r.out_numel * (FLOAT_BITS / 8 + f.stored_bytes(r.name))
    f.ops.append(OpDraft(r.name, nbytes * f.batch, r.out_numel * f.batch, working_set=max(0.0, r.weight_bytes)))


SEQUENCE_RULES: dict[str, Callable[[Fuser, LayerCost], None]] = {
    "matmul": _matmul, "attention": _attention, "mha": _multihead_attention, "rnn": _rnn, "embedding": _embedding,
}
