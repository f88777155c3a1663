"""The traced layer graph and the analytic cost table."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autocompress.errors import UntraceableModelError
from autocompress.models import load_model
from autocompress.space.costs import CostTable, LayerCost
from autocompress.space.graph import trace
from conftest import workspace

# torchvision's published GMACs (weights docs), conv and linear layers only, at 224x224
PUBLISHED_MACS = {
    "torchvision:resnet18": 1.814e9,
    "torchvision:mobilenet_v2": 0.301e9,
    "torchvision:googlenet": 1.498e9,
    "torchvision:squeezenet1_0": 0.819e9,
    "torchvision:shufflenet_v2_x1_0": 0.145e9,
}
PUBLISHED_PARAMS = {
    "torchvision:resnet18": 11_689_512,
    "torchvision:mobilenet_v2": 3_504_872,
    "torchvision:googlenet": 6_624_904,
    "torchvision:squeezenet1_0": 1_248_424,
    "torchvision:shufflenet_v2_x1_0": 2_278_604,
}


@pytest.mark.parametrize("spec", list(PUBLISHED_MACS))
def test_macs_and_params_match_torchvision(spec):
    ws = workspace(spec)
    totals = ws.graph.totals()
    assert totals["macs"] == pytest.approx(PUBLISHED_MACS[spec], rel=0.02)
    assert totals["params"] == PUBLISHED_PARAMS[spec]
    table = CostTable.from_graph(ws.graph).totals()
    assert table["macs"] == totals["macs"]
    assert table["params"] == totals["params"]
    assert table["weight_bytes"] == 4 * totals["params"]


def test_layer_attributes_resnet18():
    g = workspace("torchvision:resnet18").graph
    conv1 = g.node(g.node_of_module("conv1"))
    assert conv1["op"] == "conv"
    assert (conv1["in_ch"], conv1["out_ch"], conv1["kernel"], conv1["stride"]) == (3, 64, (7, 7), (2, 2))
    assert conv1["out_shape"] == (1, 64, 112, 112)
    assert conv1["macs"] == 3 * 49 * 64 * 112 * 112
    assert conv1["params"] == 3 * 49 * 64
    fc = g.node(g.node_of_module("fc"))
    assert fc["op"] == "linear" and fc["macs"] == 512 * 1000 and fc["params"] == 512 * 1000 + 1000
    ops = {g.node(n)["op"] for n in g.order}
    assert {"input", "conv", "bn", "act", "pool", "add", "reshape", "linear", "output"} <= ops
    # execution order is topological
    pos = {n: i for i, n in enumerate(g.order)}
    assert all(pos[a] < pos[b] for a, b in g.graph.edges)
    assert len(g.layers("conv")) == 20 and len(g.layers("linear")) == 1


def test_fingerprint_ignores_weights_but_not_architecture():
    torch.manual_seed(0)
    a = load_model("builtin:digits-net").model
    torch.manual_seed(1)
    b = load_model("builtin:digits-net").model
    assert not torch.equal(a.fc2.weight, b.fc2.weight)
    fa = trace(a, (1, 1, 32, 32)).fingerprint
    assert fa == trace(b, (1, 1, 32, 32)).fingerprint
    assert fa == workspace("builtin:digits-net").space.fingerprint
    from autocompress.models.digits import DigitsNet

    assert trace(DigitsNet(num_classes=7), (1, 1, 32, 32)).fingerprint != fa
    assert trace(a, (1, 1, 48, 48)).fingerprint != fa  # shapes are part of the architecture


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on a tensor value: torch.fx cannot trace it
            return x * 2
        return -x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = DataDependent()
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.gate(self.conv(x))
        return self.head(x.mean((2, 3)))


def test_untraceable_model_names_the_module_and_the_fix():
    with pytest.raises(UntraceableModelError) as exc:
        trace(Net(), (1, 3, 16, 16))
    msg = str(exc.value)
    assert "'gate'" in msg and "--leaf gate" in msg and "\n" not in msg
    g = trace(Net(), (1, 3, 16, 16), leaf_paths=["gate"])
    assert g.totals()["macs"] == 3 * 9 * 8 * 256 + 8 * 4
    assert g.node(g.node_of_module("gate"))["op"] == "other"
    assert g.leaf_paths == ("gate",)


def test_wrong_input_shape_is_a_user_error():
    model = load_model("builtin:digits-net").model
    with pytest.raises(UntraceableModelError, match=r"input shape \[1, 3, 32, 32\].*--input-shape"):
        trace(model, (1, 3, 32, 32))


def _chain() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))


def test_peak_activation_bytes_by_hand():
    table = CostTable.from_graph(trace(_chain(), (1, 3, 8, 8)))
    # input 3x8x8; conv 8x8x8; relu 8x8x8; conv 4x8x8. Largest live set: conv output + relu output.
    assert table.peak_activation_bytes() == 4 * (512 + 512)
    assert [r.op for r in table] == ["input", "conv", "act", "conv"]
    totals = table.totals()
    assert totals["macs"] == 3 * 9 * 8 * 64 + 8 * 4 * 64
    assert totals["params"] == 3 * 9 * 8 + 8 + 8 * 4 + 4


def test_peak_activation_keeps_a_skip_connection_alive():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 4, 1)
            self.b = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.b(self.a(x)) + x

    table = CostTable.from_graph(trace(Skip(), (1, 4, 2, 2)))
    # at b: x (still read by the add), a's output and b's output are live: 3 tensors of 16 floats
    assert table.peak_activation_bytes() == 3 * 16 * 4


def test_activation_bits_shrink_stored_tensors():
    table = CostTable.from_graph(trace(_chain(), (1, 3, 8, 8)))
    base = table.peak_activation_bytes()
    low = table.copy()
    for row in low:
        if row.op == "conv":
            row.abits = 8
    # the relu output is stored at 8 bits for its 8-bit consumer
    assert low.peak_activation_bytes() == 4 * 512 + 512
    assert table.peak_activation_bytes() == base


def test_weight_bytes_follow_wbits():
    row = LayerCost("c", "conv", in_ch=16, out_ch=32, kernel=(3, 3), spatial=10, bias=True, wbits=8)
    assert row.weight_numel == 16 * 9 * 32
    assert row.weight_bytes == 16 * 9 * 32 + 32 * 4
    assert row.macs == 16 * 9 * 32 * 10
    dw = LayerCost("d", "conv", in_ch=32, out_ch=32, kernel=(3, 3), groups=32, spatial=4)
    assert dw.macs == 9 * 32 * 4 and dw.params == 9 * 32


def test_table_copy_is_independent_and_edits_rewire():
    table = CostTable.from_graph(trace(_chain(), (1, 3, 8, 8)))
    names = [r.name for r in table]
    twin = table.copy()
    twin[names[1]].out_ch = 1
    twin[names[3]].inputs.append("x")
    assert table[names[1]].out_ch == 8 and "x" not in table[names[3]].inputs
    twin.remove(names[2])  # the relu: its consumer now reads the conv
    assert twin[names[3]].inputs[0] == names[1] and names[2] not in twin and names[2] in table
    extra = LayerCost("extra", "act", out_numel=5)
    twin.insert_after(names[1], extra)
    assert [r.name for r in twin] == [names[0], names[1], "extra", names[3]]
    assert twin["extra"].inputs == [names[1]] and twin[names[3]].inputs[0] == "extra"
    assert [c.name for c in twin.consumers("extra")] == [names[3]]
    assert twin.by_target("0") is twin[names[1]]
