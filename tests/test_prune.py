"""Structured channel pruning: which channels go, coupled groups, rounding, and the analytic twin."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autocompress.compress import apply, estimate
from autocompress.compress.prune import kept_channels
from autocompress.space.policy import Policy
from autocompress.compress import build_space
from autocompress.space.graph import trace
from conftest import SMALL_SHAPE, workspace


@pytest.mark.parametrize("n, ratio, round_to, kept", [
    (64, 0.0, 1, 64), (64, 0.5, 1, 32), (64, 0.75, 1, 16), (10, 0.125, 1, 9), (3, 0.75, 1, 1),
    (64, 0.375, 8, 40), (60, 0.125, 8, 56), (64, 0.75, 8, 16), (12, 0.5, 8, 6), (24, 0.75, 8, 8),
])
def test_kept_channels(n, ratio, round_to, kept):
    assert kept_channels(n, ratio, round_to) == kept


def _small_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return net.eval()


def _space(net: nn.Module, shape=(1, 3, 8, 8), **options):
    return build_space(trace(net, shape), "test:net", kinds=("prune",), options=options)


def test_decisions_skip_the_output_layer():
    space = _space(_small_net())
    assert sorted(d.id for d in space.decisions) == ["prune:0", "prune:3"]
    assert set(space["prune:0"].layers) == {"0", "1", "3"}
    assert set(space["prune:3"].layers) == {"3", "4", "8"}


def test_dead_channels_go_first_and_the_function_is_kept():
    net = _small_net()
    dead = [1, 3, 5, 7]
    with torch.no_grad():  # channels whose whole group is zero: the lowest group magnitude
        net[0].weight[dead] = 0
        net[0].bias[dead] = 0
        net[1].weight[dead] = 0
        net[1].bias[dead] = 0
        net[3].weight[:, dead] = 0
    space = _space(net)
    policy = Policy(space.model, space.fingerprint, {"prune:0": 0.5})
    pruned = apply(net, policy, space)
    alive = [0, 2, 4, 6]
    assert pruned[0].out_channels == 4 and pruned[1].num_features == 4 and pruned[3].in_channels == 4
    assert torch.equal(pruned[0].weight, net[0].weight[alive])
    assert torch.equal(pruned[3].weight, net[3].weight[:, alive])
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), net(x), rtol=1e-5, atol=1e-6)
    assert net[0].out_channels == 8  # the input model is untouched


@pytest.mark.parametrize("importance", ["l1", "l2", "bn", "random"])
def test_importance_options(importance):
    net = _small_net()
    weak = [0, 9, 10, 15]
    with torch.no_grad():
        net[4].weight[weak] = 1e-3  # smallest BN scales
        net[3].weight[weak] *= 1e-3  # and smallest conv filters
        net[8].weight[:, weak] *= 1e-3
    space = _space(net, prune_importance=importance)
    policy = Policy(space.model, space.fingerprint, {"prune:3": 0.25}, space.options)
    pruned = apply(net, policy, space)
    assert pruned[3].out_channels == 12 and pruned[8].in_features == 12
    kept_bn = pruned[4].weight.detach()
    if importance != "random":
        # exactly the weak channels are gone
        survivors = [i for i in range(16) if i not in weak]
        assert torch.equal(kept_bn, net[4].weight.detach()[survivors])
    assert pruned(torch.randn(1, 3, 8, 8)).shape == (1, 5)


def test_round_to_gives_aligned_widths():
    ws = workspace("torchvision:resnet18", SMALL_SHAPE)
    space = build_space(ws.graph, ws.space.model, kinds=("prune",), options={"prune_round_to": 8})
    policy = Policy(space.model, space.fingerprint, {d.id: 0.375 for d in space.decisions}, space.options)
    pruned = apply(ws.model, policy, space)
    widths = [m.out_channels for n, m in pruned.named_modules() if isinstance(m, nn.Conv2d)]
    assert all(w % 8 == 0 for w in widths), widths
    assert pruned.conv1.out_channels == 40 and pruned.layer4[1].conv1.out_channels == 320
    table = estimate(space, policy)
    assert table.by_target("conv1").out_ch == 40
    # a policy carries its options: without them it does not fit this space
    with pytest.raises(Exception, match="options"):
        Policy(space.model, space.fingerprint, {"prune:conv1": 0.5}).validate(space)


def test_resnet18_stage_group_is_cut_together():
    ws = workspace("torchvision:resnet18", SMALL_SHAPE)
    policy = Policy(ws.space.model, ws.space.fingerprint, {"prune:conv1": 0.5})
    pruned = apply(ws.model, policy, ws.space)
    assert pruned.conv1.out_channels == 32 and pruned.bn1.num_features == 32
    for block in pruned.layer1:
        assert block.conv1.in_channels == 32 and block.conv2.out_channels == 32 and block.bn2.num_features == 32
        assert block.conv1.out_channels == 64  # the block's inner width is another decision
    assert pruned.layer2[0].conv1.in_channels == 32 and pruned.layer2[0].downsample[0].in_channels == 32
    assert pruned.fc.out_features == 1000
    x = torch.randn(1, *SMALL_SHAPE[1:])
    assert pruned(x).shape == (1, 1000)
    table = estimate(ws.space, policy)
    params = sum(p.numel() for p in pruned.parameters())
    assert table.totals()["params"] == params
    assert params < sum(p.numel() for p in ws.model.parameters())


def test_shufflenet_uses_the_chain_fallback():
    ws = workspace("torchvision:shufflenet_v2_x1_0", SMALL_SHAPE)
    d = ws.space["prune:stage2.0.branch2.0"]
    assert d.info["engine"] == "chain"
    assert "stage2.0.branch2.3" in d.layers  # the depthwise conv between goes with it
    policy = Policy(ws.space.model, ws.space.fingerprint, {d.id: 0.5})
    pruned = apply(ws.model, policy, ws.space)
    block = pruned.stage2[0].branch2
    assert block[0].out_channels == 29 and block[3].groups == 29 and block[5].in_channels == 29
    assert block[5].out_channels == 58  # the block's output width (channel shuffle) is kept
    assert pruned(torch.randn(1, *SMALL_SHAPE[1:])).shape == (1, 1000)
    table = estimate(ws.space, policy)
    assert table.totals()["params"] == sum(p.numel() for p in pruned.parameters())


def test_concat_consumers_follow_a_pruned_branch():
    ws = workspace("builtin:digits-net")
    policy = Policy(ws.space.model, ws.space.fingerprint, {"prune:inception1.branch2.1.0": 0.75})
    pruned = apply(ws.model, policy, ws.space)
    assert pruned.inception1.branch2[1][0].out_channels == 16
    # inception2's branches read the concatenation: 160 - 48 channels
    assert pruned.inception2.branch1[0].in_channels == 112
    assert pruned(torch.randn(2, 1, 32, 32)).shape == (2, 10)
