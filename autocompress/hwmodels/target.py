"""A hardware target: documented numbers that the analytic model turns into latency and energy.

A target is data (a frozen dataclass that round-trips through JSON), so a
calibrated or user-supplied target is a JSON file, not code. Every number has
a source in ``sources`` (a citation, or "fitted by autocompress calibrate").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from autocompress.errors import UserInputError
from autocompress.space.costs import runs_int8

FORMAT = "autocompress.target/1"

# Kernel classes whose compute efficiency (fraction of peak) a target states.
KERNEL_CLASSES = ("conv", "pointwise", "depthwise", "grouped", "linear")
DTYPES = ("fp32", "fp16", "int8")

# Horowitz, "Computing's energy problem", ISSCC 2014, 45 nm: mult + add energies.
# fp32 3.7 + 0.9 pJ, fp16 1.1 + 0.4 pJ, int8 0.2 + 0.03 pJ.
# Memory levels in Eyeriss ratios (Chen et al., ISCA 2016, Fig. 1 / Table IV):
# register file 1x, global buffer 6x, DRAM 200x, anchored at 0.5 pJ per RF byte
# (about one 16-bit MAC per 16-bit RF access, the Eyeriss normalisation).
HOROWITZ_ENERGY_PJ: Mapping[str, float] = MappingProxyType({
    "mac_fp32": 4.6, "mac_fp16": 1.5, "mac_int8": 0.23,
    "rf_byte": 0.5, "buffer_byte": 3.0, "dram_byte": 100.0,
})


def _frozen(m: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(m))


@dataclass(frozen=True)
class Target:
    """Per-target constants of the roofline-plus-overhead latency model.

    ``peak_gmacs``: peak multiply-accumulates per second (10^9) per dtype, for
    the cores/threads the target's latencies refer to. ``efficiency``: the
    fraction of that peak the runtime reaches per kernel class. Memory traffic
    moves at ``cache_gbs`` when a kernel's working set fits ``cache_bytes``,
    else at ``dram_gbs``. Each kernel adds ``kernel_overhead_us``, each
    unfused elementwise op ``elementwise_overhead_us``, each call
    ``call_overhead_us``. Channels are vectorised in blocks of
    ``channel_block`` (a width that is not a multiple wastes lanes); short
    reductions and few output positions lower the rate (``gemm_k0``, ``gemm_s0``).
    """

    name: str
    description: str
    peak_gmacs: Mapping[str, float]
    efficiency: Mapping[str, float]
    dram_gbs: float
    cache_gbs: float
    cache_bytes: int
    kernel_overhead_us: float
    elementwise_overhead_us: float
    call_overhead_us: float = 0.0
    channel_block: int = 1
    fast_int8: bool = False
    fast_fp16: bool = False
    threads: int = 1
    int8_efficiency: float = 1.0  # extra factor on int8 kernels (quantise/requantise work)
    int8_class_efficiency: Mapping[str, float] = field(default_factory=dict)  # per-class factor on top (default 1)
    int8_pool_ns: float = 0.0  # extra ns per output element of a windowed float pool that an int8 kernel reads
    llc_bytes: int = 0  # a last-level cache between ``cache_bytes`` and DRAM (0: none)
    llc_gbs: float = 0.0
    gemm_k0: float = 0.0  # a short reduction (cin/groups * kh * kw = K) runs at K / (K + gemm_k0) of the rate
    gemm_s0: float = 0.0  # few output positions (S) run at S / (S + gemm_s0) of the rate
    # Runtimes with a blocked float layout (ONNX Runtime's NCHWc): dense and depthwise float convs run in
    # it, but grouped convs, linear layers, int8 kernels, and pools or concats on partial blocks of
    # channels read plain tensors; every change between the layouts is a reorder pass (``reorder_ns``
    # per element plus a dispatch).
    block_fallback: bool = False
    reorder_ns: float = 0.0
    # With ``block_fallback``: a float conv runs blocked only when its input channels are a multiple of
    # ``channel_align`` (or, for a dense conv, fewer than a block: an RGB stem); otherwise it runs a plain
    # kernel at ``plain_efficiency[class]`` times the class's efficiency (ONNX Runtime: im2col + GEMM,
    # per-channel GEMMs for depthwise). A windowed float pool in the plain layout costs ``plain_pool_ns``
    # per output element beyond its memory traffic.
    channel_align: int = 1
    plain_efficiency: Mapping[str, float] = field(default_factory=dict)
    plain_pool_ns: float = 0.0
    # Per element of work whose arithmetic outweighs its memory traffic: GELU (erf), sigmoid, SiLU, tanh,
    # softmax (exp; inside unfused attention too), layer norm (two reductions and a rsqrt). Transformers
    # spend a tenth of their time there on a CPU; a CNN's ReLU and add do not.
    math_ns: float = 0.0
    view_overhead_us: float = 0.0  # dispatch of a view-type reshape (0: elementwise_overhead_us)
    # A kernel takes max(compute, memory) + memory_overlap x min(compute, memory): on a core shared with
    # other tenants the two overlap only in part, and 224x224 networks, whose activations stream through
    # the last-level cache, ran 5-13 % slower than the pure roofline fitted on single layers predicts
    # (BENCHMARKS.md, runs Z1-Z4). Fitted by calibration where the base target sets it above 0.
    memory_overlap: float = 0.0
    # Per output element of a conv/linear kernel, added to its roofline time: the epilogue (bias,
    # activation, requantisation) and output layout handling, which dominate small-K and depthwise
    # kernels on CPUs (ONNX Runtime's QLinearConv: ~0.5-1.5 ns per output element measured).
    out_ns: float = 0.0
    int8_out_ns: float = 0.0
    gemv_from_cache: bool = True  # a batch-1 linear streams its weights at cache speed (prefetch)
    # Weights stay in a cache between calls only when all the model's weights fit it: each kernel reads its
    # weights from the level that the whole model's weight bytes fit (and its activations from the level
    # its own traffic fits). Off: a kernel's weights come from the level its own traffic fits, as when one
    # layer is timed alone.
    model_weights_level: bool = False
    # A kernel's output buffer, written once a call, is still cached at the next call only if all the bytes
    # a call touches (every weight and every kernel's output) fit the cache: on, a kernel writes its output
    # at the level of those bytes (a network of tens of MB writes to lines evicted since the last call);
    # off, at the level its own traffic fits, as when one layer is timed alone and rewrites one buffer.
    cold_outputs: bool = False
    int8_fuses_add: bool = True  # int8 kernels absorb a residual add (TensorRT does; ONNX Runtime's QLinearConv not)
    convert_ns: float = 0.0  # per element of each int8 <-> float conversion, beyond its memory traffic
    # int8 deployed as a QDQ graph (ONNX Runtime): a tensor that an int8 kernel reads is quantised for
    # all its readers, and each float reader of a quantised or int8 tensor runs its own DequantizeLinear.
    dq_per_reader: bool = False
    # Attention (hwmodels.sequence): the runtime runs Q.K^T, softmax and .V as one kernel whose scores stay
    # on chip (TensorRT's fused MHA, flash attention), not three kernels with the scores in memory.
    fused_attention: bool = False
    fuses_gelu: bool = False  # GELU joins the GEMM before it (TensorRT); elsewhere it is a pass of its own
    # A linear layer over several rows (a sequence of tokens) fuses its bias and what follows, as over one row.
    # ONNX Runtime exports it as MatMul + Add and fuses neither (its Gemm fusions take 2-d inputs only): the bias
    # is an Add pass of its own (merged into a following GELU: BiasGelu) and nothing else joins the MatMul.
    sequence_linear_epilogue: bool = True
    # Per dependent step inside one op (an RNN's time steps, each layer and direction): the synchronisation
    # between one step's small GEMM and the next (an in-op loop on one core, a barrier across threads, a
    # launch on a GPU), on top of the op's own ``kernel_overhead_us``.
    step_overhead_us: float = 0.5
    energy_pj: Mapping[str, float] = field(default_factory=lambda: HOROWITZ_ENERGY_PJ)
    sources: Mapping[str, str] = field(default_factory=dict)
    calibrated: bool | None = None  # None: fixed published target; False: defaults awaiting calibration
    fit: Mapping[str, Any] = field(default_factory=dict)  # calibration statistics
    # A shell command that prints the latency (ms) of the ONNX file at ``{onnx}`` on the device
    # (``hwmodels.device``): calibration sends its designed set through it, a search its finalists.
    measure_cmd: str = ""
    measure_timeout_s: float = 120.0
    # Pruned widths are rounded to a multiple of this, so that pruning turns into speed: a width between
    # multiples of the runtime's channel block runs padded or in a slower kernel (1: any width).
    prune_round_to: int = 1
    # Per network (the uncompressed architecture's fingerprint, ``CostTable.network``): measured / predicted
    # latency over that network's own calibration variants (``calibrate --model``), which multiplies its
    # predictions: the whole-network bias that coefficients shared with other networks leave.
    network_scale: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("peak_gmacs", "efficiency", "int8_class_efficiency", "plain_efficiency", "energy_pj", "sources",
                     "fit", "network_scale"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))
        missing = [d for d in DTYPES if d not in self.peak_gmacs]
        if missing:
            raise UserInputError(f"target {self.name!r}: peak_gmacs lacks {', '.join(missing)}; give all of {DTYPES}")
        if not isinstance(self.prune_round_to, int) or isinstance(self.prune_round_to, bool) or self.prune_round_to < 1:
            raise UserInputError(f"target {self.name!r}: prune_round_to must be a whole number >= 1, "
                                 f"got {self.prune_round_to!r}")
        bad = {k: v for k, v in self.network_scale.items()
               if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf")}
        if bad:
            raise UserInputError(f"target {self.name!r}: network_scale values must be positive numbers, got {bad}")
        missing = [c for c in KERNEL_CLASSES if c not in self.efficiency]
        if missing:
            raise UserInputError(f"target {self.name!r}: efficiency lacks {', '.join(missing)}; give all of {KERNEL_CLASSES}")

    def compute_dtype(self, wbits: int, abits: int) -> str:
        """The dtype a conv/linear runs in: int8 only with fast int8, fp16 only with fast fp16."""
        if runs_int8(wbits, abits):
            return "int8" if self.fast_int8 else "fp32"
        if wbits <= 16 and abits <= 16:
            return "fp16" if self.fast_fp16 else "fp32"
        return "fp32"

    def with_(self, **changes: Any) -> "Target":
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"format": FORMAT}
        for f in fields(self):
            v = getattr(self, f.name)
            data[f.name] = dict(v) if isinstance(v, Mapping) else v
        return data

    @classmethod
    def from_json(cls, data: Any, source: str = "target") -> "Target":
        if not isinstance(data, dict):
            raise UserInputError(f"{source}: expected a JSON object")
        if data.get("format") != FORMAT:
            raise UserInputError(f"{source}: format {data.get('format')!r} is not {FORMAT!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"format"})
        if unknown:
            raise UserInputError(f"{source}: unknown fields {', '.join(unknown)}")
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise UserInputError(f"{source}: {exc}") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Target":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserInputError(f"cannot read target file {str(path)!r}: {exc}".splitlines()[0]) from None
        return cls.from_json(data, source=f"target file {str(path)!r}")

    def summary(self) -> dict[str, Any]:
        """The numbers ``autocompress targets`` shows."""
        return {
            "name": self.name, "description": self.description, "threads": self.threads,
            "peak_gmacs": dict(self.peak_gmacs), "efficiency": dict(self.efficiency),
            "dram_gbs": self.dram_gbs, "cache_gbs": self.cache_gbs, "cache_bytes": self.cache_bytes,
            "llc_gbs": self.llc_gbs, "llc_bytes": self.llc_bytes, "gemm_k0": self.gemm_k0, "gemm_s0": self.gemm_s0,
            "int8_efficiency": self.int8_efficiency, "int8_class_efficiency": dict(self.int8_class_efficiency),
            "int8_pool_ns": self.int8_pool_ns, "block_fallback": self.block_fallback,
            "channel_block": self.channel_block,
            "channel_align": self.channel_align, "plain_efficiency": dict(self.plain_efficiency),
            "plain_pool_ns": self.plain_pool_ns, "math_ns": self.math_ns,
            "reorder_ns": self.reorder_ns, "view_overhead_us": self.view_overhead_us,
            "convert_ns": self.convert_ns, "dq_per_reader": self.dq_per_reader, "int8_fuses_add": self.int8_fuses_add,
            "fused_attention": self.fused_attention, "fuses_gelu": self.fuses_gelu,
            "sequence_linear_epilogue": self.sequence_linear_epilogue,
            "step_overhead_us": self.step_overhead_us,
            "out_ns": self.out_ns, "memory_overlap": self.memory_overlap, "cold_outputs": self.cold_outputs,
            "int8_out_ns": self.int8_out_ns, "gemv_from_cache": self.gemv_from_cache,
            "kernel_overhead_us": self.kernel_overhead_us, "elementwise_overhead_us": self.elementwise_overhead_us,
            "call_overhead_us": self.call_overhead_us, "fast_int8": self.fast_int8, "fast_fp16": self.fast_fp16,
            "calibrated": self.calibrated, "sources": dict(self.sources),
            "fitted_at": self.fit.get("fitted_at"), "held_out": self.fit.get("held_out"),
            "measure_cmd": self.measure_cmd, "prune_round_to": self.prune_round_to,
            "network_scale": dict(self.network_scale),
        }
