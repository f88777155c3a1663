"""Allocation under a budget: the per-layer choices that cost the least sensitivity and meet the limits.

A multiple-choice knapsack solved as an integer program (``scipy.optimize.milp``): each *slot* is one
choice set (a prune group, a factorisation, a merge, or a layer's weight and activation bit-widths
together, since only both at 8 bits make an int8 kernel), exactly one option per slot is taken, the
summed sensitivity is minimised, and the options' costs must fit each budget limit. Options that
cannot coexist (a layer merged away cannot also be factorised) are excluded pairwise.

Costs are not additive (kernels fuse, int8 boundaries add conversions, pruning an int8 layer saves
less than pruning a float one), so costs are linearised around a reference policy: each option's
cost is the full predictor's cost of the reference with that slot changed. Each solution is then
costed by the full predictor; one over a limit tightens that limit by the overshoot and is solved
again, and a feasible one becomes the next reference, so the linearisation follows the solution.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from autocompress.search.sensitivity import SensitivityTable
from autocompress.search.space_params import with_choices
from autocompress.space.costs import INT8_BITS, runs_int8
from autocompress.space.policy import Policy
from autocompress.space.space import Decision, SearchSpace

LIMITS = ("latency_ms", "energy_mj", "size_bytes")
FREE_CHOICE_PENALTY = 1e-9  # among options of equal sensitivity, prefer the one that changes less


@dataclass(frozen=True)
class Slot:
    """One choice set: ``options`` are assignments of the slot's decisions, the first the identity."""

    name: str
    kind: str
    decisions: tuple[str, ...]
    options: tuple[Mapping[str, Any], ...]


@dataclass(frozen=True)
class Allocation:
    """The policy an allocation chose, its predicted costs and summed (weighted) sensitivity."""

    policy: Policy
    costs: Mapping[str, float]
    sensitivity: float
    feasible: bool
    solves: int


def slots(space: SearchSpace, decisions: Iterable[Decision], weight_only: bool = False) -> list[Slot]:
    """Choice sets over ``decisions``: a layer's ``wbits`` and ``abits`` form one slot, every other decision its own.

    A layer runs at the width of its activations (narrow weights beside wide activations are widened
    to run), so without a size limit (``weight_only`` False) a bits slot keeps only the pairs that run
    as they are stored: float, fp16, and int8 kernels with 8- or 4-bit weights."""
    chosen = list(decisions)
    ids = {d.id for d in chosen}
    out: list[Slot] = []
    done: set[str] = set()
    for d in chosen:
        if d.id in done:
            continue
        if d.kind in ("wbits", "abits"):
            pair = [space[f"{k}:{d.id.split(':', 1)[1]}"] for k in ("wbits", "abits")]
            pair = [p for p in pair if p.id in ids]
            options = [dict(zip((p.id for p in pair), combo)) for combo in itertools.product(
                *[[p.identity] + [c for c in p.choices if c != p.identity] for p in pair])]
            if not weight_only and len(pair) == 2:
                options = [o for o in options if _runs_as_stored(*o.values())]
            out.append(Slot(f"bits:{d.id.split(':', 1)[1]}", "bits", tuple(p.id for p in pair), tuple(options)))
            done.update(p.id for p in pair)
        else:
            options = [{d.id: d.identity}] + [{d.id: c} for c in d.choices if c != d.identity]
            out.append(Slot(d.id, d.kind, (d.id,), tuple(options)))
            done.add(d.id)
    return out


def _runs_as_stored(wbits: int, abits: int) -> bool:
    return wbits == abits or (runs_int8(wbits, abits) and abits == INT8_BITS)


def option_sensitivity(table: SensitivityTable, slot: Slot, option: Mapping[str, Any],
                       weights: Mapping[str, float]) -> float:
    base = sum(table.of(k, v) for k, v in option.items())
    return base * weights.get(slot.kind, 1.0)


def _costs(costs: Callable[[Policy], Mapping[str, Any]], policy: Policy, limits: Sequence[str]) -> np.ndarray:
    c = costs(policy)
    return np.array([float(c[k]) for k in limits])


