"""Analytic costs on a table of layers: MACs, params, weight bytes, peak activation memory.

A :class:`CostTable` is a cheap, mutable copy of the traced graph's numbers.
Primitives edit it (``compress.*.estimate``) exactly as their transforms edit the
model, so the cost of a policy is known without building the compressed model.
Hardware models (``hwmodels``) read the same table to predict latency and energy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from autocompress.space.graph import ModelGraph
from autocompress.space.ops import conv_weight_numel, mha_macs, rnn_weight_numel, seq_len_of

FLOAT_BITS = 32
INT8_BITS = 8
# Op kinds of rows that a module (a module path) can stand for.
_MODULE_OPS = ("conv", "linear", "bn", "act", "pool", "other", "dropout", "norm", "rnn", "embedding", "softmax",
               "mha")


def runs_int8(wbits: int, abits: int) -> bool:
    """Whether a conv/linear deploys as an int8 kernel: weights and input activations both at <= 8 bits.
    (A layer with narrow weights but wide activations runs in float; the int8 exporter leaves it out.)"""
    return wbits <= INT8_BITS and abits <= INT8_BITS


@dataclass
class LayerCost:
    """One operation of the (possibly compressed) model, per sample (batch 1).

    ``inputs`` name the producing layers, so a hardware model can fuse a
    conv with the BN / activation / add that consumes it. ``out_numel`` is the
    element count of the output tensor. For conv and linear: ``in_ch``/``out_ch``
    (linear: features), ``kernel`` and ``stride`` (one entry per spatial dim: 1-d,
    2-d or 3-d convs; (1, 1) for linear), ``groups``, ``spatial`` (output positions
    per sample: L, H*W or D*H*W for conv, rows for linear), ``bias``. For rnn:
    ``in_ch`` input size, ``out_ch`` hidden size, ``spatial`` sequence length,
    ``rnn_layers``, ``directions``, ``gates`` (LSTM 4, GRU 3, RNN 1). For attention
    and mha (a whole nn.MultiheadAttention, ``in_ch`` its width): ``heads``, ``head_dim``,
    ``seq_q``, ``seq_k``.
    ``wbits`` / ``abits`` are the weight and input-activation bit-widths.
    """

    name: str
    op: str
    target: str = ""
    inputs: list[str] = field(default_factory=list)
    out_numel: int = 0
    in_ch: int = 0
    out_ch: int = 0
    kernel: tuple[int, ...] = (1, 1)
    stride: tuple[int, ...] = (1, 1)
    groups: int = 1
    spatial: int = 1
    bias: bool = False
    params_fixed: int = 0  # params not described by the geometry (e.g. PReLU, LayerNorm)
    wbits: int = FLOAT_BITS
    abits: int = FLOAT_BITS
    fn: str = ""  # what an activation calls: its module class (ReLU6) or function (relu6)
    # Attention (scaled dot-product): heads x (seq_q x seq_k) scores over head_dim, then times V.
    heads: int = 0
    head_dim: int = 0
    seq_q: int = 0
    seq_k: int = 0
    # Recurrent layers: stacked layers, 1 or 2 directions, gate blocks per step.
    rnn_layers: int = 0
    directions: int = 0
    gates: int = 0

    @property
    def macs(self) -> int:
        if self.op in ("conv", "rnn"):  # each weight once per output position (conv) or step (rnn)
            return self.weight_numel * self.spatial
        if self.op in ("linear", "matmul"):  # matmul: two activations, K = in_ch, N = out_ch, rows = spatial
            return self.in_ch * self.out_ch * self.spatial
        if self.op == "attention":
            return 2 * self.heads * self.seq_q * self.seq_k * self.head_dim
        if self.op == "mha":
            return mha_macs(self.in_ch, self.seq_q, self.seq_k)
        return 0

    @property
    def weight_numel(self) -> int:
        if self.op == "conv":
            return conv_weight_numel(self.in_ch, self.out_ch, self.kernel, self.groups)
        if self.op == "linear":
            return self.in_ch * self.out_ch
        if self.op == "rnn":
            return rnn_weight_numel(self.in_ch, self.out_ch, self.rnn_layers, self.directions, self.gates)
        if self.op == "mha":  # q, k, v and output projections (biases are in params_fixed)
            return 4 * self.in_ch * self.in_ch
        return 0

    @property
    def params(self) -> int:
        if self.op in ("conv", "linear", "mha"):
            return self.weight_numel + (self.out_ch if self.bias else 0) + self.params_fixed
        if self.op == "rnn":  # torch keeps two bias vectors (input and recurrent) per gate block
            biases = 2 * self.gates * self.out_ch * self.rnn_layers * self.directions if self.bias else 0
            return self.weight_numel + biases + self.params_fixed
        if self.op == "bn":
            return 2 * self.out_ch + self.params_fixed
        return self.params_fixed

    @property
    def weight_bytes(self) -> float:
        """Weights at ``wbits``; biases and BN parameters stay 32-bit."""
        return self.weight_numel * self.wbits / 8 + (self.params - self.weight_numel) * 4

    @property
    def in_numel(self) -> int:
        """Input activation elements of a conv/linear/rnn (a conv's before striding)."""
        if self.op == "conv":
            return self.in_ch * self.spatial * math.prod(self.stride)
        if self.op in ("linear", "rnn"):
            return self.in_ch * self.spatial
        return 0


class CostTable:
    """Ordered layers of one model variant; a policy's estimate edits a copy."""

    def __init__(self, layers: Iterable[LayerCost], input_numel: int = 0, network: str = "") -> None:
        self._layers: dict[str, LayerCost] = {l.name: l for l in layers}
        self.input_numel = input_numel
        # The uncompressed architecture's fingerprint (kept by every variant's copy): a calibrated
        # target's per-network latency scale is looked up by it ("" for hand-made tables).
        self.network = network

    @classmethod
    def from_graph(cls, mg: ModelGraph) -> "CostTable":
        rows = []
        for name in mg.order:
            a = mg.graph.nodes[name]
            if a["op"] in ("output", "const"):
                continue
            out = a["out_shape"]
            numel = 1
            for s in out or ():
                numel *= s
            row = LayerCost(name=name, op=a["op"], target=a["target"], inputs=list(mg.graph.predecessors(name)),
                            out_numel=numel if out else 0)
            if a["op"] in ("conv", "linear") and "in_ch" in a:
                spatial = a["macs"] // max(1, conv_weight_numel(a["in_ch"], a["out_ch"], a["kernel"], a["groups"]))
                row.in_ch, row.out_ch, row.kernel = a["in_ch"], a["out_ch"], tuple(a["kernel"])
                row.stride, row.groups, row.spatial, row.bias = tuple(a["stride"]), a["groups"], spatial, a["bias"]
            elif a["op"] == "rnn" and "gates" in a:
                # torch.export may meet an RNN's first op (its zero state) before its input: steps from the inputs.
                seq = a["seq_len"] or seq_len_of(a["batch_first"], next((s for s in a["in_shapes"] if s), None))
                row.in_ch, row.out_ch, row.spatial, row.bias = a["in_ch"], a["out_ch"], seq, a["bias"]
                row.rnn_layers, row.directions, row.gates = a["rnn_layers"], a["directions"], a["gates"]
                # The output sequence: the graph may record the (output, state) tuple as no shape at all.
                row.out_numel = row.spatial * row.out_ch * row.directions
            elif a["op"] == "linear" and a["in_shapes"] and a["in_shapes"][0] and out:
                # A linear function on a parameter (torch.export inside a module it does not keep whole).
                row.in_ch, row.out_ch, row.spatial = a["in_shapes"][0][-1], out[-1], numel // max(1, out[-1])
            elif a["op"] == "mha" and "heads" in a:
                keys = a["in_shapes"][1] if len(a["in_shapes"]) > 1 and a["in_shapes"][1] else None
                row.in_ch = row.out_ch = a["in_ch"]
                row.heads, row.head_dim, row.seq_q = a["heads"], a["head_dim"], a["seq_q"]
                row.seq_k = seq_len_of(a["batch_first"], keys) if keys else a["seq_k"]
                row.out_numel = row.seq_q * row.in_ch  # (output, weights): the output only
            elif a["op"] == "bn":
                row.in_ch = row.out_ch = a["out_ch"]
            elif a["op"] == "matmul" and a["in_shapes"] and a["in_shapes"][0] and out:
                row.in_ch, row.out_ch = a["in_shapes"][0][-1], out[-1]
                row.spatial = numel // max(1, out[-1])
            elif a["op"] == "attention" and len(a["in_shapes"]) >= 2 and a["in_shapes"][0] and a["in_shapes"][1]:
                q, k = a["in_shapes"][0], a["in_shapes"][1]
                row.heads = max(1, numel_of(q[:-2]))
                row.seq_q, row.seq_k, row.head_dim = q[-2], k[-2], q[-1]
            elif a["op"] == "act":
                row.fn = a.get("module_type") or a["target"]
            # What the geometry does not explain; negative for a module's second call, whose
            # parameters its first call already counted (the graph gives the second call 0).
            row.params_fixed = a["params"] - row.params
            rows.append(row)
        input_numel = 1
        for s in mg.input_shape[1:]:
            input_numel *= s
        return cls(rows, input_numel, mg.fingerprint)

    def copy(self) -> "CostTable":
        """An independent copy; one per candidate policy, so it is a flat per-row copy, not a deepcopy."""
        new = CostTable.__new__(CostTable)
        new.__dict__.update(self.__dict__)
        new._layers = {name: _copy_row(l) for name, l in self._layers.items()}
        return new

    def __iter__(self) -> Iterator[LayerCost]:
        return iter(self._layers.values())

    def __len__(self) -> int:
        return len(self._layers)

    def __contains__(self, name: str) -> bool:
        return name in self._layers

    def __getitem__(self, name: str) -> LayerCost:
        return self._layers[name]

    def by_target(self, target: str) -> LayerCost | None:
        """The row that a module path stands for (its first call), if it is still in the table."""
        for l in self._layers.values():
            if l.target == target and l.op in _MODULE_OPS:
                return l
        return None

    def remove(self, name: str) -> None:
        """Drop a layer, rewiring its consumers to its inputs."""
        gone = self._layers.pop(name)
        for l in self._layers.values():
            if name in l.inputs:
                i = l.inputs.index(name)
                l.inputs[i:i + 1] = [x for x in gone.inputs if x not in l.inputs]

    def insert_after(self, after: str, row: LayerCost) -> None:
        """Insert ``row`` behind ``after``; consumers of ``after`` now read ``row``."""
        if after not in self._layers:
            raise ValueError(f"{after!r} is not a row of the table")
        for l in self._layers.values():
            if after in l.inputs:
                l.inputs = [row.name if x == after else x for x in l.inputs]
        row.inputs = [after]
        layers: dict[str, LayerCost] = {}
        for name, l in self._layers.items():
            layers[name] = l
            if name == after:
                layers[row.name] = row
        self._layers = layers

    def consumers(self, name: str) -> list[LayerCost]:
        return [l for l in self._layers.values() if name in l.inputs]

    def totals(self) -> dict[str, float]:
        macs = params = 0
        weight_bytes = 0.0
        for l in self._layers.values():  # one pass: this runs once per candidate policy
            macs += l.macs
            p = l.params
            params += p
            n = l.weight_numel
            weight_bytes += n * l.wbits / 8 + (p - n) * 4
        return {
            "macs": macs,
            "params": params,
            "weight_bytes": int(weight_bytes),
            "peak_activation_bytes": self.peak_activation_bytes(),
        }

    def activation_bits(self) -> dict[str, int]:
        """Bits a layer's output is stored at: its conv/linear consumers' ``abits`` if all are below 32."""
        bits: dict[str, int] = {}
        for l in self:
            for src in l.inputs:
                want = l.abits if l.op in ("conv", "linear") else FLOAT_BITS
                bits[src] = max(bits.get(src, 0), want)
        return bits

    def peak_activation_bytes(self) -> int:
        """Largest sum of live tensors over the execution order (a tensor lives until its last reader)."""
        rows = list(self._layers.values())
        last_use: dict[str, int] = {}
        for i, l in enumerate(rows):
            for src in l.inputs:
                last_use[src] = i  # rows run in order, so the last assignment is the last reader
        bits = self.activation_bits()
        dies: dict[int, int] = {}  # step -> bytes freed after it
        live = peak = 0
        for i, l in enumerate(rows):
            size = int(l.out_numel * bits.get(l.name, FLOAT_BITS) / 8)
            live += size
            peak = max(peak, live)
            end = max(i, last_use.get(l.name, i))
            dies[end] = dies.get(end, 0) + size
            live -= dies.pop(i, 0)
        return peak


def numel_of(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _copy_row(row: LayerCost) -> LayerCost:
    """A copy of ``row`` sharing only immutable values (tuples, strings, numbers)."""
    new = object.__new__(LayerCost)
    new.__dict__.update(row.__dict__)
    new.inputs = list(row.inputs)
    return new
