"""Fit a target's per-kernel-class coefficients to measured latencies.

``calibrate_local`` measures a designed set of layer configurations and small networks in ONNX Runtime
on this machine; ``calibrate_from_csv`` reads latencies measured elsewhere (on the device). Both fit, by
least squares on the log of predicted / measured latency: the efficiency of each kernel class, DRAM and
cache bandwidth, and the kernel, elementwise and per-call overheads. The peaks, cache size and energies
stay as the base target states them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

from autocompress.errors import UserInputError
from autocompress.hwmodels.calibrate._csv import CSV_COLUMNS, layer_table, read_csv_samples
from autocompress.hwmodels.calibrate._designed import (VARIANT_NETS, Built, Config, build_configs, build_variants,
                                                       designed_set, export_deployed, random_policy, time_built)
from autocompress.hwmodels.calibrate._fit import (FITTED_PARTS, LAYER_WEIGHT, PART_WEIGHT, FitProblem, Sample,
                                                  error_stats, fit_target, llc_choices, single_layer)
from autocompress.hwmodels.measure import measure_files, robust_ms, time_file
from autocompress.hwmodels.predict import predict
from autocompress.hwmodels.target import Target
from autocompress.hwmodels.targets import TARGETS, get_target, target_path

__all__ = [
    "CSV_COLUMNS", "FITTED_PARTS", "LAYER_WEIGHT", "PART_WEIGHT", "VARIANT_NETS", "Built", "Config", "FitProblem",
    "Sample", "build_configs", "build_variants", "calibrate_from_csv", "calibrate_local", "check", "designed_set",
    "error_stats", "export_deployed", "fit_target", "layer_table", "llc_choices", "measure_files", "random_policy",
    "read_csv_samples", "robust_ms", "single_layer", "time_built", "time_file",
]


def calibrate_local(threads: int = 1, quick: bool = False, models: Sequence[str] = (),
                    per_model: int = 12) -> tuple[Target, Path]:
    """Measure the designed set on this machine, fit ``local`` and save it in the cache dir.

    The designed set is layer configurations and small networks (``designed_set``) plus random
    compressed variants of small networks (``VARIANT_NETS``). ``models`` (specs as
    ``load_model`` takes them) add ``per_model`` random variants each of the networks the user
    will search, so the fit sees their layers in their context. Everything is timed together
    (``time_built``) and profiled per node.
    """
    if threads < 1:
        raise UserInputError(f"--threads must be >= 1, got {threads}")
    if per_model < 1:
        raise UserInputError(f"--variants must be >= 1, got {per_model}")
    base = TARGETS.get("local").with_(threads=threads)
    warmup, runs, rounds = (3, 10, 1) if quick else (10, 20, 4)
    with tempfile.TemporaryDirectory(prefix="autocompress-calibrate-") as tmp:
        # The user's models first, so a spec that does not load fails before minutes of work.
        built = build_variants([(m, None) for m in dict.fromkeys(models)], per_model, Path(tmp), seed=1)
        built += build_configs(designed_set(quick), Path(tmp))
        built += build_variants(VARIANT_NETS[:2] if quick else VARIANT_NETS, 2 if quick else 12, Path(tmp))
        samples = time_built(built, threads=threads, warmup=warmup, runs=runs, rounds=rounds, profile=True)
    searched = f" with variants of {', '.join(dict.fromkeys(models))}" if models else ""
    fitted = fit_target(base, samples, "local", llc_choices=llc_choices(base), layer_weight=LAYER_WEIGHT if models else 1.0,
                        sources_note=f"fitted by autocompress calibrate on this machine (ONNX Runtime, {threads} thread(s))"
                        + searched)
    fitted = fitted.with_(description=f"this machine through ONNX Runtime, {threads} intra-op thread(s); calibrated"
                          + searched)
    return fitted, fitted.save(target_path("local"))


def calibrate_from_csv(path: str | Path, name: str, base: str = "mobile") -> tuple[Target, Path]:
    """Fit ``base``'s coefficients to a CSV of on-device latencies; save as target ``name``."""
    if not name or not all(ch.isalnum() or ch in "-_." for ch in name):
        raise UserInputError(f"bad target name {name!r}: use letters, digits, '-', '_' or '.'")
    start = get_target(base)
    samples = read_csv_samples(path)
    fitted = fit_target(start, samples, name, sources_note=f"fitted by autocompress calibrate --from-csv {Path(path).name}")
    if name != base:
        fitted = fitted.with_(description=f"calibrated from {Path(path).name} (starting from {base})")
    return fitted, fitted.save(target_path(name))


def check(target: Target | str, samples: Sequence[Sample]) -> dict[str, float]:
    """Error statistics of ``target``'s predictions on measured samples (for scoring held-out data)."""
    t = get_target(target)
    return error_stats([predict(s.table, t, s.batch).latency_ms for s in samples], [s.measured_ms for s in samples])
