"""What the sampler searches by default: the allocation's trade-offs, not one dimension per layer.

With ~75 independent per-layer dimensions and 32 trials a sampler is close to random. The planner
measures each choice's sensitivity once and allocates the budget to the least sensitive choices
(``allocate``); what the allocation cannot know is how well fine-tuning recovers each kind of
compression, so the sampler tunes that: a weight per kind of choice (pruning, factorisation,
bit-widths, merging) that scales its sensitivity, and how much of the budget to fill. A categorical
``origin`` also offers the uniform-compression starting points (the baselines the search must
beat) and a warm start, so the search never does worse than they do on the selection split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from autocompress.hwmodels.budget import Budget
from autocompress.search.allocate import Slot, allocate, cached_costs, conflicting_options, slots
from autocompress.search.sensitivity import SensitivityTable
from autocompress.space.policy import Policy
from autocompress.space.space import Decision, SearchSpace

WEIGHTS = (0.25, 0.5, 1.0, 2.0, 4.0)
FILLS = (0.9, 0.95, 1.0)
ALLOCATION = "allocation"


@dataclass
class Planner:
    """The sensitivity table, choice sets and conflicts of one search, and allocations from them (memoised)."""

    space: SearchSpace
    table: SensitivityTable
    slot_list: Sequence[Slot]
    conflicts: Sequence[tuple[tuple[int, int], tuple[int, int]]]
    costs: Callable[[Policy], Mapping[str, Any]]
    budget: Budget  # resolved: absolute limits only
    _memo: dict[tuple, Policy | None] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, space: SearchSpace, decisions: Sequence[Decision], table: SensitivityTable,
              costs: Callable[[Policy], Mapping[str, Any]], budget: Budget,
              removed: Callable[[Mapping[str, Any]], set[str]]) -> "Planner":
        """``removed`` names the conv/linear paths a merge or branch assignment replaces (for conflicts)."""
        slot_list = slots(space, decisions, weight_only=budget.size_bytes is not None)
        return cls(space, table, slot_list, conflicting_options(space, slot_list, removed), cached_costs(costs),
                   budget)

    def kinds(self) -> list[str]:
        return sorted({s.kind for s in self.slot_list})

    def allocation(self, weights: Mapping[str, float], fill: float = 1.0, latency_scale: float = 1.0) -> Policy | None:
        """``latency_scale`` below 1 allocates under a tighter latency limit (a measured repair)."""
        key = (tuple(sorted(weights.items())), fill, latency_scale)
        if key not in self._memo:
            limits = self.budget.with_latency_scale(latency_scale).to_json()
            found = allocate(self.space, self.table, self.costs, limits, self.slot_list, weights=weights,
                             fill=fill, conflicts=self.conflicts)
            self._memo[key] = found.policy if found is not None else None
        return self._memo[key]


@dataclass(frozen=True)
class TradeoffSpace:
    """Sampler parameters: ``origin`` (the allocation, a uniform starting point or the warm start), a
    sensitivity weight per kind of choice and the share of the budget to fill. Same interface as
    ``space_params.ParamSpace``: ``params``, ``to_policy``, ``to_params``."""

    planner: Planner
    starts: Mapping[str, Policy]  # origin name -> policy (uniform:0.., warm-start)
    repair: Callable[[Policy], Policy | None]

    def params(self) -> dict[str, tuple[Any, ...]]:
        out: dict[str, tuple[Any, ...]] = {"origin": (ALLOCATION, *self.starts)}
        out.update({f"weight:{k}": WEIGHTS for k in self.planner.kinds()})
        out["fill"] = FILLS
        return out

    def to_policy(self, params: Mapping[str, Any]) -> Policy:
        origin = params.get("origin", ALLOCATION)
        if origin in self.starts:
            policy: Policy | None = self.starts[origin]
        else:
            weights = {k: float(params.get(f"weight:{k}", 1.0)) for k in self.planner.kinds()}
            policy = self.planner.allocation(weights, float(params.get("fill", 1.0)))
        if policy is None:  # no allocation meets the budget at these weights: the most compressed uniform point
            policy = next(iter(self.starts.values()), Policy.identity(self.planner.space))
        return self.repair(policy) or policy

    def tightened(self, params: Mapping[str, Any], latency_scale: float) -> Policy | None:
        """The allocation at ``params``' weights (neutral ones for a uniform or warm-start origin) under
        the latency limit times ``latency_scale``; None where none meets it."""
        neutral = params.get("origin", ALLOCATION) in self.starts
        weights = {k: 1.0 if neutral else float(params.get(f"weight:{k}", 1.0)) for k in self.planner.kinds()}
        return self.planner.allocation(weights, 1.0 if neutral else float(params.get("fill", 1.0)), latency_scale)

    def to_params(self, policy: Policy) -> dict[str, Any]:
        """The parameters of a start point (the allocation at neutral weights, or one of ``starts``)."""
        origin = next((name for name, p in self.starts.items() if p == policy), ALLOCATION)
        return self._neutral(origin)

    def _neutral(self, origin: str) -> dict[str, Any]:
        return {"origin": origin, **{f"weight:{k}": 1.0 for k in self.planner.kinds()}, "fill": 1.0}

    def start_points(self, screen: Any, warm: Policy | None, *, seeds: bool,
                     repaired: bool = False) -> list[tuple[dict[str, Any], str]]:
        """The warm start, the allocation at neutral weights, then the uniform points (``seeds``).
        Every point is within the budget already (``to_policy`` repairs)."""
        points = [(self._neutral("warm-start"), "warm-start")] if warm is not None and "warm-start" in self.starts else []
        points.append((self._neutral(ALLOCATION), "allocation"))
        if seeds:
            points += [(self._neutral(o), "uniform") for o in self.starts if o.startswith("uniform:")]
        return points


def removed_layers(model: Any, space: SearchSpace) -> Callable[[Mapping[str, Any]], set[str]]:
    """For an assignment of merge/branch decisions: the conv/linear module paths it replaces."""
    from torch import nn

    from autocompress.compress import apply

    layers = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}

    def removed(assign: Mapping[str, Any]) -> set[str]:
        try:
            small = apply(model, Policy(space.model, space.fingerprint, dict(assign), space.options), space)
        except Exception:  # a merge that cannot be applied fails its own trial; it makes nothing moot
            return set()
        modules = dict(small.named_modules())
        return {p for p in layers if not isinstance(modules.get(p), (nn.Conv2d, nn.Linear))}

    return removed


SENSITIVITY_SAMPLES = 32  # calibration samples each choice is scored on: enough to rank, cheap to run


def sensitivity_for(space: SearchSpace, decisions: Sequence[Decision], teacher: Any, calibration: Any,
                    stored: Mapping[str, Any] | None) -> SensitivityTable:
    """The stored table where it was measured for this architecture, else a new measurement."""
    from autocompress.search.sensitivity import measure_sensitivity

    if stored:
        try:
            table = SensitivityTable.from_json(stored)
        except (ValueError, KeyError, TypeError, AttributeError):  # a damaged table is measured again
            table = None
        if table is not None and table.fingerprint == space.fingerprint and all(d.id in table.scores for d in decisions):
            return table
    batch = tuple(t[:SENSITIVITY_SAMPLES] for t in calibration) if isinstance(calibration, tuple) \
        else calibration[:SENSITIVITY_SAMPLES]
    return measure_sensitivity(space, teacher, batch, decisions=decisions)


def make_params(kind: str, screen: Any, teacher: Any, calibration: Any, *, tie: tuple[str, ...] = (),
                warm: Policy | None = None, stored: Mapping[str, Any] | None = None,
                store: Callable[[dict[str, Any]], None] = lambda data: None) -> Any:
    """The sampler's parameter space: ``"tradeoff"`` (the default) or ``"layers"`` (one parameter per decision).

    ``stored``/``store`` read and keep the sensitivity table (in the study), so a resumed search or
    another worker does not measure it again."""
    from autocompress.search.space_params import ParamSpace, starting_points

    space = screen.space
    layers = ParamSpace(space, tie)
    if kind == "layers":
        return layers
    decisions = layers.searched()
    table = sensitivity_for(space, decisions, teacher, calibration, stored)
    if table.to_json() != stored:
        store(table.to_json())
    planner = Planner.build(space, decisions, table, screen.costs, screen.budget, removed_layers(teacher, space))
    starts = {f"uniform:{i}": p for i, p in enumerate(starting_points(space, screen.feasible))}
    if warm is not None:
        starts["warm-start"] = warm
    return TradeoffSpace(planner, starts, screen.repair)
