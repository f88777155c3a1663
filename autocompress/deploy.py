"""What we ship, timed and scored: the output folder's ONNX files measured in ONNX Runtime on this machine,
their metric through ONNX Runtime, and the search's finalists timed where the target runs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

from autocompress.export.artifacts import deployed_file
from autocompress.export.onnx import export_onnx
from autocompress.hwmodels.device import Timing
from autocompress.hwmodels.measure import measure_files
from autocompress.hwmodels.targets import get_target


def measure_local(paths: Sequence[str | os.PathLike]) -> list[float]:
    """Quiet ONNX Runtime latency (ms) of each file on this machine, at the ``local`` target's thread
    count: ``calibrate.measure_files``, the files interleaved over 4 passes, so a slow stretch of a
    shared machine does not fall on one of them only, and the latency is what ``local`` predicts."""
    threads = int(get_target("local").to_json().get("threads", 1) or 1)
    return measure_files([Path(p) for p in paths], threads=threads)


def record_measured(folder: Path, teacher: Any, example: Any, best: dict[str, Any], baseline: dict[str, Any],
                    static_shapes: bool = False) -> None:
    """Time the output folder's fp32 (and int8) model beside the original model (exported with the same
    ``static_shapes``) with ``measure_local`` and record ``measured_latency_ms_local[_int8]`` in ``best``
    and ``baseline``."""
    base_onnx = export_onnx(teacher, example, folder / ".baseline.onnx", static_shapes=static_shapes)
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


DEPLOYED_FILES = ("model.onnx", "model.int8.onnx", "model.fp16.onnx")
GAP_FLAG = 0.01  # a shipped file more than 1 point (0.01 of the metric) below the PyTorch model is flagged


def deployed_accuracy(folder: Path, score: Callable[[Any], float], model: Any, example: Any) -> dict[str, float | None]:
    """The held-out metric of each shipped ONNX file, run through ONNX Runtime (None where it cannot be scored)."""
    from autocompress.export.ort_module import OrtModule

    out: dict[str, float | None] = {}
    for name in DEPLOYED_FILES:
        if not (folder / name).exists():
            continue
        try:
            out[name] = float(score(OrtModule(folder / name, like=model, example=example)))
        except Exception:  # a file ONNX Runtime cannot run, or a metric that breaks on it: reported as unscored
            out[name] = None
    return out


def deployed_gaps(simulated: float, deployed: dict[str, float | None]) -> list[str]:
    """Notes for shipped files whose metric is more than GAP_FLAG below the simulated model's (or unscored)."""
    notes = []
    for name, value in deployed.items():
        if value is None:
            notes.append(f"{name} could not be scored through ONNX Runtime")
        elif simulated - value > GAP_FLAG:
            notes.append(f"{name} scores {value:.4f} through ONNX Runtime, {simulated - value:.4f} below the "
                         f"simulated model's {simulated:.4f}")
    return notes


# ---- the finalists timed where the target runs ------------------------------------------------------

def time_deployed(models: Sequence[Any], example: Any, timer: Callable[[Path], float], *, calibration: Any = None,
                  int8: bool = True, fp16: bool = False, baseline: Any = None, rounds: int = 3,
                  static_shapes: bool = False) -> tuple[list[tuple[str, Timing]], Timing | None]:
    """Each model's deployed file (``deployed_file``) and, with ``baseline``, the original model's fp32
    file, timed by ``timer`` in ``rounds`` interleaved passes: [(file name, Timing)] and the baseline's
    Timing. Where the deployed file is the int8 or fp16 one, the model's fp32 file is timed too and the
    faster of the two is the one returned: small int8 layers can lose more to conversions than their
    kernels save, and both files ship. A model that cannot be exported or timed gets a Timing with the
    reason, not an exception. ``static_shapes``: the files as shipped (``export_onnx``)."""
    import tempfile

    from autocompress.hwmodels.device import time_rounds

    with tempfile.TemporaryDirectory(prefix="autocompress-finalists-") as tmp:
        files: list[list[Path]] = []  # per model: the deployed file, then its fp32 file where they differ
        errors: list[str] = []
        for i, model in enumerate([*models, *([baseline] if baseline is not None else [])]):
            folder = Path(tmp) / str(i)
            folder.mkdir()
            try:
                finalist = i < len(models)  # the baseline is timed as its fp32 file
                path = deployed_file(model, example, folder, calibration, int8=int8 and finalist,
                                     fp16=fp16 and finalist, static_shapes=static_shapes)
                files.append([path] + ([folder / "model.onnx"] if path.name != "model.onnx" else []))
                errors.append("")
            except Exception as exc:  # one finalist that does not export is reported, the others still timed
                files.append([])
                errors.append(f"export failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        timed = iter(time_rounds([f for group in files for f in group], timer, rounds))
        chosen: list[tuple[str, Timing]] = []
        for group, error in zip(files, errors):
            if not group:
                chosen.append(("model.onnx", Timing(None, error=error)))
                continue
            options = [(f.name, next(timed)) for f in group]
            measured = [o for o in options if o[1].latency_ms is not None]
            chosen.append(min(measured, key=lambda o: o[1].latency_ms) if measured else options[0])
    out = chosen[:len(models)]
    return out, (chosen[-1][1] if baseline is not None else None)
