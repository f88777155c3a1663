"""Fit a target's per-kernel-class coefficients to measured latencies.

``calibrate_local`` measures a designed set of layer configurations and small networks in ONNX Runtime
on this machine; ``calibrate_device`` sends the same files through a user's command that times them on
a device; ``calibrate_from_csv`` reads latencies measured elsewhere. All fit, by
least squares on the log of predicted / measured latency: the efficiency of each kernel class, DRAM and
cache bandwidth, and the kernel, elementwise and per-call overheads. The peaks, cache size and energies
stay as the base target states them. A measured fit ends by scoring itself on held-out variants
(``fit["held_out"]``), beside when (``fit["fitted_at"]``) and how it was measured.
"""

from __future__ import annotations

import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from autocompress.errors import UserInputError
from autocompress.hwmodels.calibrate._csv import CSV_COLUMNS, layer_table, read_csv_samples
from autocompress.hwmodels.calibrate._designed import (VARIANT_NETS, Built, Config, build_configs, build_variants,
                                                       designed_set, export_deployed, model_variants, random_policy,
                                                       spec_of_variant, time_built)
from autocompress.hwmodels.calibrate._fit import (FITTED_PARTS, LAYER_WEIGHT, PART_WEIGHT, FitProblem, Sample,
                                                  error_stats, fit_target, llc_choices, network_scales, single_layer)
from autocompress.hwmodels.calibrate._network import SCALE_VARIANTS, NetworkScale, ensure_network_scale
from autocompress.hwmodels.calibrate._plans import PLANS, Plan, Progress, llc_tries, measure_plan
from autocompress.hwmodels.calibrate._widths import WidthProbe, choose_round_to, probe_widths
from autocompress.hwmodels.device import MeasureCommand
from autocompress.hwmodels.measure import measure_files, robust_ms, time_file
from autocompress.hwmodels.predict import predict
from autocompress.hwmodels.target import Target
from autocompress.hwmodels.targets import TARGETS, get_target, target_path

__all__ = [
    "CSV_COLUMNS", "FITTED_PARTS", "LAYER_WEIGHT", "PART_WEIGHT", "PLANS", "SCALE_VARIANTS", "VARIANT_NETS", "Built",
    "Config", "FitProblem", "NetworkScale", "Plan", "Sample", "build_configs", "build_variants", "calibrate_device",
    "calibrate_from_csv", "ensure_network_scale", "model_variants",
    "calibrate_local", "check", "choose_round_to", "designed_set", "measure_plan", "probe_widths", "WidthProbe",
    "error_stats", "export_deployed", "fit_target", "layer_table", "llc_choices", "measure_files", "network_scales",
    "random_policy",
    "read_csv_samples", "robust_ms", "single_layer", "time_built", "time_file",
]


def calibrate_local(threads: int = 1, quick: bool = False, models: Sequence[str] = (),
                    per_model: int = 12, plan: Plan | str | None = None,
                    progress: Progress | None = None) -> tuple[Target, Path]:
    """Measure a plan's designed set on this machine, fit ``local``, check it on held-out variants and
    save it in the cache dir.

    The plan (``PLANS``: ``full``, or ``quick`` with ``quick=True``) is layer configurations and
    small networks (``designed_set``) plus random compressed variants of small networks
    (``VARIANT_NETS``), some held out of the fit to score it. ``models`` (specs as ``load_model``
    takes them) add ``per_model`` random variants each of the networks the user will search, so the
    fit sees their layers in their context. Everything is timed together (``time_built``) and
    profiled per node. ``progress`` hears a line per stage.
    """
    if threads < 1:
        raise UserInputError(f"--threads must be >= 1, got {threads}")
    if per_model < 1:
        raise UserInputError(f"--variants must be >= 1, got {per_model}")
    plan = _plan(plan, quick)
    base = TARGETS.get("local").with_(threads=threads)
    with tempfile.TemporaryDirectory(prefix="autocompress-calibrate-") as tmp:
        fit, held = measure_plan(plan, Path(tmp), threads=threads, models=models, per_model=per_model,
                                 progress=progress)
        widths = (probe_widths(Path(tmp), threads=threads, rounds=plan.widths, progress=progress)
                  if plan.widths else None)
    searched = f" with variants of {', '.join(dict.fromkeys(models))}" if models else ""
    fitted = _fit_and_check(base, fit, held, "local", plan, progress, llc=llc_tries(plan, llc_choices(base)),
                            layer_weight=LAYER_WEIGHT if models else 1.0, models=models,
                            note=f"fitted by autocompress calibrate on this machine (ONNX Runtime, {threads} "
                                 f"thread(s)){searched}", measured_by=f"ONNX Runtime, {threads} thread(s)")
    fitted = fitted.with_(description=f"this machine through ONNX Runtime, {threads} intra-op thread(s); calibrated"
                          + searched)
    if widths is not None:
        fitted = fitted.with_(prune_round_to=widths.round_to, fit={**fitted.fit, "widths": widths.to_json()},
                              sources={**fitted.sources, "prune_round_to": f"measured by calibration: a 3x3 conv pair "
                                       f"at {widths.widths[0]}-{widths.widths[-1]} channels runs as a staircase of "
                                       f"multiples of {widths.round_to}"})
    return fitted, fitted.save(target_path("local"))


