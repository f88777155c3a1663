"""The budget and the analytic screening of one search: predicted costs in milliseconds, no training.

Every driver costs a candidate here before spending any fine-tuning on it; an
over-budget one is repaired (pruned further) or dropped. The lowest cost the
space reaches is checked up front, so an impossible budget fails at once.
"""

from __future__ import annotations

from typing import Any

from autocompress.errors import InfeasibleBudgetError
from autocompress.search.space_params import ParamSpace, cost_fn, extreme_policies, repair, starting_points
from autocompress.space.policy import Policy
from autocompress.space.space import SearchSpace

COST_KEYS = ("latency_ms", "energy_mj", "size_bytes")


class Screen:
    """Costs, the resolved budget and the feasibility of candidates of one space on one target."""

    def __init__(self, space: SearchSpace, target: str, budget: str) -> None:
        from autocompress.hwmodels import parse_budget

        self.space, self.target, self.budget_text = space, target, budget
        self.costs = cost_fn(space, target)
        self.baseline_costs = self.costs(Policy.identity(space))
        self.budget = parse_budget(budget).resolved(self.baseline_costs["latency_ms"])
        self.lowest = self.lowest_reachable()
        self.check_reachable()

    def violations(self, c: dict[str, Any], latency_scale: float = 1.0) -> dict[str, float]:
        """Limits ``c`` breaks; ``latency_scale`` below 1 tightens the latency limit (a measured repair)."""
        return self.budget.with_latency_scale(latency_scale).violations(latency_ms=c["latency_ms"], energy_mj=c["energy_mj"], size_bytes=c["size_bytes"])

    def margins(self, c: dict[str, Any]) -> dict[str, float]:
        """Relative slack per budget limit: <= 0 where the limit is met (Optuna's constraint convention)."""
        limits = {"latency_ms": self.budget.latency_ms, "energy_mj": self.budget.energy_mj,
                  "size_bytes": self.budget.size_bytes}
        return {k: c[k] / v - 1.0 for k, v in limits.items() if v}

    def feasible(self, policy: Policy, latency_scale: float = 1.0) -> bool:
        return not self.violations(self.costs(policy), latency_scale)

    def repair(self, policy: Policy, latency_scale: float = 1.0) -> Policy | None:
        """The policy pushed into the budget, its latency limit scaled by ``latency_scale`` (see
        ``space_params.repair``); None where that cannot be done."""
        return repair(self.space, policy, lambda p: self.feasible(p, latency_scale))

    def lowest_reachable(self) -> dict[str, float]:
        costs = [self.costs(p) for p in extreme_policies(self.space)] + [self.baseline_costs]
        return {k: min(c[k] for c in costs) for k in COST_KEYS}

    def check_reachable(self) -> None:
        low = self.lowest
        bad = self.budget.violations(latency_ms=low["latency_ms"], energy_mj=low["energy_mj"], size_bytes=low["size_bytes"])
        if bad:
            what = {"latency_ms": f"latency {low['latency_ms']:.3g} ms", "energy_mj": f"energy {low['energy_mj']:.3g} mJ",
                    "size_bytes": f"size {low['size_bytes'] / 1e6:.3g} MB"}
            reach = ", ".join(what[k] for k in bad)
            raise InfeasibleBudgetError(
                f"budget {self.budget_text!r} cannot be met on {self.target}: the lowest the search space "
                f"reaches is {reach}; relax the budget or choose another target")

    def start_points(self, params: ParamSpace, warm: Policy | None, *, seeds: bool,
                     repaired: bool = False) -> list[tuple[dict[str, Any], str]]:
        """The warm start, then uniform seeds on the budget's edge, as distinct sampler parameters with their origin.

        ``repaired``: over-budget points are repaired first and dropped where that fails (for a driver
        that counts a screened trial against its total)."""
        starts = [(warm, "warm-start")] if warm else []
        if seeds:
            starts += [(p, "uniform") for p in starting_points(self.space, self.feasible)]
        points: list[tuple[dict[str, Any], str]] = []
        for policy, origin in starts:
            if repaired and not self.feasible(policy):
                policy = self.repair(policy)
                if policy is None:
                    continue
            point = params.to_params(policy)
            if all(point != seen for seen, _ in points):
                points.append((point, origin))
        return points