@contextlib.contextmanager
def _native_stdout_silenced():
    """Process-level stdout to /dev/null: HiGHS (scipy's MILP solver) printf()s a debug line,
    "HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();", whatever its verbosity
    (ERGO-Code/HiGHS#2783); it would land among the CLI's progress lines."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no file descriptor 1 (an embedding host): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        _flush_c_stdio()  # a pipe's C buffer would otherwise reach the restored stdout later
        os.dup2(saved, 1)
        os.close(saved)


def _flush_c_stdio() -> None:
    import ctypes

    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # no C library handle on this platform: nothing buffered to drop
        pass


def solve(sens: Sequence[Sequence[float]], deltas: Sequence[np.ndarray], room: np.ndarray,
          conflicts: Iterable[tuple[tuple[int, int], tuple[int, int]]] = ()) -> list[int] | None:
    """The option index per slot that minimises summed ``sens`` with ``sum(deltas) <= room`` (one row per
    limit); None when no assignment fits. ``deltas[s]`` is (limits x options of slot s)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    offsets = np.cumsum([0] + [len(s) for s in sens])
    n = int(offsets[-1])
    c = np.concatenate([np.asarray(s, dtype=float) + FREE_CHOICE_PENALTY * (np.arange(len(s)) > 0) for s in sens])
    one = np.zeros((len(sens), n))
    for i in range(len(sens)):
        one[i, offsets[i]:offsets[i + 1]] = 1.0
    budget = np.concatenate([np.atleast_2d(d) for d in deltas], axis=1)
    constraints = [LinearConstraint(one, 1.0, 1.0), LinearConstraint(budget, -np.inf, room)]
    pairs = list(conflicts)
    if pairs:
        rows = np.zeros((len(pairs), n))
        for r, ((s1, o1), (s2, o2)) in enumerate(pairs):
            rows[r, offsets[s1] + o1] = rows[r, offsets[s2] + o2] = 1.0
        constraints.append(LinearConstraint(rows, -np.inf, 1.0))
    with _native_stdout_silenced():
        res = milp(c, constraints=constraints, integrality=np.ones(n), bounds=Bounds(0, 1),
                   options={"time_limit": 10.0, "disp": False})
    if res.x is None:
        return None
    x = np.round(res.x).astype(int)
    return [int(np.argmax(x[offsets[i]:offsets[i + 1]])) for i in range(len(sens))]


def allocate(space: SearchSpace, table: SensitivityTable, costs: Callable[[Policy], Mapping[str, Any]],
             limits: Mapping[str, float], slot_list: Sequence[Slot], *, weights: Mapping[str, float] | None = None,
             fill: float = 1.0, conflicts: Iterable[tuple[tuple[int, int], tuple[int, int]]] = (),
             start: Policy | None = None, rounds: int = 8) -> Allocation | None:
    """The least-sensitive policy over ``slot_list`` whose predicted costs meet ``fill`` x ``limits``.

    ``weights`` scale the sensitivity of each slot kind (the search tunes them); ``fill`` below 1
    leaves part of the budget unused. Returns None when no allocation was found within ``rounds``.
    """
    weights = dict(weights or {})
    keys = [k for k in LIMITS if limits.get(k)]
    cap = np.array([float(limits[k]) * fill for k in keys])
    sens = [[option_sensitivity(table, s, o, weights) for o in s.options] for s in slot_list]
    pairs = list(conflicts)
    ref = start or Policy.identity(space)
    target = cap.copy()
    best: Allocation | None = None
    seen: set[tuple[int, ...]] = set()
    for round_ in range(1, rounds + 1):
        ref_cost = _costs(costs, ref, keys)
        deltas = [np.stack([_costs(costs, with_choices(space, ref, o), keys) - ref_cost for o in s.options], axis=1)
                  for s in slot_list]
        pick = solve(sens, deltas, target - ref_cost, pairs)
        if pick is None:
            break
        updates: dict[str, Any] = {}
        for s, i in zip(slot_list, pick):
            updates.update(s.options[i])
        policy = with_choices(space, ref, updates)
        actual = _costs(costs, policy, keys)
        predicted = ref_cost + sum(deltas[j][:, i] for j, i in enumerate(pick))
        total = float(sum(sens[j][i] for j, i in enumerate(pick)))
        ok = bool(np.all(actual <= cap * (1 + 1e-9)))
        if ok and (best is None or total < best.sensitivity):
            best = Allocation(policy, dict(zip(keys, actual.tolist())), total, True, round_)
        if tuple(pick) in seen and ok:
            break
        seen.add(tuple(pick))
        # Linearise again around this solution, where the interactions (int8 with pruning, fusion) are
        # the solution's own; where it overshot, also ask for what the linear model missed.
        ref = policy
        if not ok and round_ > rounds // 2:
            target = np.where(actual > cap, target - np.maximum(actual - predicted, 0.0), target)
    if best is not None:
        best = spend_leftover(space, slot_list, sens, costs, keys, cap, best, pairs)
    return best


