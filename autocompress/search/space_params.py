"""Mapping between a search space and sampler parameters; cost screening and repair."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from autocompress.compress import estimate
from autocompress.hwmodels.summary import cost_summary
from autocompress.space.policy import Policy
from autocompress.space.space import Decision, SearchSpace

# Choices ordered from least to most compressing, per kind.
_MORE = {
    "prune": lambda cs: sorted(cs),
    "rank": lambda cs: sorted(cs, reverse=True),
    "wbits": lambda cs: sorted(cs, reverse=True),
    "abits": lambda cs: sorted(cs, reverse=True),
    "merge": lambda cs: sorted(cs),
    "branch": lambda cs: sorted(cs),
    "heads": lambda cs: sorted(cs),  # the share of attention heads removed
    "drop": lambda cs: sorted(cs),  # 0 keeps the block, 1 drops it
}
STRUCTURED = ("prune", "heads")  # kinds that remove channels or heads: uniform ratios and repair move them together


def ordered(d: Decision) -> list[Any]:
    return _MORE.get(d.kind, sorted)(d.choices)


# Folding BN into the preceding conv is exact and every runtime does it when it loads the model
# (our ONNX export folds it too), so it changes no predicted cost; folded early, it only takes BN's
# conditioning away from the fine-tune. The search leaves these decisions at their identity.
COST_NEUTRAL = ("merge:bn:",)


@dataclass(frozen=True)
class ParamSpace:
    """Sampler parameters: one per decision, or one per kind for tied kinds.

    Decisions whose id starts with a prefix in ``exclude`` are not searched (they keep their identity).
    """

    space: SearchSpace
    tie: tuple[str, ...] = ()
    exclude: tuple[str, ...] = COST_NEUTRAL

    def searched(self) -> list[Decision]:
        return [d for d in self.space.decisions if not d.id.startswith(self.exclude)]

    def params(self) -> dict[str, tuple[Any, ...]]:
        out: dict[str, tuple[Any, ...]] = {}
        for d in self.searched():
            if d.kind in self.tie:
                key = f"{d.kind}:*"
                out[key] = tuple(sorted(set(out.get(key, ())) | set(d.choices), key=float))
            else:
                out[d.id] = tuple(d.choices)
        return out

    def to_policy(self, params: dict[str, Any]) -> Policy:
        choices = {}
        for d in self.searched():
            v = params.get(f"{d.kind}:*" if d.kind in self.tie else d.id, d.identity)
            if v not in d.choices:  # a tied value outside this decision's domain: nearest valid choice
                v = min(d.choices, key=lambda c: abs(float(c) - float(v)))
            if v != d.identity:
                choices[d.id] = v
        return Policy(self.space.model, self.space.fingerprint, choices, self.space.options)

    def start_points(self, screen: Any, warm: Policy | None, *, seeds: bool,
                     repaired: bool = False) -> list[tuple[dict[str, Any], str]]:
        """The warm start and the uniform seeds on the budget's edge (``screen.Screen.start_points``)."""
        return screen.start_points(self, warm, seeds=seeds, repaired=repaired)

    def to_params(self, policy: Policy) -> dict[str, Any]:
        resolved = policy.resolved(self.space)
        out: dict[str, Any] = {}
        for d in self.searched():
            key = f"{d.kind}:*" if d.kind in self.tie else d.id
            out.setdefault(key, resolved[d.id])
        return out


CostFn = Callable[[Policy], dict[str, Any]]


def cost_fn(space: SearchSpace, target: str) -> CostFn:
    from autocompress.hwmodels import get_target

    tgt = get_target(target)
    base = space.base_table()

    def costs(policy: Policy) -> dict[str, Any]:
        return cost_summary(estimate(space, policy, base), tgt)

    return costs


