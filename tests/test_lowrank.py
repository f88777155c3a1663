"""Low-rank factorisation: exact at full rank, the best rank-r approximation below it, and its cost twin."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autocompress.compress import ApplyContext, apply, estimate
from autocompress.compress.lowrank import factorise, target_rank
from autocompress.space.costs import CostTable
from autocompress.space.graph import trace
from autocompress.space.policy import Policy
from autocompress.compress import build_space
from conftest import SMALL_SHAPE, workspace


@pytest.mark.parametrize("cin_k, cout, fraction, rank", [
    (576, 64, 0.5, 32), (576, 64, 0.125, 8), (2304, 256, 0.25, 64), (4, 16, 0.5, 2), (4, 16, 0.125, 1),
    (64, 64, 0.5, None),  # square at half rank: r * (m + n) == m * n, no saving
    (9, 16, 1.0, None),
])
def test_target_rank(cin_k, cout, fraction, rank):
    assert target_rank(cin_k, cout, fraction) == rank


def _layer_weight(seq: nn.Sequential) -> torch.Tensor:
    """The product of a factorised pair as one (Cout, Cin*k*k) matrix."""
    first, second = seq[0].weight.detach().double(), seq[1].weight.detach().double()
    return second.flatten(1) @ first.flatten(1)


def test_full_rank_is_exact():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1)
    pair = factorise(conv, 6)
    assert isinstance(pair[0], nn.Conv2d) and pair[0].stride == (2, 2) and pair[0].padding == (1, 1)
    assert pair[0].bias is None and pair[1].kernel_size == (1, 1) and torch.equal(pair[1].bias, conv.bias)
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(pair(x), conv(x), rtol=1e-5, atol=1e-5)
    lin = nn.Linear(20, 30)
    pair = factorise(lin, 20)
    assert (pair[0].in_features, pair[0].out_features, pair[1].out_features) == (20, 20, 30)
    x = torch.randn(3, 20)
    torch.testing.assert_close(pair(x), lin(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("r", [1, 3, 8])
def test_truncation_error_is_the_svd_tail(r):
    """Eckart-Young: the Frobenius error of the best rank-r approximation is the norm of the dropped singular values."""
    torch.manual_seed(r)
    conv = nn.Conv2d(8, 12, 3, bias=False)
    w = conv.weight.detach().double().flatten(1)
    s = torch.linalg.svdvals(w)
    err = torch.linalg.norm(w - _layer_weight(factorise(conv, r)))
    assert float(err) == pytest.approx(float(s[r:].square().sum().sqrt()), rel=1e-4)


def test_decisions_only_where_macs_drop():
    ws = workspace("torchvision:mobilenet_v2", SMALL_SHAPE)
    modules = dict(ws.model.named_modules())
    rank = {d.layers[0]: d for d in ws.space.of_kind("rank")}
    depthwise = [p for p, m in modules.items() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and not set(depthwise) & set(rank)
    for path, d in rank.items():
        m = modules[path]
        cin_k = m.weight[0].numel()
        for f in d.choices[1:]:
            r = target_rank(cin_k, m.weight.shape[0], f)
            assert r is not None and r * (cin_k + m.weight.shape[0]) < cin_k * m.weight.shape[0]
    # a 1x1 conv with as many inputs as outputs can never save at half rank
    square = [p for p, m in modules.items() if isinstance(m, nn.Conv2d) and m.groups == 1
              and m.kernel_size == (1, 1) and m.in_channels == m.out_channels]
    for p in square:
        assert p not in rank or 0.5 not in rank[p].choices


def test_resnet_layer_cost_is_exact():
    ws = workspace("torchvision:resnet18", SMALL_SHAPE)
    policy = Policy(ws.space.model, ws.space.fingerprint, {"rank:layer3.0.conv2": 0.25, "rank:fc": 0.125})
    model = apply(ws.model, policy, ws.space)
    assert isinstance(model.layer3[0].conv2, nn.Sequential)
    assert model.layer3[0].conv2[0].out_channels == 64 and model.fc[0].out_features == 64
    table = estimate(ws.space, policy)
    actual = CostTable.from_graph(trace(model, SMALL_SHAPE)).totals()
    assert table.totals()["macs"] == actual["macs"] and table.totals()["params"] == actual["params"]
    spatial = (SMALL_SHAPE[2] // 16) ** 2
    base = CostTable.from_graph(ws.graph).totals()["macs"]
    saved = spatial * 2304 * 256 - spatial * (2304 * 64 + 64 * 256) + 512 * 1000 - 64 * (512 + 1000)
    assert base - table.totals()["macs"] == saved


def test_rank_after_pruning_that_removed_the_saving_is_skipped():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 16, 1), nn.ReLU(), nn.Conv2d(16, 8, 1))
    space = build_space(trace(net, (1, 3, 4, 4)), "test:net", kinds=("prune", "rank"))
    assert "prune:2" in space and 0.5 in space["rank:2"].choices
    # pruning 12 of the 16 outputs leaves a 4x4 layer: rank 2 no longer cuts MACs
    policy = Policy(space.model, space.fingerprint, {"prune:2": 0.75, "rank:2": 0.5})
    ctx = ApplyContext(space, torch.randn(1, 3, 4, 4))
    model = apply(net, policy, space, ctx=ctx)
    assert isinstance(model[2], nn.Conv2d) and model[2].out_channels == 4
    assert any("rank:2" in n and "skipped" in n for n in ctx.notes), ctx.notes
    actual = CostTable.from_graph(trace(model, (1, 3, 4, 4))).totals()
    assert estimate(space, policy).totals()["macs"] == actual["macs"]