def calibrate_device(name: str, command: MeasureCommand, base: str = "mobile", quick: bool = False,
                     models: Sequence[str] = (), per_model: int = 12,
                     progress: Progress | None = None) -> tuple[Target, Path]:
    """Fit target ``name`` to a device: the plan's files are timed by ``command`` (``--measure-cmd``),
    the fit starts from ``base`` (for ``local``, the built-in ``local``), and the saved target keeps
    the command, so a search on it times its finalists there too."""
    _check_name(name)
    start = TARGETS.get("local") if name == "local" else get_target(base)
    plan = _plan(None, quick)
    with tempfile.TemporaryDirectory(prefix="autocompress-calibrate-") as tmp:
        fit, held = measure_plan(plan, Path(tmp), models=models, per_model=per_model, measure=command,
                                 progress=progress)
    fitted = _fit_and_check(start.with_(measure_cmd=command.template, measure_timeout_s=command.timeout_s), fit, held,
                            name, plan, progress, llc=(), layer_weight=LAYER_WEIGHT if models else 1.0, models=models,
                            note=f"fitted by autocompress calibrate --measure-cmd {command.template!r}",
                            measured_by=f"--measure-cmd {command.template!r}")
    if name != start.name:
        fitted = fitted.with_(description=f"measured by --measure-cmd (starting from {start.name})")
    return fitted, fitted.save(target_path(name))


def _plan(plan: Plan | str | None, quick: bool) -> Plan:
    if isinstance(plan, Plan):
        return plan
    name = plan or ("quick" if quick else "full")
    if name not in PLANS:
        raise UserInputError(f"unknown calibration plan {name!r}; valid: {', '.join(PLANS)}")
    return PLANS[name]


def _fit_and_check(base: Target, fit: Sequence[Sample], held: Sequence[Sample], name: str, plan: Plan,
                   progress: Progress | None, *, llc: Sequence[int], layer_weight: float, note: str,
                   measured_by: str, models: Sequence[str] = ()) -> Target:
    """Fit ``base`` to ``fit`` (trying last-level cache sizes ``llc``), scale each of ``models`` by
    the bias left on its own variants (``network_scales``) and record when, how, and how well it
    predicts the held-out samples."""
    if progress is not None:
        progress(f"fitting {len(fit)} measurements")
    fitted = fit_target(base, fit, name, llc_choices=llc, layer_weight=layer_weight, sources_note=note)
    searched = set(models)
    mine = [s for s in fit if spec_of_variant(s.name) in searched]
    scales = network_scales(fitted, mine)
    if scales:
        fitted = fitted.with_(network_scale=scales, sources={
            **fitted.sources, "network_scale": "measured / predicted latency, median over each searched network's "
                                               "own calibration variants"})
    held_out = check(fitted, held) if held else {"samples": 0}
    stats = dict(fitted.fit)
    by_model = {spec_of_variant(s.name): scales[s.table.network] for s in mine if s.table.network in scales}
    if by_model:  # the same scales by model spec, for people (the target keys them by fingerprint)
        stats["network_scale_by_model"] = by_model
    stats.update(fitted_at=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), plan=plan.name,
                 measured_by=measured_by,
                 held_out={k: (round(v, 4) if isinstance(v, float) else v) for k, v in held_out.items()})
    return fitted.with_(fit=stats)


def _check_name(name: str) -> None:
    if not name or not all(ch.isalnum() or ch in "-_." for ch in name):
        raise UserInputError(f"bad target name {name!r}: use letters, digits, '-', '_' or '.'")


def calibrate_from_csv(path: str | Path, name: str, base: str = "mobile") -> tuple[Target, Path]:
    """Fit ``base``'s coefficients to a CSV of on-device latencies; save as target ``name``."""
    _check_name(name)
    start = get_target(base)
    samples = read_csv_samples(path)
    fitted = fit_target(start, samples, name, sources_note=f"fitted by autocompress calibrate --from-csv {Path(path).name}")
    fitted = fitted.with_(fit={**fitted.fit, "fitted_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                               "plan": "csv", "measured_by": Path(path).name})
    if name != base:
        fitted = fitted.with_(description=f"calibrated from {Path(path).name} (starting from {base})")
    return fitted, fitted.save(target_path(name))


def check(target: Target | str, samples: Sequence[Sample]) -> dict[str, float]:
    """Error statistics of ``target``'s predictions on measured samples (for scoring held-out data)."""
    t = get_target(target)
    return error_stats([predict(s.table, t, s.batch).latency_ms for s in samples], [s.measured_ms for s in samples])
