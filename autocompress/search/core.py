"""The search, independent of the driver that proposes and schedules candidates.

A driver (``optuna_driver``: Optuna ask/tell on this machine or on a shared
RDB study; ``ray_backend``: Ray Tune on a cluster) proposes candidates,
screens each with :class:`~autocompress.search.screen.Screen` (an over-budget
one costs no training), fine-tunes the feasible ones briefly (``low_epochs``)
and hands the evaluated ones here as :class:`Candidate` records. The
finalists rung (successive halving with two rungs) fine-tunes the best
``finalists`` again at ``full_epochs``; the most accurate one is the result,
a :class:`SearchResult` that ``report.write_search_outputs`` writes out.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from autocompress.errors import TrialFailed, UserInputError
from autocompress.search.screen import Screen
from autocompress.space.policy import Policy

OBJECTIVES = {"accuracy": "maximize", "latency_ms": "minimize", "energy_mj": "minimize", "size_bytes": "minimize"}
SPACES = ("tradeoff", "layers")
DEFAULT_MODEL = "builtin:digits-net"
DEFAULT_DATA = {"builtin:digits-net": "sklearn:digits"}


@dataclass(frozen=True)
class SearchConfig:
    target: str = "mobile"
    budget: str = "5ms"
    trials: int = 32
    sampler: str = "tpe"
    seed: int = 0
    low_epochs: float = 0.5
    full_epochs: float = 4.0
    finalists: int = 3
    # Accuracy alone under the budget by default: the product's question. Adding cost objectives
    # makes the study multi-objective (a Pareto front), which pulls candidates below the budget.
    objectives: tuple[str, ...] = ("accuracy",)
    tie: tuple[str, ...] = ()
    seeds: bool = True  # enqueue uniform starting points in a fresh study
    # What the sampler searches: the allocation's trade-offs (``tradeoff``) or one parameter per decision.
    space: str = "tradeoff"
    # Accuracy-bounded mode: the cheapest model (by ``minimise``) within ``max_drop`` points of the baseline.
    max_drop: float | None = None
    minimise: str = "latency_ms"
    # Multi-fidelity on the Optuna backend: the low-fidelity fine-tune in ``chunks`` slices, weak
    # candidates stopped between them by successive halving (1: one slice, nothing stopped).
    chunks: int = 1
    # Finalists timed where the target runs (ONNX Runtime here for ``local``, else ``measure_cmd`` or the
    # target's own command), so one over the budget by measurement is not returned.
    measure_finalists: bool = True
    measure_cmd: str = ""  # 'CMD {onnx}': prints the latency (ms) of the file at {onnx} on the device
    measure_timeout_s: float = 120.0
    # Pruned widths rounded to a multiple of this; None: the target's ``prune_round_to``.
    prune_round_to: int | None = None

    def __post_init__(self) -> None:
        if self.sampler not in ("tpe", "nsga2", "random"):
            raise UserInputError(f"unknown sampler {self.sampler!r}; valid: nsga2, random, tpe")
        bad = [o for o in self.objectives if o not in OBJECTIVES]
        if bad or "accuracy" not in self.objectives:
            raise UserInputError(f"objectives must include accuracy and come from {', '.join(OBJECTIVES)}; got {bad}")
        if self.space not in SPACES:
            raise UserInputError(f"unknown search space {self.space!r}; valid: {', '.join(SPACES)}")
        if self.tie and self.space != "layers":
            raise UserInputError("--tie shares one value per decision kind in the per-decision space; "
                                 "add --space layers")
        if self.trials < 1:
            raise UserInputError(f"--trials must be at least 1, got {self.trials}")
        for name, value in (("--low-epochs", self.low_epochs), ("--full-epochs", self.full_epochs)):
            if not (math.isfinite(value) and 0 < value <= 1000):
                raise UserInputError(f"{name} must be a number of epochs above 0 (at most 1000), got {value}")
        if self.finalists < 1:
            raise UserInputError(f"--finalists must be at least 1, got {self.finalists}")
        if self.prune_round_to is not None and not 1 <= self.prune_round_to <= 256:
            raise UserInputError(f"--prune-round-to must be a whole number from 1 to 256, got {self.prune_round_to}")
        if not 1 <= self.chunks <= 20:
            raise UserInputError(f"--chunks must be from 1 to 20, got {self.chunks}")
        if self.chunks > 1 and len(self.objectives) > 1:
            raise UserInputError("--chunks stops weak candidates by their accuracy alone; it needs a single objective")
        if self.minimise not in ("latency_ms", "energy_mj", "size_bytes"):
            raise UserInputError(f"--minimise must be latency_ms, energy_mj or size_bytes, got {self.minimise!r}")
        if self.max_drop is not None and not (math.isfinite(self.max_drop) and 0 <= self.max_drop <= 100):
            raise UserInputError(f"--max-drop is in points of the metric, from 0 to 100; got {self.max_drop}")
        if self.measure_cmd:
            from autocompress.hwmodels.device import MeasureCommand

            MeasureCommand(self.measure_cmd, self.measure_timeout_s)  # a bad template fails before any work
            if not self.measure_finalists:
                raise UserInputError("--measure-cmd times the finalists and --no-measure turns timing off; drop one")
            if self.max_drop is not None:
                raise UserInputError("--measure-cmd checks the finalists against a latency budget and --max-drop "
                                     "has none; give --budget, or drop --measure-cmd")


@dataclass
class TrialEvent:
    """What a progress display needs after each evaluated or screened candidate."""

    number: int
    state: str
    done: int
    total: int
    best_accuracy: float | None
    phase: str
    message: str = ""


@dataclass(frozen=True)
class Candidate:
    """A candidate evaluated at low fidelity, as any driver records it."""

    number: int  # the trial number in the driver's study
    params: tuple[tuple[str, Any], ...]  # the sampler's parameters, sorted: equal params are the same candidate
    policy: Policy
    accuracy: float  # selection accuracy after the low-fidelity fine-tune
    latency_ms: float  # predicted on the target
    origin: str = "sampler"  # or uniform, warm-start, repair of N


@dataclass(frozen=True)
class Finalist:
    """A candidate fine-tuned again at full fidelity."""

    number: int
    origin: str
    accuracy_low: float  # selection accuracy after ``low_epochs``
    accuracy_full: float  # selection accuracy after ``full_epochs``


@dataclass(frozen=True)
class SearchResult:
    """What a finished search found; ``report.write_search_outputs`` writes it out."""

    config: SearchConfig
    study_name: str
    space: Any  # the SearchSpace searched
    best_trial: int  # the chosen candidate's trial number
    best_policy: Policy
    best_model: Any  # the chosen candidate after its full-fidelity fine-tune
    best_scored: Any  # its ``evaluate.Scored`` record: selection accuracy, boosted layers, notes
    best_costs: dict[str, Any]  # its predicted costs on the target
    feasible: bool  # whether those meet the budget
    finalists: tuple[Finalist, ...]
    budget: Any  # the resolved ``hwmodels.Budget``
    lowest_reachable: dict[str, float]
    baseline_costs: dict[str, Any]
    counts: dict[str, int]  # trials complete, failed and pruned
    measured: "MeasuredCheck | None" = None  # the finalists timed where the target runs (None: not tried)

    @property
    def measured_feasible(self) -> bool | None:
        return self.measured.feasible if self.measured is not None else None


@dataclass(frozen=True)
class MeasuredCheck:
    """The finalists' deployed files timed where the target runs, against the budget's latency limit.

    A finalist is within the budget when its median timing is at most the limit plus its spread (half
    the range of its timings); ``feasible`` is that verdict for the returned model (None: not measured)."""

    feasible: bool | None
    by: str = ""
    limit_ms: float | None = None
    finalists: tuple[tuple[int, str, Any], ...] = ()  # (trial, file timed, hwmodels.device.Timing)
    baseline: Any = None  # the original model's Timing, for a relative budget
    reason: str = ""  # why nothing was measured
    repairs: tuple["MeasuredRepair", ...] = ()  # the pick re-allocated under tighter limits, when no finalist fit

    def within(self, timing: Any) -> bool | None:
        if timing.latency_ms is None or self.limit_ms is None:
            return None
        return timing.latency_ms <= self.limit_ms + timing.spread_ms

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"feasible": self.feasible, "by": self.by, "limit_ms": self.limit_ms,
                               "rule": "median of the timings <= limit + spread (half their range)",
                               "finalists": [{"trial": n, "file": f, **t.to_json(), "within": self.within(t)}
                                             for n, f, t in self.finalists]}
        if self.repairs:
            out["repairs"] = [r.to_json(self.within(r.timing)) for r in self.repairs]
        if self.baseline is not None:
            out["baseline"] = self.baseline.to_json()
        if self.reason:
            out["reason"] = self.reason
        return out


@dataclass(frozen=True)
class MeasuredRepair:
    """The pick by prediction re-allocated under a tighter predicted latency limit, fine-tuned and timed."""

    trial: int  # the finalist repaired
    latency_scale: float  # the predicted latency limit it was allocated under, as a share of the budget's
    predicted_ms: float
    file: str
    timing: Any  # hwmodels.device.Timing

    def to_json(self, within: bool | None) -> dict[str, Any]:
        return {"trial": self.trial, "latency_scale": round(self.latency_scale, 4), "predicted_ms": self.predicted_ms,
                "file": self.file, **self.timing.to_json(), "within": within}


def check_target_and_budget(config: SearchConfig, progress: Callable[[str], None] | None = None) -> None:
    """Bad target names and budget strings fail before any work; an uncalibrated ``local`` is calibrated
    now (``progress`` hears how far) or refused (``hwmodels.first_use``)."""
    from autocompress.hwmodels import parse_budget
    from autocompress.hwmodels.first_use import ready_target

    parse_budget(config.budget)
    ready_target(config.target, progress)


def model_and_data(model: str | None, data: str | None) -> tuple[str, str]:
    """The model to search (default: the built-in one) and its data (a built-in model has a default)."""
    model = model or DEFAULT_MODEL
    data = data or DEFAULT_DATA.get(model)
    if data is None:
        raise UserInputError(f"--data is needed to search {model}: give imagefolder:PATH, sklearn:digits or file.py:factory")
    return model, data


def metric_label(evaluator: Any) -> str:
    """How trial logs name the metric: ``acc`` for built-in accuracy, else the task's metric name."""
    metric = getattr(evaluator, "metric", "accuracy")
    return "acc" if metric == "accuracy" else metric


