"""The search, independent of the driver that proposes and schedules candidates.

A driver (``optuna_driver``: Optuna ask/tell on this machine or on a shared
RDB study; ``ray_backend``: Ray Tune on a cluster) proposes candidates,
screens each with :class:`~autocompress.search.screen.Screen` (an over-budget
one costs no training), fine-tunes the feasible ones briefly (``low_epochs``)
and hands the evaluated ones here as :class:`Candidate` records. The
finalists rung (``finalists.finalise``, successive halving with two rungs)
fine-tunes the best ``finalists`` again at ``full_epochs``; the most accurate
one is the result, a :class:`SearchResult` that ``report.write_search_outputs``
writes out.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Callable

from autocompress.errors import UserInputError
from autocompress.space.policy import Policy
from autocompress.space.space import KINDS

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
    # A measured repair that scores more than this many points below the pick is not taken (the pick is
    # returned, over by measurement): on a busy machine meeting the budget can cost most of the model.
    repair_max_drop: float = 5.0
    # Pruned widths rounded to a multiple of this; None: the target's ``prune_round_to``.
    prune_round_to: int | None = None
    # The decision kinds searched (``space.KINDS``); empty: every kind the model has.
    kinds: tuple[str, ...] = ()
    # ONNX files with every dimension fixed at the example input's (mobile runtimes' choice), timed as shipped.
    static_shapes: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.kinds, str):  # the Python API's kinds="prune,wbits"
            object.__setattr__(self, "kinds", tuple(k.strip() for k in self.kinds.split(",") if k.strip()))
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown:
            raise UserInputError(f"unknown decision kind(s) {', '.join(map(repr, unknown))} in --kinds; "
                                 f"valid: {', '.join(KINDS)}")
        object.__setattr__(self, "kinds", tuple(k for k in KINDS if k in self.kinds))  # one spelling per set
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
        if not (math.isfinite(self.repair_max_drop) and 0 <= self.repair_max_drop <= 100):
            raise UserInputError(f"--repair-max-drop is in points of the metric, from 0 to 100; got {self.repair_max_drop}")
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
    latency_ms: float | None = None  # predicted; what breaks a tie on the selection metric


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
    measured: Any = None  # measured.MeasuredCheck: the finalists timed where the target runs (None: not tried)

    @property
    def measured_feasible(self) -> bool | None:
        return self.measured.feasible if self.measured is not None else None


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


def points(drop: float) -> float:
    """A metric difference in points (hundredths of the metric: 0.01 accuracy is one point)."""
    return 100.0 * drop


def floor(metric: float, drop_points: float) -> float:
    """The lowest metric within ``drop_points`` points of ``metric``."""
    return metric - drop_points / 100.0


def study_name_for(space_fp: str, config: SearchConfig) -> str:
    key = f"{config.target}|{config.budget}|{config.objectives}|{config.tie}"
    if config.space != "layers":  # another parameter space is another study
        key += f"|{config.space}"
    if config.max_drop is not None:  # the accuracy-bounded ladder is a study of its own
        key += f"|max-drop {config.max_drop}|{config.minimise}"
    if config.kinds:  # a space of fewer kinds is another study
        key += f"|kinds {','.join(config.kinds)}"
    return f"autocompress-{space_fp}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
