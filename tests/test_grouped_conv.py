"""Grouped convolutions (1 < groups < channels) are pruned in whole conv groups, and 1-D/3-D convs like 2-D ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autocompress.compress import apply, build_space, estimate
from autocompress.compress.lowrank import factorise
from autocompress.compress.prune import kept_channels
from autocompress.compress.quant import QuantConv1d, QuantConv3d, layer_bits, quantise_module
from autocompress.space.costs import CostTable
from autocompress.space.graph import trace
from autocompress.space.policy import Policy
from conftest import SMALL_SHAPE, workspace


@pytest.mark.parametrize("n, ratio, round_to, groups, kept", [
    (128, 0.25, 1, 32, 96), (128, 0.5, 1, 32, 64), (128, 0.125, 1, 32, 128),  # 112 is no multiple of 32
    (400, 0.125, 1, 25, 350), (400, 0.75, 1, 25, 100), (32, 0.75, 1, 2, 8),
    (48, 0.5, 8, 2, 24), (48, 0.625, 8, 2, 16),  # multiples of lcm(8, 2)
    (32, 0.5, 1, 32, 32),  # one channel per conv group: nothing can go
])
def test_kept_channels_in_whole_conv_groups(n, ratio, round_to, groups, kept):
    assert kept_channels(n, ratio, round_to, groups) == kept


def _grouped_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
    return net.eval()


def _space(net: nn.Module, shape=(1, 3, 8, 8)):
    return build_space(trace(net, shape), "test:grouped", kinds=("prune",))


def test_grouped_conv_groups_are_offered_in_whole_conv_groups():
    space = _space(_grouped_net())
    into, out_of = space["prune:0"], space["prune:3"]
    assert into.info["conv_groups"] == out_of.info["conv_groups"] == 4
    assert set(into.layers) == {"0", "1", "3"} and set(out_of.layers) == {"3", "4", "6"}
    # 16 channels in 4 conv groups: 3, 2 or 1 of the 4 per group can stay
    assert into.choices == (0.0, 0.25, 0.5, 0.75)


def test_the_same_offsets_go_from_every_conv_group_and_dead_ones_first():
    net = _grouped_net()
    dead = [g * 4 + j for g in range(4) for j in (1, 3)]  # offsets 1 and 3 of every conv group
    with torch.no_grad():
        net[0].weight[dead] = 0
        net[0].bias[dead] = 0
        net[1].weight[dead] = 0
        net[1].bias[dead] = 0
    space = _space(net)
    pruned = apply(net, Policy(space.model, space.fingerprint, {"prune:0": 0.5}), space)
    conv = pruned[3]
    assert (pruned[0].out_channels, conv.in_channels, conv.groups, conv.out_channels) == (8, 8, 4, 16)
    torch.testing.assert_close(conv.weight, net[3].weight[:, [0, 2]])  # each group keeps its inputs 0 and 2
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), net(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("decisions", [{"prune:3": 0.75}, {"prune:0": 0.25, "prune:3": 0.5}])
def test_pruning_a_grouped_conv_runs_and_matches_its_estimate(decisions):
    net = _grouped_net()
    space = _space(net)
    policy = Policy(space.model, space.fingerprint, decisions)
    pruned = apply(net, policy, space)
    assert pruned[3].out_channels % pruned[3].groups == 0 and pruned[3].groups == 4
    assert pruned(torch.randn(2, 3, 8, 8)).shape == (2, 5)
    measured = CostTable.from_graph(trace(pruned, (1, 3, 8, 8))).totals()
    predicted = estimate(space, policy).totals()
    assert (measured["macs"], measured["params"]) == (predicted["macs"], predicted["params"])
    assert measured["params"] < sum(p.numel() for p in net.parameters())


def test_resnext_prunes_every_grouped_group_at_half():
    ws = workspace("torchvision:resnext50_32x4d", SMALL_SHAPE)
    grouped = [d for d in ws.space.of_kind("prune") if d.info["conv_groups"] > 1]
    assert len(grouped) == 32 and {d.info["conv_groups"] for d in grouped} == {32}
    policy = Policy(ws.space.model, ws.space.fingerprint, {d.id: 0.5 for d in grouped})
    pruned = apply(ws.model, policy, ws.space)
    assert pruned.layer1[0].conv2.in_channels == 64 and pruned.layer1[0].conv2.out_channels == 64
    assert pruned.layer4[2].conv2.groups == 32
    with torch.no_grad():
        assert torch.isfinite(pruned(torch.randn(1, *SMALL_SHAPE[1:]))).all()
    measured = CostTable.from_graph(trace(pruned, SMALL_SHAPE)).totals()
    predicted = estimate(ws.space, policy).totals()
    assert (measured["macs"], measured["params"]) == (predicted["macs"], predicted["params"])
    assert predicted["macs"] < 0.6 * ws.space.base_table().totals()["macs"]


class _Seq1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(4, 32, 5, padding=2)
        self.bn1 = nn.BatchNorm1d(32)
        self.conv2 = nn.Conv1d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(x)).mean(-1))


def test_conv1d_channels_are_pruned_with_their_batchnorm():
    torch.manual_seed(0)
    net = _Seq1d().eval()
    space = build_space(trace(net, (1, 4, 20)), "test:conv1d", kinds=("prune",))
    assert {d.id for d in space.decisions} == {"prune:conv1", "prune:conv2"}
    policy = Policy(space.model, space.fingerprint, {"prune:conv1": 0.5, "prune:conv2": 0.25})
    pruned = apply(net, policy, space)
    assert (pruned.conv1.out_channels, pruned.bn1.num_features, pruned.conv2.in_channels) == (16, 16, 16)
    assert pruned.conv2.out_channels == 24 and pruned.fc.in_features == 24
    assert pruned(torch.randn(2, 4, 20)).shape == (2, 3)
    assert estimate(space, policy).totals()["params"] == sum(p.numel() for p in pruned.parameters())


@pytest.mark.parametrize("conv", [nn.Conv1d(6, 12, 3, stride=2, padding=1), nn.Conv3d(4, 10, 3, padding=1)])
def test_conv1d_and_conv3d_factorise_exactly_at_full_rank(conv):
    torch.manual_seed(0)
    x = torch.randn(2, conv.in_channels, *([7] * (conv.weight.dim() - 2)))
    full = factorise(conv, min(conv.out_channels, conv.weight[0].numel()))
    assert type(full[0]) is type(conv) and full[1].kernel_size == (1,) * (conv.weight.dim() - 2)
    with torch.no_grad():
        torch.testing.assert_close(full(x), conv(x), rtol=1e-4, atol=1e-5)


def test_conv1d_and_conv3d_take_bit_widths():
    q1 = quantise_module(nn.Conv1d(4, 8, 3), 8, 8)
    q3 = quantise_module(nn.Conv3d(2, 4, 3), 4, 32)
    assert isinstance(q1, QuantConv1d) and isinstance(q1, nn.Conv1d) and isinstance(q3, QuantConv3d)
    x = torch.randn(1, 4, 9)
    err = (q1(x) - nn.functional.conv1d(x, q1.weight, q1.bias)).abs().max().detach()
    assert 0 < float(err) < 0.1  # quantised, not broken
    assert type(q1.to_float()) is nn.Conv1d and type(q3.to_float()) is nn.Conv3d
    assert layer_bits(nn.Sequential(q1, nn.ReLU(), q3.to_float())) == {"0": (8, 8), "2": (32, 32)}


class _Net3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv3d(2, 16, 3, padding=1)
        self.bn = nn.BatchNorm3d(16)
        self.c2 = nn.Conv3d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.bn(self.c1(x))))).mean((2, 3, 4)))


@pytest.mark.parametrize("make, shape", [(_Seq1d, (1, 4, 20)), (_Net3d, (1, 2, 6, 6, 6))])
def test_conv1d_and_conv3d_take_every_kind_and_match_the_estimate(make, shape):
    from test_apply_consistency import random_policies

    torch.manual_seed(0)
    net = make().eval()
    space = build_space(trace(net, shape), "test:convnd")
    assert {d.kind for d in space.decisions} == {"prune", "rank", "wbits", "abits"}
    assert len(space.of_kind("rank")) == len(space.of_kind("wbits")) == 3  # both convs and the linear
    for policy in random_policies(space, 4, seed=1):
        built = apply(net, policy, space)
        assert built(torch.randn(2, *shape[1:])).shape == (2, 3)
        table = CostTable.from_graph(trace(built, shape))
        bits = layer_bits(built)
        for row in table:
            if row.op in ("conv", "linear"):
                row.wbits, row.abits = bits.get(row.target, (32, 32))
        measured, predicted = table.totals(), estimate(space, policy).totals()
        assert [measured[k] for k in ("macs", "params", "weight_bytes")] == \
            [predicted[k] for k in ("macs", "params", "weight_bytes")]