def study_name_for(space_fp: str, config: SearchConfig) -> str:
    key = f"{config.target}|{config.budget}|{config.objectives}|{config.tie}"
    if config.space != "layers":  # another parameter space is another study
        key += f"|{config.space}"
    if config.max_drop is not None:  # the accuracy-bounded ladder is a study of its own
        key += f"|max-drop {config.max_drop}|{config.minimise}"
    return f"autocompress-{space_fp}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def pick_finalists(candidates: Sequence[Candidate], n: int) -> list[Candidate]:
    """The ``n`` (at least one) most accurate distinct candidates, the faster first among equals."""
    ranked = sorted(candidates, key=lambda c: (-c.accuracy, c.latency_ms))
    distinct: list[Candidate] = []
    for c in ranked:  # the same policy twice would spend two full fine-tunes on one candidate
        if all(c.params != f.params and c.policy != f.policy for f in distinct):
            distinct.append(c)
    return distinct[: max(1, n)]


def finalise(candidates: Sequence[Candidate], evaluator: Callable[[Policy, float], Any], screen: Screen,
             config: SearchConfig, *, study_name: str, counts: Callable[[], dict[str, int]],
             on_final: Callable[[Finalist], None] = lambda f: None,
             callback: Callable[[TrialEvent], None] = lambda e: None,
             tighten: Callable[[Candidate, float], Policy | None] | None = None) -> SearchResult:
    """The second rung: fine-tune the finalists at full fidelity and choose the most accurate (then fastest).

    ``on_final`` sees each finalist as soon as it is scored; ``counts`` is read once the rung is done.
    When every finalist is over the budget by measurement, ``tighten`` (a candidate and a share of the
    predicted latency limit -> a policy within that share) repairs the pick (``measured_repair``)."""
    if not candidates:
        raise TrialFailed("no candidate could be evaluated; see the failed trials' reasons in trials.csv")
    best_low = max(c.accuracy for c in candidates)
    finalists: list[Finalist] = []
    best: tuple[tuple[float, float], Candidate, Any] | None = None
    done: list[tuple[tuple[float, float], Candidate, Any]] = []
    for c in pick_finalists(candidates, config.finalists):
        scored = evaluator(c.policy, config.full_epochs)
        finalists.append(Finalist(c.number, c.origin, c.accuracy, scored.accuracy))
        on_final(finalists[-1])
        callback(TrialEvent(c.number, "final", config.trials, config.trials, best_low, "finalists",
                            f"trial {c.number}: {metric_label(evaluator)} {scored.accuracy:.4f} after {config.full_epochs} "
                            "epochs"))
        entry = ((scored.accuracy, -c.latency_ms), c, scored)
        done.append(entry)
        if best is None or entry[0] > best[0]:
            best = entry
    assert best is not None
    # The pick by prediction first, then the others by the same order: what measurement falls back on.
    ranked = [best] + sorted((d for d in done if d is not best), key=lambda d: d[0], reverse=True)
    pick, measured = measured_choice([(c, s) for _, c, s in ranked], evaluator, config, callback)
    _, chosen, scored = ranked[pick]
    policy = chosen.policy
    if measured is not None and measured.feasible is False and tighten is not None:
        timing = measured.finalists[pick][2]
        policy, scored, measured = measured_repair(chosen, policy, scored, timing, measured, evaluator, screen,
                                                   config, tighten, callback)
    best_costs = dict(screen.costs(policy))
    return SearchResult(config=config, study_name=study_name, space=screen.space, best_trial=chosen.number,
                        best_policy=policy, best_model=scored.model, best_scored=scored, best_costs=best_costs,
                        feasible=not screen.violations(best_costs), finalists=tuple(finalists), budget=screen.budget,
                        lowest_reachable=dict(screen.lowest), baseline_costs=dict(screen.baseline_costs),
                        counts=counts(), measured=measured)


