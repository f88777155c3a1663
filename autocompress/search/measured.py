"""Budgets met by measurement: the finalists' deployed files timed where the target runs, and the pick
repaired when every finalist is over.

``measured_choice`` times the finalists (and, for a relative budget, the original model in the same
rounds, which sets the limit) and takes the first within the budget. When none is, ``measured_repair``
allocates the pick again under a tighter predicted limit, fine-tunes and times it, for a few rounds.
A repair is timed beside the original model again, so a machine that got busier between the rounds
moves the limit with it; and a repair that would give up more than ``repair_max_drop`` points of the
metric is not taken: the pick is returned, marked over.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from autocompress.search.core import Candidate, SearchConfig, TrialEvent, metric_label, points
from autocompress.search.screen import Screen
from autocompress.space.policy import Policy

MEASURED_REPAIRS = 2  # rounds of re-allocation when no finalist is within the budget by measurement
REPAIR_MARGIN = 0.95  # aim under the measured limit: the correction is read off one policy and applied to another
WITHIN_RULE = "median of the timings <= limit + spread (half their range)"


def within_limit(timing: Any, limit_ms: float | None) -> bool | None:
    """``WITHIN_RULE``; None where the file or the limit could not be measured."""
    if timing.latency_ms is None or limit_ms is None:
        return None
    return timing.latency_ms <= limit_ms + timing.spread_ms


def measured_limit(budget: Any, baseline: Any) -> float | None:
    """The latency limit by measurement: the absolute one, or the relative share of the original model's
    timing (``baseline``), the tighter where both are set; None where neither can be had."""
    limits = [budget.latency_ms] if budget.latency_ms is not None else []
    if budget.relative is not None and baseline is not None and baseline.latency_ms is not None:
        limits.append(budget.relative * baseline.latency_ms)
    return min(limits) if limits else None


@dataclass(frozen=True)
class MeasuredRepair:
    """The pick by prediction re-allocated under a tighter predicted latency limit, fine-tuned and timed."""

    trial: int  # the finalist repaired
    latency_scale: float  # the predicted latency limit it was allocated under, as a share of the budget's
    predicted_ms: float
    file: str
    timing: Any  # hwmodels.device.Timing
    limit_ms: float | None  # the measured limit it was judged against (re-timed baseline for a relative budget)
    accuracy: float  # selection metric after the full fine-tune
    baseline: Any = None  # the original model's Timing in the same rounds, for a relative budget
    taken: bool = False  # the one returned (within the budget and within --repair-max-drop)

    @property
    def within(self) -> bool | None:
        return within_limit(self.timing, self.limit_ms)

    def to_json(self) -> dict[str, Any]:
        out = {"trial": self.trial, "latency_scale": round(self.latency_scale, 4), "predicted_ms": self.predicted_ms,
               "accuracy_select": self.accuracy, "file": self.file, **self.timing.to_json(),
               "limit_ms": self.limit_ms, "within": self.within, "taken": self.taken}
        if self.baseline is not None:
            out["baseline"] = self.baseline.to_json()
        return out


@dataclass(frozen=True)
class MeasuredCheck:
    """The finalists' deployed files timed where the target runs, against the budget's latency limit.

    A finalist is within the budget by ``WITHIN_RULE``; ``feasible`` is that verdict for the returned
    model (None: not measured)."""

    feasible: bool | None
    by: str = ""
    limit_ms: float | None = None
    finalists: tuple[tuple[int, str, Any], ...] = ()  # (trial, file timed, hwmodels.device.Timing)
    baseline: Any = None  # the original model's Timing, for a relative budget
    reason: str = ""  # why nothing was measured
    repairs: tuple[MeasuredRepair, ...] = ()  # the pick re-allocated under tighter limits, when no finalist fit
    repair_stopped: str = ""  # why the repairs ended without one within the budget

    def within(self, timing: Any) -> bool | None:
        return within_limit(timing, self.limit_ms)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"feasible": self.feasible, "by": self.by, "limit_ms": self.limit_ms,
                               "rule": WITHIN_RULE,
                               "finalists": [{"trial": n, "file": f, **t.to_json(), "within": self.within(t)}
                                             for n, f, t in self.finalists]}
        if self.repairs:
            out["repairs"] = [r.to_json() for r in self.repairs]
        if self.repair_stopped:
            out["repair_stopped"] = self.repair_stopped
        if self.baseline is not None:
            out["baseline"] = self.baseline.to_json()
        if self.reason:
            out["reason"] = self.reason
        return out


@dataclass(frozen=True)
class Measuring:
    """A target and how it is timed here (``hwmodels.device.timer_for``; None where nothing here can)."""

    target: Any
    device: Any


def measured_choice(ranked: Sequence[tuple[Candidate, Any]], evaluator: Any, config: SearchConfig,
                    callback: Callable[[TrialEvent], None] = lambda e: None,
                    where: Measuring | None = None) -> tuple[int, MeasuredCheck | None]:
    """The index in ``ranked`` (finalists, best first) of the first one within the latency budget by
    measurement, or 0 (the pick by prediction) when none is; and the check. Nothing is timed where the
    target cannot be measured, the budget has no latency limit, or ``measure_finalists`` is off.
    ``where`` (default: ``measuring(config)``) is how the target is timed."""
    from autocompress.hwmodels import parse_budget

    if not config.measure_finalists:
        return 0, None
    where = where or measuring(config)
    target, device = where.target, where.device
    if device is None:
        return 0, MeasuredCheck(None, reason=f"{target.name} is not measured here: give --measure-cmd to time on it")
    budget = parse_budget(config.budget)
    if budget.latency_ms is None and budget.relative is None:
        return 0, MeasuredCheck(None, device.label, reason="the budget has no latency limit")
    timings, base = _time([s.model for _, s in ranked], evaluator, target, device,
                          baseline=evaluator.teacher if budget.relative is not None else None,
                          static_shapes=config.static_shapes)
    limit = measured_limit(budget, base)
    check = MeasuredCheck(None, device.label, limit,
                          tuple((c.number, f, t) for (c, _), (f, t) in zip(ranked, timings)), base,
                          "" if limit is not None else f"the original model could not be timed for the relative "
                                                       f"budget: {base.error if base is not None else ''}")
    verdicts = [check.within(t) for _, _, t in check.finalists]
    for (n, f, t), ok in zip(check.finalists, verdicts):
        said = _timing_words(f, t, ok, check.limit_ms)
        callback(TrialEvent(n, "final", config.trials, config.trials, ranked[0][1].accuracy, "finalists",
                            f"trial {n}: {said}"))
    pick = next((i for i, ok in enumerate(verdicts) if ok), 0)
    return pick, replace(check, feasible=verdicts[pick] if verdicts else None)


def measured_repair(chosen: Candidate, policy: Policy, scored: Any, timing: Any, check: MeasuredCheck, evaluator: Any,
                    screen: Screen, config: SearchConfig, tighten: Callable[[Candidate, float], Policy | None],
                    callback: Callable[[TrialEvent], None] = lambda e: None,
                    rounds: int = MEASURED_REPAIRS, where: Measuring | None = None) -> tuple[Policy, Any, MeasuredCheck]:
    """The pick re-allocated under a predicted latency limit shrunk by what measurement showed (measured
    limit / measured of the last policy timed), fine-tuned at full fidelity and timed, for up to
    ``rounds`` rounds: the first within the budget by measurement is returned with the check's verdict
    true. A repair that scores more than ``config.repair_max_drop`` points below the pick ends the
    rounds. When none is returned, the pick by prediction comes back unchanged, marked over, and the
    attempts and why they stopped are on record."""
    from autocompress.hwmodels import parse_budget

    where = where or measuring(config)
    target, device = where.target, where.device
    limit_pred = screen.budget.latency_ms
    if device is None or not limit_pred or check.limit_ms is None:
        return policy, scored, check
    budget = parse_budget(config.budget)
    label = metric_label(evaluator)
    repairs: list[MeasuredRepair] = []
    tried = [policy]
    last_policy, last_timing, last_limit, scale = policy, timing, check.limit_ms, 1.0
    stopped = ""
    for _ in range(rounds):
        if last_timing.latency_ms is None or last_timing.latency_ms <= 0:
            stopped = "the last repair could not be measured"
            break
        predicted = float(screen.costs(last_policy)["latency_ms"])
        wanted = min(scale, predicted / limit_pred) * min(1.0, last_limit / last_timing.latency_ms) * REPAIR_MARGIN
        floor = screen.lowest["latency_ms"] / limit_pred * 1.02  # as far as the space reaches, if not as far as asked
        if floor >= min(scale, predicted / limit_pred):
            stopped = "the space reaches no lower predicted latency"
            break
        scale = max(wanted, floor)
        candidate = tighten(chosen, scale)
        if candidate is None or candidate in tried:
            stopped = f"no other policy meets {scale:.2f}x of the predicted latency limit"
            callback(TrialEvent(chosen.number, "final", config.trials, config.trials, chosen.accuracy, "finalists",
                                f"trial {chosen.number}: {stopped}; not repaired"))
            break
        tried.append(candidate)
        new_scored = evaluator(candidate, config.full_epochs)
        ((name, t),), base = _time([new_scored.model], evaluator, target, device,
                                   baseline=evaluator.teacher if budget.relative is not None else None,
                                   static_shapes=config.static_shapes)
        limit = measured_limit(budget, base) if budget.relative is not None else check.limit_ms
        repair = MeasuredRepair(chosen.number, scale, float(screen.costs(candidate)["latency_ms"]), name, t,
                                limit, float(new_scored.accuracy), base)
        repairs.append(repair)
        drop = points(float(scored.accuracy) - repair.accuracy)
        callback(TrialEvent(chosen.number, "final", config.trials, config.trials, chosen.accuracy, "finalists",
                            f"trial {chosen.number} repaired to {scale:.2f}x of the predicted latency limit "
                            f"({label} {repair.accuracy:.4f}): {_timing_words(name, t, repair.within, limit)}"))
        if drop > config.repair_max_drop:
            stopped = (f"the repair to {scale:.2f}x scored {drop:.1f} points of {label} below the pick, more than "
                       f"--repair-max-drop {config.repair_max_drop:g}")
            callback(TrialEvent(chosen.number, "final", config.trials, config.trials, chosen.accuracy, "finalists",
                                f"{stopped}: not taken; the pick is returned, over the budget by measurement"))
            break
        if repair.within:
            repairs[-1] = replace(repair, taken=True)
            return candidate, new_scored, replace(check, feasible=True, repairs=tuple(repairs))
        last_policy, last_timing, last_limit = candidate, t, limit if limit is not None else last_limit
    if repairs and not stopped:
        stopped = f"{len(repairs)} repair(s) were over the budget by measurement too"
    return policy, scored, replace(check, repairs=tuple(repairs), repair_stopped=stopped)


def measuring(config: SearchConfig) -> Measuring:
    """The search's target and how it is timed here."""
    from autocompress.hwmodels import get_target
    from autocompress.hwmodels.device import timer_for

    target = get_target(config.target)
    return Measuring(target, timer_for(target, config.measure_cmd,
                                       config.measure_timeout_s if config.measure_cmd else None))


def _time(models: Sequence[Any], evaluator: Any, target: Any, device: Any, baseline: Any = None,
          static_shapes: bool = False) -> tuple[list, Any]:
    """``deploy.time_deployed`` with the files the target would run."""
    from autocompress.deploy import time_deployed

    return time_deployed(models, evaluator.example, device.timer, calibration=getattr(evaluator, "calibration", None),
                         int8=target.fast_int8, fp16=target.fast_fp16, baseline=baseline,
                         static_shapes=static_shapes)


def _timing_words(name: str, t: Any, ok: bool | None, limit_ms: float | None) -> str:
    if t.latency_ms is None:
        return f"{name} not measured: {t.error}"
    verdict = f" against {limit_ms:.4g} ms: " + ("within the budget" if ok else "over the budget") if ok is not None else ""
    return f"{name} measured {t.latency_ms:.4g} ± {t.spread_ms:.2g} ms{verdict}"
