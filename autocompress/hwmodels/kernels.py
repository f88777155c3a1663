"""What a runtime runs for a CostTable: fused kernels and standalone ops (``fusion.structure`` builds them)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

# Memory levels: where a working set fits.
CACHE, LAST_LEVEL_CACHE, DRAM = 0, 1, 2
CONVERSION_BYTES_PER_ELEMENT = 5  # a Quantize/DequantizeLinear reads or writes 4 + 1 bytes per element


@dataclass(frozen=True)
class Kernel:
    """One fused kernel. MACs, bytes, output positions and elements include the batch."""

    head: str  # the conv/linear row that heads it
    kernel_class: str  # one of target.KERNEL_CLASSES
    dtype: str  # one of target.DTYPES
    padded_macs: float  # MACs with channels rounded up to whole channel blocks
    macs: int
    bytes_moved: float  # weights, inputs (a fused add's too) and output, each at the width the kernel runs at
    memory_level: int  # where its traffic fits: CACHE, LAST_LEVEL_CACHE or DRAM
    rf_bits_per_mac: int  # register-file bits per MAC (weight bits + 3 x activation bits), for energy
    weight_bytes: float
    reduction_length: int  # K: input channels per group x kernel area
    output_positions: int  # S
    conversion_bytes: float  # the int8 <-> float conversions it pays for
    conversions: int
    reordered_elements: float  # the layout reorders of its inputs it pays for
    reorders: int
    output_elements: int
    plain: bool  # a plain (unblocked) kernel where the runtime prefers blocked ones
    weight_level: int  # where its weights come from
    # Dependent kernels it stands for, each paying a dispatch: 1 for a fused conv/linear; Q.K^T, softmax
    # and .V for unfused attention; one runtime op per layer of an RNN.
    launches: int = 1
    steps: int = 0  # dependent steps inside the op (an RNN's time steps x layers x directions), each synchronised
    math_elements: int = 0  # elements of arithmetic-heavy work inside it (attention's softmax: ``Target.math_ns``)
    output_bytes: float = 0.0  # of bytes_moved: the output it writes
    output_level: int = CACHE  # where its output is written (``Target.cold_outputs``)

    @property
    def activation_bytes(self) -> float:
        return self.bytes_moved - self.weight_bytes


@dataclass(frozen=True)
class StandaloneOp:
    """A row that runs on its own: memory traffic plus a dispatch. Bytes and elements include the batch."""

    name: str
    bytes_moved: float  # inputs and output, plus conversion_bytes
    memory_level: int
    output_elements: int
    view: bool  # a reshape that is a view: dispatch only
    conversions: int
    slow_pool_elements: int  # output elements of a windowed pool on uint8 NCHW tensors (a slow kernel)
    reordered_elements: float
    reorders: int
    conversion_bytes: float
    plain_pool_elements: int  # output elements of a windowed float pool in the plain layout
    math_elements: int = 0  # output elements of an op heavy in arithmetic (``Target.math_ns``)

    @property
    def traffic_bytes(self) -> float:
        """Bytes moved besides the conversions."""
        return self.bytes_moved - self.conversion_bytes


@dataclass(frozen=True)
class Structure:
    """The kernels and standalone ops of a table on a target, in table order."""

    kernels: tuple[Kernel, ...]
    ops: tuple[StandaloneOp, ...]
    kernel_of: Mapping[str, str]  # row name -> the head of the kernel it is part of


def kernel_class(op: str, in_ch: int, groups: int, kernel: tuple[int, ...]) -> str:
    """The efficiency class of a conv (of any number of dims) or linear layer."""
    if op == "linear":
        return "linear"
    if groups > 1:
        return "depthwise" if groups == in_ch else "grouped"
    return "pointwise" if math.prod(kernel) == 1 else "conv"
