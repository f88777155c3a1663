"""``branch`` decisions: exact horizontal fusion, lossy absorption, cost twins, ONNX export."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from autocompress.compress import ApplyContext, apply, estimate
from autocompress.compress.base import modules_under
from autocompress.export.onnx import export_onnx
from autocompress.space.costs import CostTable
from autocompress.space.graph import trace
from autocompress.space.policy import Policy
from autocompress.compress import build_space

from conftest import small_shape, workspace
from test_merge import ZOO, fresh, lively, loaded, policy, rel_err

DIGITS = "builtin:digits-net"
INCEPTIONS = ("3a", "3b", "4a", "4b", "4c", "4d", "4e", "5a", "5b")


def space_of(spec: str, kinds=("branch",)):
    _, graph = loaded(spec)
    return build_space(graph, spec, kinds=kinds)


def test_branch_decisions_on_the_zoo():
    digits = space_of(DIGITS)
    assert [(d.id, d.choices, d.identity) for d in digits.decisions] == [
        ("branch:inception1", (0, 1, 2), 0), ("branch:inception2", (0, 1, 2), 0)]
    assert digits["branch:inception1"].layers[:3] == ("inception1.branch1.0", "inception1.branch1.1",
                                                      "inception1.branch1.2")
    assert [(d.id, d.choices) for d in space_of("torchvision:googlenet").decisions] == [
        (f"branch:inception{b}", (0, 1, 2)) for b in INCEPTIONS]
    assert [(d.id, d.choices) for d in space_of("torchvision:squeezenet1_0").decisions] == [
        (f"branch:features.{i}", (0, 2)) for i in (3, 4, 5, 7, 8, 9, 10, 12)]
    assert [(d.id, d.choices) for d in space_of("torchvision:shufflenet_v2_x1_0").decisions] == [
        (f"branch:stage{i}.0", (0, 2)) for i in (2, 3, 4)]
    # residual adds: no two parallel convs with one geometry, and absorption is for concatenations
    assert not space_of("torchvision:resnet18").decisions
    assert not space_of("torchvision:mobilenet_v2").decisions


def _digits(seed: int = 0, dtype=torch.float64) -> nn.Module:
    return lively(fresh(DIGITS).to(dtype), (1, 1, 32, 32), seed=seed)


def test_fusion_is_exact_and_takes_the_first_path():
    model, space = _digits(), space_of(DIGITS)
    ctx = ApplyContext(space, torch.randn(1, 1, 32, 32))
    out = apply(model, policy(space, lambda d: 1), space, ctx=ctx)
    x = torch.randn(8, 1, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(out(x), model(x)) <= 1e-5
    (_, fused), = modules_under(out, "inception1.branch1.0")
    assert (fused.in_channels, fused.out_channels, fused.bias is not None) == (64, 32 + 48 + 16, True)
    assert modules_under(out, "inception1.branch2.0.0") == [] and modules_under(out, "inception1.branch3.0.0") == []
    (_, kept), = modules_under(out, "inception1.branch2.1.0")  # the 3x3 behind the fused 1x1 is untouched
    assert kept.out_channels == 64
    assert not ctx.boosted and not ctx.notes


def test_fusion_is_exact_in_float32_on_googlenet():
    _, graph = loaded("torchvision:googlenet")
    model = lively(fresh("torchvision:googlenet"), graph.input_shape, seed=2)
    space = space_of("torchvision:googlenet")
    out = apply(model, policy(space, lambda d: 1), space)
    x = torch.randn(2, *graph.input_shape[1:])
    with torch.no_grad():
        assert rel_err(out(x), model(x)) <= 1e-5
    (_, fused), = modules_under(out, "inception4a.branch1.conv")
    assert fused.out_channels == 192 + 96 + 16


def test_absorption_keeps_channels_order_and_old_weights():
    model, space = _digits(), space_of(DIGITS)
    ctx = ApplyContext(space, torch.randn(1, 1, 32, 32))
    out = apply(model, Policy(space.model, space.fingerprint, {"branch:inception1": 2}), space, ctx=ctx)
    mods = dict(out.named_modules())
    # 1x1 branch (32) goes into the 3x3 branch on its right, pool branch (32) into the 5x5 branch on its left
    assert mods["inception1.branch2.1.0"].out_channels == 32 + 64
    assert mods["inception1.branch3.1.0"].out_channels == 32 + 32
    assert mods["inception1.branch2.1.1"].num_features == 96
    assert "inception1.branch1.0" not in mods and "inception1.branch4.1.0" not in mods
    old = dict(model.named_modules())
    assert torch.equal(mods["inception1.branch2.1.0"].weight[32:], old["inception1.branch2.1.0"].weight)
    assert torch.equal(mods["inception1.branch3.1.0"].weight[:32], old["inception1.branch3.1.0"].weight)
    assert ctx.boosted == {"inception1.branch2.1.0", "inception1.branch2.1.1",
                           "inception1.branch3.1.0", "inception1.branch3.1.1"}
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    seen = []
    mods["inception2.branch1.0"].register_forward_hook(lambda m, i, o: seen.append(i[0]))
    old["inception2.branch1.0"].register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        out(x), model(x)
    new_cat, old_cat = seen
    assert new_cat.shape == old_cat.shape == (2, 160, 16, 16)
    # the surviving branches' channels sit where they were: 32:96 from the 3x3 branch, 112:144 from the 5x5
    assert rel_err(new_cat[:, 32:96], old_cat[:, 32:96]) <= 1e-12
    assert rel_err(new_cat[:, 96:128], old_cat[:, 96:128]) <= 1e-12


def test_squeezenet_fire_absorbs_expand1x1_into_expand3x3():
    model, graph = loaded("torchvision:squeezenet1_0")
    space = space_of("torchvision:squeezenet1_0")
    out = apply(model, Policy(space.model, space.fingerprint, {"branch:features.3": 2}), space)
    mods = dict(out.named_modules())
    assert mods["features.3.expand3x3"].out_channels == 128 and "features.3.expand1x1" not in mods
    assert out(torch.randn(1, *graph.input_shape[1:])).shape == (1, 1000)


@pytest.mark.parametrize("spec", ZOO)
def test_estimate_matches_the_branch_merged_model(spec):
    model, graph = loaded(spec)
    space = space_of(spec)
    rng = random.Random(spec)
    for pick in ((lambda d: rng.choice(d.choices[1:])),):
        pol = policy(space, pick)
        got = CostTable.from_graph(trace(apply(model, pol, space), graph.input_shape)).totals()
        est = estimate(space, pol).totals()
        assert est["macs"] == pytest.approx(got["macs"], rel=0.01)
        assert est["params"] == pytest.approx(got["params"], rel=0.01)


@pytest.mark.parametrize("spec", ZOO)
def test_estimate_matches_with_prune_merge_and_branch(spec):
    model, graph = loaded(spec)
    space = workspace(spec, small_shape(spec)).space  # every kind; the policy draws prune, merge and branch only
    assert space.of_kind("prune")
    rng = random.Random(spec + "all")
    ctx = ApplyContext(space, torch.randn(1, *graph.input_shape[1:]))
    pol = Policy(space.model, space.fingerprint, {d.id: rng.choice(d.choices) for d in space.decisions
                                                  if d.kind in ("prune", "merge", "branch")})
    out = apply(model, pol, space, ctx=ctx)
    got = CostTable.from_graph(trace(out, graph.input_shape)).totals()
    est = estimate(space, pol).totals()
    assert est["macs"] == pytest.approx(got["macs"], rel=0.01)
    assert est["params"] == pytest.approx(got["params"], rel=0.01)
    assert not [n for n in ctx.notes if n.startswith(("merge:", "branch:"))]


@pytest.mark.parametrize("spec,choices", [(DIGITS, (1, 2)), (DIGITS, (2, 1)), ("torchvision:googlenet", (1, 2))])
def test_onnx_export_matches_pytorch(spec, choices, tmp_path):
    """Every merge and branch decision at a non-identity choice; branch blocks alternate fusion and absorption."""
    import onnxruntime as ort

    _, graph = loaded(spec)
    model = lively(fresh(spec), graph.input_shape, seed=4)
    space = space_of(spec, kinds=("merge", "branch"))
    blocks = [d.id for d in space.of_kind("branch")]
    pol = policy(space, lambda d: choices[blocks.index(d.id) % 2] if d.kind == "branch" else 1)
    out = apply(model, pol, space)
    x = torch.randn(2, *graph.input_shape[1:])
    path = export_onnx(out, x[:1], tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = out(x).numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("choice", [1, 2])
def test_merged_models_train(choice):
    """Fine-tuning runs backward through fused slices read by in-place ReLUs and trains every folded bias."""
    space = space_of(DIGITS, kinds=("merge", "branch"))
    out = apply(fresh(DIGITS), policy(space, lambda d: choice if d.kind == "branch" else 1), space).train()
    loss = out(torch.randn(4, 1, 32, 32)).square().mean()
    loss.backward()
    grads = [p.grad for p in out.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
