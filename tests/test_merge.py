"""``merge`` decisions: BN folding, pool folding, linear collapse; exactness and cost twins."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn

from autocompress.compress import ApplyContext, apply, estimate
from autocompress.compress.base import modules_under
from autocompress.compress.merge import RebirthMerge
from autocompress.space.costs import CostTable
from autocompress.space.graph import trace
from autocompress.space.policy import Policy
from autocompress.compress import build_space
from conftest import small_shape, workspace

ZOO = ("torchvision:resnet18", "torchvision:mobilenet_v2", "torchvision:googlenet", "torchvision:squeezenet1_0",
       "torchvision:shufflenet_v2_x1_0", "builtin:digits-net")


def loaded(spec: str):
    """(model, graph) of ``spec`` from the session's shared workspaces (torchvision models at 64x64)."""
    ws = workspace(spec, small_shape(spec))
    return ws.model, ws.space.graph


def fresh(spec: str) -> nn.Module:
    """A private copy of the shared model, free to change."""
    return copy.deepcopy(loaded(spec)[0])


def lively(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> nn.Module:
    """Weights and BN statistics that keep activations near unit scale, so relative errors mean something."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.normal_(m.bias, std=0.1)
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(4, *shape[1:], dtype=next(model.parameters()).dtype))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(std=0.1)
    return model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def space_of(spec: str, kinds=("merge",)):
    _, graph = loaded(spec)
    return build_space(graph, spec, kinds=kinds)


def policy(space, pick) -> Policy:
    return Policy(space.model, space.fingerprint, {d.id: pick(d) for d in space.decisions})


def test_digits_net_merge_decisions():
    space = space_of("builtin:digits-net")
    ids = [d.id for d in space.decisions]
    assert len([i for i in ids if i.startswith("merge:bn:")]) == 16
    assert "merge:pool:stem.1.0" in ids and "merge:linear:fc1" in ids
    assert len(ids) == 18 and len(set(ids)) == 18
    for d in space.decisions:
        assert d.kind == "merge" and d.choices == (0, 1) and d.identity == 0
    assert space["merge:pool:stem.1.0"].layers == ("stem.1.0", "stem.1.1", "stem.1.2", "pool1")
    assert space["merge:linear:fc1"].layers == ("fc1", "dropout", "fc2")
    assert space["merge:bn:res.conv2"].layers == ("res.conv2", "res.bn2")


@pytest.mark.parametrize("spec", ZOO)
def test_every_conv_bn_pair_has_a_merge_decision(spec):
    _, graph = loaded(spec)
    g = graph.graph
    pairs = [n for n in graph.layers("conv") if [g.nodes[s]["op"] for s in g.successors(n)] == ["bn"]]
    ids = {d.id for d in space_of(spec).decisions}
    assert pairs or spec == "torchvision:squeezenet1_0"  # SqueezeNet has no BatchNorm
    assert {f"merge:bn:{g.nodes[n]['target']}" for n in pairs} <= ids


def test_pool_fold_offered_where_the_strided_conv_fits():
    assert {d.id for d in space_of("torchvision:googlenet").decisions if ":pool:" in d.id} == {
        "merge:pool:conv1.conv", "merge:pool:conv3.conv"}
    assert {d.id for d in space_of("torchvision:resnet18").decisions if ":pool:" in d.id} == {"merge:pool:conv1"}
    # SqueezeNet's 7x7/2 stem without padding gives 15x15 at stride 4, its 3x3/2 ceil-mode pool 14x14
    assert not [d for d in space_of("torchvision:squeezenet1_0").decisions if ":pool:" in d.id]


def test_exact_merges_keep_the_function_and_the_paths():
    model = lively(fresh("builtin:digits-net").double(), (1, 1, 32, 32))
    space = space_of("builtin:digits-net")
    pol = policy(space, lambda d: 0 if ":pool:" in d.id else 1)
    ctx = ApplyContext(space, torch.randn(1, 1, 32, 32))
    out = apply(model, pol, space, ctx=ctx)
    x = torch.randn(8, 1, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(out(x), model(x)) <= 1e-5
    assert not [m for m in out.modules() if isinstance(m, nn.BatchNorm2d)]
    (_, conv), = modules_under(out, "stem.0.0")
    assert conv.bias is not None
    (_, fc), = modules_under(out, "fc1")
    assert (fc.in_features, fc.out_features) == (256, 10)
    assert modules_under(out, "fc2") == []
    assert ctx.boosted == {"fc1"}  # the dropout it absorbed changes training


def test_exact_merges_in_float32_stay_within_1e_5():
    model = lively(fresh("builtin:digits-net"), (1, 1, 32, 32), seed=1)
    space = space_of("builtin:digits-net")
    out = apply(model, policy(space, lambda d: 0 if ":pool:" in d.id else 1), space)
    x = torch.randn(8, 1, 32, 32)
    with torch.no_grad():
        assert rel_err(out(x), model(x)) <= 1e-5


def test_pool_fold_samples_the_conv_at_the_pool_stride():
    model = lively(fresh("builtin:digits-net").double(), (1, 1, 32, 32))
    space = space_of("builtin:digits-net")
    ctx = ApplyContext(space, torch.randn(1, 1, 32, 32))
    out = apply(model, Policy(space.model, space.fingerprint, {"merge:pool:stem.1.0": 1}), space, ctx=ctx)
    assert dict(out.named_modules())["stem.1.0"].stride == (2, 2)
    assert "pool1" not in dict(out.named_modules())
    assert ctx.boosted == {"stem.1.0", "stem.1.1"}
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    seen = []
    dict(out.named_modules())["stem.1.2"].register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    with torch.no_grad():
        before = model.stem(x)[..., ::2, ::2]  # relu(bn(conv)) at the strided positions
        out(x)
    after = seen[0]
    assert after.shape == (2, 64, 16, 16)
    assert rel_err(after, before) <= 1e-9
    assert out(x).shape == (2, 10)


class _Chains(nn.Module):
    """conv3x3 -> 1x1 conv (stride 2, no activation), and linear -> dropout -> linear -> BN."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 4, 1, stride=2)
        self.relu = nn.ReLU()
        self.fc1 = nn.Linear(4 * 8 * 8, 64)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(64, 8)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        x = torch.flatten(self.relu(self.b(self.a(x))), 1)
        return self.bn(self.fc2(self.drop(self.fc1(x))))


def test_conv_and_linear_chains_collapse_exactly_with_a_bn_fold():
    torch.manual_seed(3)
    model = _Chains().eval()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
    graph = trace(model, (1, 3, 16, 16))
    model = model.double()
    space = build_space(graph, "chains", kinds=("merge",))
    assert {d.id for d in space.decisions} == {"merge:conv:a", "merge:linear:fc1", "merge:bn:fc2"}
    pol = policy(space, lambda d: 1)
    out = apply(model, pol, space)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(out(x), model(x)) <= 1e-10
    mods = dict(out.named_modules())
    assert mods["a"].stride == (2, 2) and mods["a"].out_channels == 4 and "b" not in mods
    assert mods["fc1"].out_features == 8 and "fc2" not in mods and "bn" not in mods
    got = CostTable.from_graph(trace(out.float(), (1, 3, 16, 16))).totals()
    est = estimate(space, pol).totals()
    assert (got["macs"], got["params"]) == (est["macs"], est["params"])


def test_collapse_not_offered_where_it_adds_macs():
    model = nn.Sequential(nn.Linear(64, 4), nn.Linear(4, 64))
    space = build_space(trace(model, (1, 64)), "x", kinds=("merge",))
    assert not space.decisions


def test_skipped_fold_is_noted():
    space = space_of("builtin:digits-net")
    d = space["merge:bn:stem.0.0"]
    model = fresh("builtin:digits-net")
    model.stem[0][1] = nn.Identity()
    ctx = ApplyContext(space, torch.randn(1, 1, 32, 32))
    RebirthMerge().transform(model, [(d, 1)], ctx)
    assert ctx.notes and ctx.notes[0].startswith("merge:bn:stem.0.0: skipped")


@pytest.mark.parametrize("spec", ZOO)
def test_estimate_matches_the_merged_model(spec):
    model, graph = loaded(spec)
    space = space_of(spec)
    rng = random.Random(spec)
    for k in range(2):
        pol = policy(space, (lambda d: 1) if k == 0 else (lambda d: rng.choice(d.choices)))
        got = CostTable.from_graph(trace(apply(model, pol, space), graph.input_shape)).totals()
        est = estimate(space, pol).totals()
        assert est["macs"] == pytest.approx(got["macs"], rel=0.01)
        assert est["params"] == pytest.approx(got["params"], rel=0.01)
