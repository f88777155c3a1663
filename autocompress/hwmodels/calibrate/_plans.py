"""What one calibration measures: the designed configurations, random variants in the fit, and held-out
variants that only check it, built, exported and timed together."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from autocompress.hwmodels.calibrate._designed import (VARIANT_NETS, Built, Config, build_configs, build_variants,
                                                       designed_set, time_built)
from autocompress.hwmodels.calibrate._fit import Sample
from autocompress.hwmodels.measure import profile_onnx

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Plan:
    """A calibration's measurements. Each of ``variant_nets`` gives ``per_net`` random variants to the
    fit and ``held_out_per_net`` more (drawn after them) that the fit never sees and that score it."""

    name: str
    configs: Callable[[], list[Config]]
    variant_nets: tuple[tuple[str, tuple[int, ...] | None], ...]
    per_net: int
    held_out_per_net: int
    warmup: int
    runs: int
    rounds: int
    kinds: tuple[str, ...] = ()  # decision kinds the variants draw from (empty: all)
    profile: bool = True  # per-node ONNX Runtime profiles for the parts the fit also matches
    llc_tries: int = 0  # the largest last-level cache sizes the fit tries (0: every one ``llc_choices`` gives)
    widths: int = 3  # passes of the pruned-width probe (``_widths``) that sets prune_round_to; 0: none


# Low-rank decisions add up to ~1.5 s of factorisation per ResNet-18 variant on two cores, so the short
# plans' variants draw every other kind; its factor convs are plain convs the designed configurations cover.
_NO_RANK = ("prune", "wbits", "abits", "merge", "branch", "heads", "drop")

PLANS = {
    "full": Plan("full", lambda: designed_set(False), VARIANT_NETS, 12, 1, 10, 20, 4),
    "quick": Plan("quick", lambda: designed_set(True), VARIANT_NETS[:2], 2, 2, 3, 10, 1, kinds=_NO_RANK, llc_tries=2,
                  widths=2),
    "first-use": Plan("first-use", lambda: designed_set(True), VARIANT_NETS[:2], 2, 2, 3, 10, 2, kinds=_NO_RANK,
                      llc_tries=2, widths=2),
}


class _Stages:
    """Progress lines: one per stage, and one at each quarter of a long stage (a log stays short)."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress or (lambda text: None)
        self.what, self.total, self.done, self.quarter = "", 0, 0, 0

    def start(self, what: str, total: int) -> None:
        self.what, self.total, self.done, self.quarter = what, total, 0, 0
        self.progress(f"{what}: 0/{total}")

    def step(self, done: int | None = None) -> None:
        self.done = self.done + 1 if done is None else done
        quarter = math.floor(4 * self.done / max(1, self.total))
        if quarter > self.quarter:
            self.quarter = quarter
            self.progress(f"{self.what}: {min(self.done, self.total)}/{self.total}")


def measure_plan(plan: Plan, folder: Path, *, threads: int = 1, models: Sequence[str] = (), per_model: int = 12,
                 measure: Callable[[Path], float] | None = None,
                 progress: Progress | None = None) -> tuple[list[Sample], list[Sample]]:
    """(fit samples, held-out samples) of ``plan``, every file timed in the same interleaved passes.

    ``models`` (specs) add ``per_model`` variants each to the fit; ``measure`` times a file elsewhere
    (a device command; then nothing is profiled)."""
    stages = _Stages(progress)
    nets = list(dict.fromkeys(models))
    configs = plan.configs()
    per = plan.per_net + plan.held_out_per_net
    stages.start("exporting configurations and variants",
                 len(nets) * per_model + len(configs) + len(plan.variant_nets) * per)
    # The user's models first, so a spec that does not load fails before minutes of work.
    fit = build_variants([(m, None) for m in nets], per_model, folder, seed=1, on_built=stages.step)
    fit += build_configs(configs, folder, on_built=stages.step)
    held: list[Built] = []
    for net in plan.variant_nets:
        built = build_variants([net], per, folder, kinds=plan.kinds, on_built=stages.step)
        fit += built[:plan.per_net]
        held += built[plan.per_net:]
    everything = fit + held
    rounds = plan.rounds
    stages.start(f"timing {len(everything)} files ({rounds} pass{'es' if rounds > 1 else ''} or more)",
                 rounds * len(everything))
    samples = time_built(everything, threads=threads, warmup=plan.warmup, runs=plan.runs, rounds=rounds,
                         profile=False, measure=measure, on_timed=stages.step)
    fitted, held_out = samples[:len(fit)], samples[len(fit):]
    if plan.profile and measure is None:  # only the fit reads profiles
        stages.start("profiling per node", len(fit))
        for s, b in zip(fitted, fit):
            s.parts = profile_onnx(b.path, threads=threads)
            stages.step()
    return fitted, held_out


def llc_tries(plan: Plan, choices: Sequence[int]) -> list[int]:
    """The cache sizes a plan's fit tries: the largest ``plan.llc_tries`` of ``choices`` (all for 0)."""
    return list(choices)[-plan.llc_tries:] if plan.llc_tries else list(choices)
