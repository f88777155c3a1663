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
from dataclasses import dataclass
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
        if not 1 <= self.chunks <= 20:
            raise UserInputError(f"--chunks must be from 1 to 20, got {self.chunks}")
        if self.chunks > 1 and len(self.objectives) > 1:
            raise UserInputError("--chunks stops weak candidates by their accuracy alone; it needs a single objective")
        if self.minimise not in ("latency_ms", "energy_mj", "size_bytes"):
            raise UserInputError(f"--minimise must be latency_ms, energy_mj or size_bytes, got {self.minimise!r}")
        if self.max_drop is not None and not (math.isfinite(self.max_drop) and 0 <= self.max_drop <= 100):
            raise UserInputError(f"--max-drop is in points of the metric, from 0 to 100; got {self.max_drop}")


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


def check_target_and_budget(config: SearchConfig) -> None:
    """Bad target names and budget strings fail before any work."""
    from autocompress.hwmodels import get_target, parse_budget

    get_target(config.target)
    parse_budget(config.budget)


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
             callback: Callable[[TrialEvent], None] = lambda e: None) -> SearchResult:
    """The second rung: fine-tune the finalists at full fidelity and choose the most accurate (then fastest).

    ``on_final`` sees each finalist as soon as it is scored; ``counts`` is read once the rung is done."""
    if not candidates:
        raise TrialFailed("no candidate could be evaluated; see the failed trials' reasons in trials.csv")
    best_low = max(c.accuracy for c in candidates)
    finalists: list[Finalist] = []
    best: tuple[tuple[float, float], Candidate, Any] | None = None
    for c in pick_finalists(candidates, config.finalists):
        scored = evaluator(c.policy, config.full_epochs)
        finalists.append(Finalist(c.number, c.origin, c.accuracy, scored.accuracy))
        on_final(finalists[-1])
        callback(TrialEvent(c.number, "final", config.trials, config.trials, best_low, "finalists",
                            f"trial {c.number}: {metric_label(evaluator)} {scored.accuracy:.4f} after {config.full_epochs} "
                            "epochs"))
        key = (scored.accuracy, -c.latency_ms)
        if best is None or key > best[0]:
            best = (key, c, scored)
    assert best is not None
    _, chosen, scored = best
    best_costs = dict(screen.costs(chosen.policy))
    return SearchResult(config=config, study_name=study_name, space=screen.space, best_trial=chosen.number,
                        best_policy=chosen.policy, best_model=scored.model, best_scored=scored, best_costs=best_costs,
                        feasible=not screen.violations(best_costs), finalists=tuple(finalists), budget=screen.budget,
                        lowest_reachable=dict(screen.lowest), baseline_costs=dict(screen.baseline_costs),
                        counts=counts())