def measured_choice(ranked: Sequence[tuple[Candidate, Any]], evaluator: Any, config: SearchConfig,
                    callback: Callable[[TrialEvent], None] = lambda e: None) -> tuple[int, MeasuredCheck | None]:
    """The index in ``ranked`` (finalists, best first) of the first one within the latency budget by
    measurement, or 0 (the pick by prediction) when none is; and the check. Nothing is timed where the
    target cannot be measured, the budget has no latency limit, or ``measure_finalists`` is off."""
    from autocompress.hwmodels import parse_budget

    if not config.measure_finalists:
        return 0, None
    target, device = _device(config)
    if device is None:
        return 0, MeasuredCheck(None, reason=f"{target.name} is not measured here: give --measure-cmd to time on it")
    budget = parse_budget(config.budget)
    if budget.latency_ms is None and budget.relative is None:
        return 0, MeasuredCheck(None, device.label, reason="the budget has no latency limit")
    timings, base = _time([s.model for _, s in ranked], evaluator, target, device,
                          baseline=evaluator.teacher if budget.relative is not None else None)
    limits = [budget.latency_ms] if budget.latency_ms is not None else []
    if base is not None and base.latency_ms is not None:
        limits.append(budget.relative * base.latency_ms)
    check = MeasuredCheck(None, device.label, min(limits) if limits else None,
                          tuple((c.number, f, t) for (c, _), (f, t) in zip(ranked, timings)), base,
                          "" if limits else f"the original model could not be timed for the relative budget: "
                                            f"{base.error if base is not None else ''}")
    verdicts = [check.within(t) for _, _, t in check.finalists]
    for (n, f, t), ok in zip(check.finalists, verdicts):
        said = _timing_words(f, t, ok, check.limit_ms)
        callback(TrialEvent(n, "final", config.trials, config.trials, ranked[0][1].accuracy, "finalists",
                            f"trial {n}: {said}"))
    pick = next((i for i, ok in enumerate(verdicts) if ok), 0)
    return pick, replace(check, feasible=verdicts[pick] if verdicts else None)