def _current(slot: Slot, policy: Policy, space: SearchSpace) -> int:
    """The index of the option ``policy`` takes in ``slot``."""
    now = {d: policy.decisions.get(d, space[d].identity) for d in slot.decisions}
    for i, o in enumerate(slot.options):
        if all(now[k] == v for k, v in o.items()):
            return i
    return 0


def spend_leftover(space: SearchSpace, slot_list: Sequence[Slot], sens: Sequence[Sequence[float]],
         costs: Callable[[Policy], Mapping[str, Any]], keys: Sequence[str], cap: np.ndarray, start: Allocation,
         conflicts: Sequence[tuple[tuple[int, int], tuple[int, int]]], steps: int = 24) -> Allocation:
    """Spend budget the allocation left unused: take, by the full predictor, the feasible single-slot
    change that removes the most sensitivity, until none fits."""
    current = [_current(s, start.policy, space) for s in slot_list]
    blocked = {(a, b) for a, b in conflicts} | {(b, a) for a, b in conflicts}
    policy, total, actual = start.policy, start.sensitivity, np.array([start.costs[k] for k in keys])
    for _ in range(steps):
        best_move = None
        for j, s in enumerate(slot_list):
            for i, o in enumerate(s.options):
                gain = sens[j][current[j]] - sens[j][i]
                if gain <= 0 or (best_move is not None and gain <= best_move[0]):
                    continue
                if any(((j, i), (k, current[k])) in blocked for k in range(len(slot_list))):
                    continue
                candidate = with_choices(space, policy, o)
                c = _costs(costs, candidate, keys)
                if np.all(c <= cap * (1 + 1e-9)):
                    best_move = (gain, j, i, candidate, c)
        if best_move is None:
            break
        gain, j, i, policy, actual = best_move
        current[j] = i
        total -= gain
    return Allocation(policy, dict(zip(keys, actual.tolist())), float(total), True, start.solves)


def cached_costs(costs: Callable[[Policy], Mapping[str, Any]]) -> Callable[[Policy], Mapping[str, Any]]:
    """``costs`` remembered per policy: allocation costs the same neighbours of a reference many times."""
    memo: dict[tuple, Mapping[str, Any]] = {}

    def cost(policy: Policy) -> Mapping[str, Any]:
        key = tuple(sorted((k, float(v)) for k, v in policy.decisions.items()))
        if key not in memo:
            memo[key] = costs(policy)
        return memo[key]

    return cost


def conflicting_options(space: SearchSpace, slot_list: Sequence[Slot],
                        removed: Callable[[Mapping[str, Any]], set[str]]) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Option pairs that cannot coexist: a merge, branch or drop option that replaces a layer
    (``removed(option)`` gives the conv/linear module paths it replaces) against the factorisation or
    bit-width options of that layer, which would then be skipped, and against the channel or head
    pruning options whose layers all go with a dropped block (moot)."""
    out = []
    for a, sa in enumerate(slot_list):
        if sa.kind not in ("merge", "branch", "drop"):
            continue
        for i, oa in enumerate(sa.options[1:], start=1):
            gone = removed(oa)
            for b, sb in enumerate(slot_list):
                if b == a:
                    continue
                if sb.kind in ("rank", "bits"):
                    moot = bool(gone & {space[d].layers[0] for d in sb.decisions})
                else:
                    moot = sa.kind == "drop" and sb.kind in ("prune", "heads") and \
                        set(space[sb.decisions[0]].layers) <= gone
                if moot:
                    out += [((a, i), (b, j)) for j in range(1, len(sb.options))]
    return out
