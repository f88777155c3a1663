"""The second rung: the best candidates fine-tuned at full fidelity, the most accurate chosen, then
checked by measurement where the target can be timed (``measured``)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from autocompress.errors import TrialFailed
from autocompress.search.core import Candidate, Finalist, SearchConfig, SearchResult, TrialEvent, metric_label
from autocompress.search.measured import measured_choice, measured_repair, measuring
from autocompress.search.screen import Screen
from autocompress.space.policy import Policy


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
        finalists.append(Finalist(c.number, c.origin, c.accuracy, scored.accuracy, c.latency_ms))
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
    where = measuring(config) if config.measure_finalists else None  # one target lookup for choice and repair
    pick, measured = measured_choice([(c, s) for _, c, s in ranked], evaluator, config, callback, where)
    _, chosen, scored = ranked[pick]
    policy = chosen.policy
    if measured is not None and measured.feasible is False and tighten is not None:
        timing = measured.finalists[pick][2]
        policy, scored, measured = measured_repair(chosen, policy, scored, timing, measured, evaluator, screen,
                                                   config, tighten, callback, where=where)
    best_costs = dict(screen.costs(policy))
    return SearchResult(config=config, study_name=study_name, space=screen.space, best_trial=chosen.number,
                        best_policy=policy, best_model=scored.model, best_scored=scored, best_costs=best_costs,
                        feasible=not screen.violations(best_costs), finalists=tuple(finalists), budget=screen.budget,
                        lowest_reachable=dict(screen.lowest), baseline_costs=dict(screen.baseline_costs),
                        counts=counts(), measured=measured)
