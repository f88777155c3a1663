"""What we ship, timed: the output folder's ONNX files measured in ONNX Runtime on this machine."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from autocompress.export.onnx import export_onnx
from autocompress.hwmodels.measure import measure_files
from autocompress.hwmodels.targets import get_target


def measure_local(paths: Sequence[str | os.PathLike]) -> list[float]:
    """Quiet ONNX Runtime latency (ms) of each file on this machine, at the ``local`` target's thread
    count: ``calibrate.measure_files``, the files interleaved over 4 passes, so a slow stretch of a
    shared machine does not fall on one of them only, and the latency is what ``local`` predicts."""
    threads = int(get_target("local").to_json().get("threads", 1) or 1)
    return measure_files([Path(p) for p in paths], threads=threads)


def record_measured(folder: Path, teacher: Any, example: Any, best: dict[str, Any], baseline: dict[str, Any]) -> None:
    """Time the output folder's fp32 (and int8) model beside the original model with ``measure_local``
    and record ``measured_latency_ms_local[_int8]`` in ``best`` and ``baseline``."""
    base_onnx = export_onnx(teacher, example, folder / ".baseline.onnx")
    try:
        keys = {"best": folder / "model.onnx", "best_int8": folder / "model.int8.onnx", "baseline": base_onnx}
        keys = {k: p for k, p in keys.items() if p.exists()}
        ms = dict(zip(keys, measure_local(list(keys.values()))))
    finally:
        base_onnx.unlink(missing_ok=True)
    best["measured_latency_ms_local"] = ms["best"]
    if "best_int8" in ms:
        best["measured_latency_ms_local_int8"] = ms["best_int8"]
    baseline["measured_latency_ms_local"] = ms["baseline"]
