"""Which pruned widths run fast on this machine: the multiple that calibration sets as ``prune_round_to``.

A conv whose channel count is not a multiple of the runtime's channel block runs a padded or a plain
kernel, so pruning to such a width costs accuracy and buys no speed (ONNX Runtime on an AVX2 core:
a 3x3 conv pair at 42 channels 1.20 ms, at 48 channels 0.93 ms; docs/hwmodels.md). The probe times
one conv pair at every width of a range and keeps the multiple whose padded staircase fits the
timings best.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

PROBE_WIDTHS = tuple(range(40, 65))  # every residue modulo 16, with multiples of 16 on both sides
CANDIDATES = (16, 8, 4, 2)


@dataclass(frozen=True)
class WidthProbe:
    """Measured latency (ms) per probed width, and the multiple chosen from them."""

    widths: tuple[int, ...]
    ms: tuple[float, ...]
    round_to: int

    def to_json(self) -> dict[str, object]:
        return {"widths": list(self.widths), "ms": [round(m, 4) for m in self.ms], "round_to": self.round_to}


def staircase_loss(timings: Mapping[int, float], r: int) -> float:
    """Least-squares misfit of log latency as a straight line in the log of the width rounded up to ``r``."""
    import numpy as np

    widths = np.array(sorted(timings), dtype=float)
    y = np.log([timings[int(w)] for w in widths])
    x = np.stack([np.ones_like(widths), np.log(np.ceil(widths / r) * r)], axis=1)
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return float(np.sum((x @ coef - y) ** 2))


def choose_round_to(timings: Mapping[int, float]) -> int:
    """The multiple ``r`` whose padded staircase fits the timings best (``staircase_loss``). A larger
    multiple must fit more than 1 % better than a smaller one (widths that run at their own speed fit ``r = 1``).

    A fit over every width, not a threshold per width: on a busy machine single timings are off by
    10 % and more, but the staircase shows through them (three loaded runs on an AVX2 core gave 8, 8, 4)."""
    best, best_loss = 1, math.inf
    for r in (1, *sorted(CANDIDATES)):
        loss = staircase_loss(timings, r)
        if loss < 0.99 * best_loss:
            best, best_loss = r, loss
    return best


def conv_pair(width: int, path: Path, channels: int = 64, size: int = 28) -> Path:
    """An ONNX file of Conv 3x3 (channels -> width), Relu, Conv 3x3 (width -> channels) on a size x size input,
    written with onnx.helper (milliseconds; a torch export costs ~0.6 s per file)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(width)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.05).astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2", "b2"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(
        nodes, f"conv-pair-{width}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, size, size])],
        [weight("w1", width, channels, 3, 3), weight("b1", width), weight("w2", channels, width, 3, 3),
         weight("b2", channels)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def probe_widths(folder: Path, threads: int = 1, rounds: int = 3,
                 progress: Callable[[str], None] | None = None) -> WidthProbe:
    """Time the conv pair (64 -> w -> 64 channels, 28 x 28) at each of ``PROBE_WIDTHS`` in ONNX Runtime."""
    from autocompress.hwmodels.measure import measure_files

    if progress is not None:
        progress(f"timing a conv pair at {len(PROBE_WIDTHS)} widths (which pruned widths run fast)")
    paths = [conv_pair(w, folder / f"width-{w}.onnx") for w in PROBE_WIDTHS]
    ms = measure_files(paths, threads=threads, rounds=rounds)
    return WidthProbe(PROBE_WIDTHS, tuple(ms), choose_round_to(dict(zip(PROBE_WIDTHS, ms))))
