"""Sensitivity of single choices and the allocation of choices under a budget."""

from __future__ import annotations

import random

import numpy as np

import pytest
import torch
from torch import nn

from autocompress.compress import ApplyContext, apply, build_space
from autocompress.search.allocate import allocate, cached_costs, conflicting_options, slots
from autocompress.search.sensitivity import SensitivityTable, choice_key, measure_sensitivity
from autocompress.search.space_params import cost_fn, extreme_policies
from autocompress.space.graph import trace
from autocompress.space.policy import Policy

SHAPE = (1, 3, 16, 16)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc2(self.fc1(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = Net().eval()
    for bn in (model.bn1, model.bn2):  # running statistics as after training, not the init's 0/1
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    space = build_space(trace(model, SHAPE), "test:net")
    batch = torch.randn(32, *SHAPE[1:])
    return model, space, batch


def test_a_layer_the_output_depends_on_outweighs_an_identity_near_choice(setup) -> None:
    model, space, batch = setup
    table = measure_sensitivity(space, model, batch)
    assert table.measure == "kl" and table.samples == 32
    near_identity = table.of("wbits:conv2", 16)
    assert near_identity < 1e-4
    assert table.of("prune:conv1", 0.75) > 100 * max(near_identity, 1e-7)
    assert table.of("rank:fc2", 0.125) > 100 * max(near_identity, 1e-7)
    # more compression of the same decision costs at least roughly as much
    assert table.of("prune:conv1", 0.75) > table.of("prune:conv1", 0.125)
    assert table.of("rank:conv2", 1.0) == 0.0  # the identity is never scored
    assert SensitivityTable.from_json(table.to_json()) == table


def assert_scores_are_full_runs(table, model, space, batch, decisions) -> None:
    """Each choice's score equals the divergence of the whole model compressed by that choice alone."""
    from autocompress.search.sensitivity import divergence

    with torch.no_grad():
        reference = model(batch)
    for d in decisions:
        for c in d.choices:
            if c == d.identity:
                continue
            small = apply(model, Policy(space.model, space.fingerprint, {d.id: c}), space, calibration=batch)
            with torch.no_grad():
                full = divergence(small(batch), reference)
            assert table.of(d.id, c) == pytest.approx(full, rel=1e-3, abs=1e-7), (d.id, c)


class ShapeBranch(Net):
    """A branch on a shape defeats torch.fx, so the space comes from torch.export and nothing is replayed."""

    def forward(self, x):
        if x.shape[-1] > 8:
            x = x * 1.0
        return super().forward(x)


def test_an_export_captured_model_is_scored_whole_and_left_as_it_was(setup) -> None:
    _, _, batch = setup
    torch.manual_seed(1)
    model = ShapeBranch().eval()
    graph = trace(model, SHAPE)
    assert not graph.fx_traced
    space = build_space(graph, "test:branch")
    decisions = [space["wbits:conv2"], space["abits:fc1"]]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = {name: type(m) for name, m in model.named_modules()}
    table = measure_sensitivity(space, model, batch, decisions=decisions)
    # The quantised layer was swapped in for the run and the original put back: same modules, same weights
    assert {name: type(m) for name, m in model.named_modules()} == modules
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert_scores_are_full_runs(table, model, space, batch, decisions)
    assert table.of("wbits:conv2", 4) > table.of("wbits:conv2", 16)


def test_replaying_only_what_changed_equals_running_the_whole_compressed_model(setup) -> None:
    """Quantisation and factorisation scores come from a partial re-run; they match a full run."""
    model, space, batch = setup
    decisions = [space["wbits:conv2"], space["abits:fc1"], space["rank:conv2"]]
    table = measure_sensitivity(space, model, batch, decisions=decisions)
    assert_scores_are_full_runs(table, model, space, batch, decisions)


def _random_table(space, seed: int) -> SensitivityTable:
    rng = random.Random(seed)
    scores = {d.id: {choice_key(c): rng.uniform(0, 1) * (i + 1) for i, c in enumerate(d.choices) if c != d.identity}
              for d in space.decisions}
    return SensitivityTable(scores, "kl", 32, 0.0, space.fingerprint)


def _removed(model, space):
    layers = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}

    def removed(assign):
        small = apply(model, Policy(space.model, space.fingerprint, dict(assign)), space)
        mods = dict(small.named_modules())
        return {p for p in layers if not isinstance(mods.get(p), (nn.Conv2d, nn.Linear))}
    return removed


@pytest.mark.parametrize("seed", range(4))
def test_allocation_meets_the_budget_and_never_takes_conflicting_choices(setup, seed: int) -> None:
    model, space, batch = setup
    searched = [d for d in space.decisions if not d.id.startswith("merge:bn:")]
    slot_list = slots(space, searched)
    conflicts = conflicting_options(space, slot_list, _removed(model, space))
    assert conflicts, "merging fc1 into fc2 makes fc2's factorisation and bit-widths moot"
    costs = cached_costs(cost_fn(space, "mobile"))
    base = costs(Policy.identity(space))["latency_ms"]
    table = _random_table(space, seed)
    lowest = min(costs(p)["latency_ms"] for p in extreme_policies(space))
    assert allocate(space, table, costs, {"latency_ms": 1e-6}, slot_list, conflicts=conflicts) is None
    for frac in (0.9, 0.7, 0.5, lowest / base * 1.05):
        limit = base * frac
        result = allocate(space, table, costs, {"latency_ms": limit}, slot_list, conflicts=conflicts)
        assert result is not None, frac
        assert costs(result.policy)["latency_ms"] <= limit * (1 + 1e-9)
        assert result.costs["latency_ms"] == pytest.approx(costs(result.policy)["latency_ms"])
        chosen = result.policy.resolved(space)
        for (a, i), (b, j) in conflicts:
            both = all(chosen[k] == v for k, v in {**slot_list[a].options[i], **slot_list[b].options[j]}.items())
            assert not both, (slot_list[a].options[i], slot_list[b].options[j])
        ctx = ApplyContext(space, batch[:1], calibration=batch)
        apply(model, result.policy, space, calibration=batch, ctx=ctx)
        assert not [n for n in ctx.notes if "skipped" in n], ctx.notes
        # a layer's weights and activations are allocated together: no narrow weights that run wide
        for d in space.of_kind("wbits"):
            w, a = chosen[d.id], chosen["abits:" + d.id.split(":", 1)[1]]
            assert w == a or (w <= 8 and a == 8), (d.id, w, a)


def test_allocation_prefers_what_costs_least_sensitivity(setup) -> None:
    """With int8 free of sensitivity and pruning expensive, a budget int8 alone meets is met by int8."""
    model, space, _ = setup
    scores = {d.id: {choice_key(c): (0.0 if d.kind in ("wbits", "abits") else 1.0 + float(i))
                     for i, c in enumerate(d.choices) if c != d.identity} for d in space.decisions}
    table = SensitivityTable(scores, "kl", 1, 0.0)
    costs = cached_costs(cost_fn(space, "mobile"))
    all_int8 = Policy(space.model, space.fingerprint,
                      {d.id: 8 for d in space.of_kind("wbits", "abits")})
    limit = costs(all_int8)["latency_ms"] * 1.01
    slot_list = slots(space, [d for d in space.decisions if not d.id.startswith("merge:bn:")])
    result = allocate(space, table, costs, {"latency_ms": limit}, slot_list)
    assert result is not None and result.sensitivity == pytest.approx(0.0, abs=1e-6)
    assert not any(k.startswith(("prune:", "rank:")) for k in result.policy.decisions)



def test_a_choice_the_model_cannot_run_with_scores_worst_and_is_never_allocated(setup, monkeypatch) -> None:
    from autocompress.search import sensitivity

    model, space, batch = setup
    real = sensitivity._run_one

    def brittle(original, space_, d, choice, paths):  # as a model with a hard-coded width would
        if d.id == "prune:conv2" and choice >= 0.5:
            raise RuntimeError("shape mismatch")
        return real(original, space_, d, choice, paths)

    monkeypatch.setattr(sensitivity, "_run_one", brittle)
    table = measure_sensitivity(space, model, batch, decisions=space.of_kind("prune"))
    assert table.of("prune:conv2", 0.5) == sensitivity.FAILED == table.of("prune:conv2", 0.75)
    assert table.of("prune:conv2", 0.25) < sensitivity.FAILED
    costs = cached_costs(cost_fn(space, "mobile"))
    limit = costs(Policy.identity(space))["latency_ms"] * 0.7
    result = allocate(space, table, costs, {"latency_ms": limit}, slots(space, space.of_kind("prune")))
    assert result is not None and result.policy.decisions.get("prune:conv2", 0.0) < 0.5


def test_a_damaged_stored_table_is_measured_again(setup) -> None:
    from autocompress.search.tradeoff import sensitivity_for

    model, space, batch = setup
    decisions = space.of_kind("rank")
    for damaged in ({"format": "autocompress.sensitivity/1"}, {"format": "other"}, {"scores": 3}):
        table = sensitivity_for(space, decisions, model, batch, damaged)
        assert table.fingerprint == space.fingerprint and table.of("rank:fc2", 0.125) > 0
    kept = sensitivity_for(space, decisions, model, batch, table.to_json())
    assert kept == table  # an intact table for this architecture is read back, not measured again


def test_the_solver_prints_nothing_on_the_process_stdout(capfd) -> None:
    """HiGHS printf()s a debug line whatever its verbosity; the solve must keep it off the CLI's output,
    including what C buffers for a pipe, and leave stdout working afterwards."""
    import ctypes

    from autocompress.search.allocate import _native_stdout_silenced, solve

    libc = ctypes.CDLL(None)
    with _native_stdout_silenced():
        libc.printf(b"native line\n")
    assert solve([[0.0, 1.0], [0.0, 2.0]], [np.array([[3.0, 1.0]]), np.array([[3.0, 1.0]])], np.array([4.0])) == [1, 0]
    print("after", flush=True)
    out = capfd.readouterr().out
    assert out == "after\n"