MEASURED_REPAIRS = 2  # rounds of re-allocation when no finalist is within the budget by measurement
REPAIR_MARGIN = 0.95  # aim under the measured limit: the correction is read off one policy and applied to another


def measured_repair(chosen: Candidate, policy: Policy, scored: Any, timing: Any, check: MeasuredCheck, evaluator: Any,
                    screen: Screen, config: SearchConfig, tighten: Callable[[Candidate, float], Policy | None],
                    callback: Callable[[TrialEvent], None] = lambda e: None,
                    rounds: int = MEASURED_REPAIRS) -> tuple[Policy, Any, MeasuredCheck]:
    """The pick re-allocated under a predicted latency limit shrunk by what measurement showed (measured /
    predicted of the last policy timed), fine-tuned at full fidelity and timed, for up to ``rounds``
    rounds: the first within the budget by measurement is returned with the check's verdict true. When
    none is, the pick by prediction comes back unchanged, marked over, and the attempts are on record."""
    target, device = _device(config)
    limit_pred = screen.budget.latency_ms
    if device is None or not limit_pred or check.limit_ms is None:
        return policy, scored, check
    repairs: list[MeasuredRepair] = []
    tried = [policy]
    last_policy, last_timing, scale = policy, timing, 1.0
    for _ in range(rounds):
        if last_timing.latency_ms is None or last_timing.latency_ms <= 0:
            break
        predicted = float(screen.costs(last_policy)["latency_ms"])
        wanted = min(scale, predicted / limit_pred) * min(1.0, check.limit_ms / last_timing.latency_ms) * REPAIR_MARGIN
        floor = screen.lowest["latency_ms"] / limit_pred * 1.02  # as far as the space reaches, if not as far as asked
        if floor >= min(scale, predicted / limit_pred):
            break
        scale = max(wanted, floor)
        candidate = tighten(chosen, scale)
        if candidate is None or candidate in tried:
            callback(TrialEvent(chosen.number, "final", config.trials, config.trials, chosen.accuracy, "finalists",
                                f"trial {chosen.number}: no other policy meets {scale:.2f}x of the predicted latency "
                                "limit; not repaired"))
            break
        tried.append(candidate)
        new_scored = evaluator(candidate, config.full_epochs)
        ((name, t),), _ = _time([new_scored.model], evaluator, target, device)
        repairs.append(MeasuredRepair(chosen.number, scale, float(screen.costs(candidate)["latency_ms"]), name, t))
        ok = check.within(t)
        said = _timing_words(name, t, ok, check.limit_ms)
        callback(TrialEvent(chosen.number, "final", config.trials, config.trials, chosen.accuracy, "finalists",
                            f"trial {chosen.number} repaired to {scale:.2f}x of the predicted latency limit "
                            f"({metric_label(evaluator)} {new_scored.accuracy:.4f}): {said}"))
        if ok:
            return candidate, new_scored, replace(check, feasible=True, repairs=tuple(repairs))
        last_policy, last_timing = candidate, t
    return policy, scored, replace(check, repairs=tuple(repairs))


def _device(config: SearchConfig) -> tuple[Any, Any]:
    """The target and how it is timed (``hwmodels.device.timer_for``; None where nothing here can)."""
    from autocompress.hwmodels import get_target
    from autocompress.hwmodels.device import timer_for

    target = get_target(config.target)
    return target, timer_for(target, config.measure_cmd, config.measure_timeout_s if config.measure_cmd else None)


def _time(models: Sequence[Any], evaluator: Any, target: Any, device: Any, baseline: Any = None) -> tuple[list, Any]:
    """``deploy.time_deployed`` with the files the target would run."""
    from autocompress.deploy import time_deployed

    return time_deployed(models, evaluator.example, device.timer, calibration=getattr(evaluator, "calibration", None),
                         int8=target.fast_int8, fp16=target.fast_fp16, baseline=baseline)


def _timing_words(name: str, t: Any, ok: bool | None, limit_ms: float | None) -> str:
    if t.latency_ms is None:
        return f"{name} not measured: {t.error}"
    verdict = f" against {limit_ms:.4g} ms: " + ("within the budget" if ok else "over the budget") if ok is not None else ""
    return f"{name} measured {t.latency_ms:.4g} ± {t.spread_ms:.2g} ms{verdict}"