def with_choices(space: SearchSpace, policy: Policy, updates: Mapping[str, Any]) -> Policy:
    """``policy`` with ``updates`` applied; choices equal to their identity are dropped."""
    merged = {**policy.decisions, **updates}
    merged = {k: v for k, v in merged.items() if v != space[k].identity}
    return Policy(policy.model, policy.fingerprint, merged, policy.options)


def extreme_policies(space: SearchSpace) -> list[Policy]:
    """Corners of the space that bound the lowest reachable cost."""
    most = {d.id: ordered(d)[-1] for d in space.decisions}
    groups = {
        "prune": {k: v for k, v in most.items() if space[k].kind in STRUCTURED},
        "rank": {k: v for k, v in most.items() if space[k].kind == "rank"},
        "bits8": {d.id: 8 for d in space.of_kind("wbits", "abits") if 8 in d.choices},
        "bitsmin": {k: v for k, v in most.items() if space[k].kind in ("wbits", "abits")},
        "merge": {k: v for k, v in most.items() if space[k].kind == "merge" and ":bn:" in k},
        "drop": {k: v for k, v in most.items() if space[k].kind == "drop"},
    }
    combos = [("prune",), ("prune", "bits8"), ("prune", "rank"), ("prune", "rank", "bits8"),
              ("prune", "bitsmin"), ("prune", "rank", "bitsmin"), ("prune", "merge", "bits8"),
              ("prune", "rank", "merge", "bits8")]
    if groups["drop"]:
        combos += [("prune", "drop", "bits8"), ("prune", "rank", "drop", "bitsmin")]
    base = Policy.identity(space)
    out = []
    for combo in combos:
        upd: dict[str, Any] = {}
        for g in combo:
            upd.update(groups[g])
        out.append(with_choices(space, base, upd))
    return out


def repair(space: SearchSpace, policy: Policy, feasible: Callable[[Policy], bool], max_steps: int = 10) -> Policy | None:
    """Make an over-budget policy feasible, cheapest accuracy loss first.

    First every layer above 8 bits goes to 8 bits (nearly free in accuracy),
    then every prune ratio is pushed one notch further, until the budget is met.
    Returns None when even that cannot meet it.
    """
    current = policy
    for _ in range(max_steps):
        if feasible(current):
            return current
        resolved = current.resolved(space)
        upd = {d.id: 8 for d in space.of_kind("wbits", "abits") if 8 in d.choices and resolved[d.id] > 8}
        if not upd:
            for d in space.of_kind(*STRUCTURED):
                chain = ordered(d)
                nxt = chain[min(chain.index(resolved[d.id]) + 1, len(chain) - 1)]
                if nxt != resolved[d.id]:
                    upd[d.id] = nxt
        if not upd:
            return None
        current = with_choices(space, current, upd)
    return current if feasible(current) else None


def uniform_policies(space: SearchSpace, ratios: Iterable[float] = (0.125, 0.25, 0.5), bits: int | None = 8) -> list[Policy]:
    """Hand-made starting points: one prune ratio everywhere, optionally every layer at ``bits``."""
    base = Policy.identity(space)
    out = []
    for r in ratios:
        upd: dict[str, Any] = {d.id: r for d in space.of_kind(*STRUCTURED) if r in d.choices}
        if bits:
            upd.update({d.id: bits for d in space.of_kind("wbits", "abits") if bits in d.choices})
        out.append(with_choices(space, base, upd))
    return out


def starting_points(space: SearchSpace, feasible: Callable[[Policy], bool]) -> list[Policy]:
    """Uniform policies on the budget's edge: the least pruning that meets it, in float and at 8 bits.

    Each is the uniform-compression baseline the search has to beat, plus the next, more pruned
    int8 point; the search then refines per layer from there.
    """
    ratios = sorted({r for d in space.of_kind(*STRUCTURED) for r in d.choices})
    out: list[Policy] = []
    for bits in (None, 8):
        fits = [p for p in uniform_policies(space, ratios, bits=bits) if feasible(p)]
        out += fits[: 2 if bits else 1]
    return out
