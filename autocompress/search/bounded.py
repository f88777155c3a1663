"""The inverse question: the cheapest model within ``--max-drop`` points of the baseline's metric.

The sensitivity-guided allocation (``tradeoff.Planner``) is asked for the least sensitive policy at
a ladder of cost limits (fractions of the baseline's latency, energy or size: whatever
``--minimise`` names). The metric falls as the limit tightens, so a bisection over the ladder finds
the tightest rung whose short fine-tune stays within the drop on the selection split, in
log2(rungs) evaluations. The cheapest passing rungs then get the full fine-tune, and the first one
whose held-out metric also stays within the drop is the result; a result that breaks the drop is
never returned. Each evaluated rung is an Optuna trial in the study, so an interrupted search
resumes without redoing them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from autocompress.errors import InfeasibleBudgetError, TrialFailed
from autocompress.hwmodels.budget import Budget
from autocompress.search.core import Finalist, SearchConfig, SearchResult, TrialEvent, floor, metric_label, points
from autocompress.search.screen import Screen
from autocompress.search.tradeoff import ALLOCATION, make_params
from autocompress.space.policy import Policy

LADDER = (0.8, 0.65, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.12, 0.1, 0.08, 0.065, 0.05)
SENSITIVITY_ATTR = "sensitivity"


@dataclasses.dataclass(frozen=True)
class Rung:
    """One step of the cost ladder: the allocation's policy at ``fraction`` of the baseline's cost."""

    fraction: float
    policy: Policy


class BoundedSearch:
    """Bisection over the allocation's cost ladder for the cheapest model within the drop."""

    def __init__(self, ws: Any, evaluator: Any, config: SearchConfig, *, study: optuna.Study,
                 callback: Callable[[TrialEvent], None] | None = None) -> None:
        self.ws, self.evaluator, self.config, self.study = ws, evaluator, config, study
        self.callback = callback or (lambda e: None)
        self.screen = Screen(ws.space, config.target, "1x")
        params = make_params("tradeoff", self.screen, evaluator.teacher, evaluator.calibration,
                             stored=study.user_attrs.get(SENSITIVITY_ATTR),
                             store=lambda data: study.set_user_attr(SENSITIVITY_ATTR, data))
        self.planner = params.planner
        self.key = config.minimise
        self.base_cost = float(self.screen.baseline_costs[self.key])
        self.rungs = self._rungs()

    def _rungs(self) -> list[Rung]:
        """The ladder rungs the allocation can meet, cheapest last, distinct policies only."""
        neutral = {k: 1.0 for k in self.planner.kinds()}
        out: list[Rung] = []
        for f in LADDER:
            planner = dataclasses.replace(self.planner, budget=Budget(**{self.key: f * self.base_cost}),
                                          _memo={})
            policy = planner.allocation(neutral)
            if policy is not None and all(policy != r.policy for r in out):
                out.append(Rung(f, policy))
        if not out:
            raise InfeasibleBudgetError(f"no allocation lowers {self.key} below {LADDER[0]:.0%} of the baseline's; "
                                        "the space offers too little to compress")
        return out

    def _done(self) -> dict[float, float]:
        return {float(t.user_attrs["fraction"]): float(t.value) for t in self.study.get_trials(
                deepcopy=False, states=(TrialState.COMPLETE,)) if "fraction" in t.user_attrs}

    def _evaluate(self, index: int) -> float:
        """The selection score of rung ``index`` after the short fine-tune (from the study when done before)."""
        fraction, policy = self.rungs[index].fraction, self.rungs[index].policy
        done = self._done()
        if fraction in done:
            return done[fraction]
        costs = self.screen.costs(policy)
        trial = self.study.ask()
        trial.set_user_attr("fraction", fraction)
        trial.set_user_attr("origin", ALLOCATION)
        trial.set_user_attr("policy", dict(policy.decisions))
        for k in ("latency_ms", "energy_mj", "size_bytes", "macs", "params"):
            trial.set_user_attr(k, costs[k])
        try:
            score = float(self.evaluator(policy, self.config.low_epochs).accuracy)
        except TrialFailed as exc:
            trial.set_user_attr("fail_reason", str(exc)[:300])
            self.study.tell(trial, state=TrialState.FAIL)
            return -math.inf
        self.study.tell(trial, score)
        self.callback(TrialEvent(trial.number, "complete", len(self._done()), len(self.rungs), score, "search",
                                 f"{metric_label(self.evaluator)} {score:.4f} at {fraction:.0%} of the baseline's "
                                 f"{self.key} ({costs[self.key]:.4g})"))
        return score

    def run(self) -> SearchResult:
        """The cheapest rung within ``config.max_drop`` points on the selection and held-out splits."""
        max_drop = self.config.max_drop
        if max_drop is None:
            raise ValueError("BoundedSearch needs SearchConfig.max_drop")
        base = self.evaluator.baseline()
        select_floor = floor(base["accuracy_select"], max_drop)
        held_floor = floor(base["accuracy"], max_drop)
        lo, hi = -1, len(self.rungs)  # rung lo passes (-1: the baseline itself), rung hi fails
        scores: dict[int, float] = {}
        budget = max(1, self.config.trials)
        while hi - lo > 1 and len(scores) < budget:
            mid = (lo + hi) // 2
            scores[mid] = self._evaluate(mid)
            lo, hi = (mid, hi) if scores[mid] >= select_floor else (lo, mid)
        passing = sorted((i for i, s in scores.items() if s >= select_floor), reverse=True)  # cheapest first
        finalists: list[Finalist] = []
        best_seen = -math.inf
        for i in passing[: max(1, self.config.finalists)]:
            fraction, policy = self.rungs[i].fraction, self.rungs[i].policy
            scored = self.evaluator(policy, self.config.full_epochs)
            number = self._trial_number(fraction)
            finalists.append(Finalist(number, ALLOCATION, scores[i], scored.accuracy))
            self.study.set_user_attr(f"full:{number}", scored.accuracy)
            held = self.evaluator.held_out(scored.model)
            best_seen = max(best_seen, held)
            self.callback(TrialEvent(number, "final", len(scores), len(scores), scored.accuracy, "finalists",
                                     f"{fraction:.0%} of the baseline's {self.key}: held-out "
                                     f"{metric_label(self.evaluator)} {held:.4f} (floor {held_floor:.4f})"))
            if scored.accuracy >= select_floor and held >= held_floor:
                costs = dict(self.screen.costs(policy))
                return SearchResult(config=self.config, study_name=self.study.study_name, space=self.ws.space,
                                    best_trial=number, best_policy=policy, best_model=scored.model,
                                    best_scored=scored, best_costs=costs, feasible=True,
                                    finalists=tuple(finalists), budget=self.screen.budget,
                                    lowest_reachable=dict(self.screen.lowest),
                                    baseline_costs=dict(self.screen.baseline_costs), counts=self._counts())
        reached = max([s for s in scores.values() if math.isfinite(s)] + [best_seen], default=-math.inf)
        said = f"{points(base['accuracy_select'] - reached):.2f} points" if math.isfinite(reached) else "none"
        raise InfeasibleBudgetError(
            f"no compressed model stays within {max_drop:g} points of the baseline's "
            f"{getattr(self.evaluator, 'metric', 'accuracy')}: the smallest drop reached was {said}; allow a larger "
            "--max-drop or more --full-epochs")

    def _trial_number(self, fraction: float) -> int:
        return next(t.number for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                    if t.user_attrs.get("fraction") == fraction)

    def _counts(self) -> dict[str, int]:
        trials = self.study.get_trials(deepcopy=False)
        return {"complete": sum(t.state == TrialState.COMPLETE for t in trials),
                "failed": sum(t.state == TrialState.FAIL for t in trials), "pruned": 0}
