"""The search space: every decision kind where the architecture has a place for it, in the contract's JSON."""

from __future__ import annotations

import json

import pytest
from torch import nn

from autocompress.compress import estimate
from autocompress.space.policy import Policy
from autocompress.compress import build_space
from autocompress.space.space import KINDS
from conftest import ZOO, run_cli, small_shape, workspace

ALWAYS = {"prune", "wbits", "abits", "rank"}
HAS_BRANCH = {"torchvision:googlenet", "torchvision:squeezenet1_0", "builtin:digits-net"}
OUTPUT_LAYER = {
    "torchvision:resnet18": "fc",
    "torchvision:mobilenet_v2": "classifier.1",
    "torchvision:googlenet": "fc",
    "torchvision:squeezenet1_0": "classifier.1",
    "torchvision:shufflenet_v2_x1_0": "fc",
    "builtin:digits-net": "fc2",
}


@pytest.fixture(scope="module", params=ZOO)
def zoo(request):
    """(spec, workspace, the CLI's ``space --json``) at the reduced input shape."""
    spec = request.param
    ws = workspace(spec, small_shape(spec))
    args = ["space", "--model", spec, "--json"]
    if small_shape(spec):
        args += ["--input-shape", ",".join(map(str, small_shape(spec)))]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    return spec, ws, json.loads(result.stdout)


def _conv_bn_pairs(graph) -> list[tuple[str, str]]:
    g = graph.graph
    pairs = []
    for n in graph.layers("conv", "linear"):
        succ = list(g.successors(n))
        if len(succ) == 1 and g.nodes[succ[0]]["op"] == "bn":
            pairs.append((g.nodes[n]["target"], g.nodes[succ[0]]["target"]))
    return pairs


def test_space_json_matches_the_contract(zoo):
    spec, ws, data = zoo
    assert set(data) - {"options"} == {"model", "fingerprint", "input_shape", "decisions"}
    assert data["model"] == spec
    assert data["fingerprint"] == ws.space.fingerprint and len(data["fingerprint"]) >= 8
    assert data["input_shape"] == list(ws.space.input_shape)
    modules = dict(ws.model.named_modules())
    ids = [d["id"] for d in data["decisions"]]
    assert len(ids) == len(set(ids)) == len(ws.space)
    assert ids == [d.id for d in ws.space.decisions]  # two builds (CLI, in-process) agree
    for d in data["decisions"]:
        assert set(d) == {"id", "kind", "layers", "choices", "identity"}, d
        assert d["kind"] in KINDS and d["id"].startswith(d["kind"] + ":")
        assert d["identity"] in d["choices"] and len(d["choices"]) >= 2, d
        assert len(set(map(str, d["choices"]))) == len(d["choices"]), d
        assert d["layers"] and all(p in modules for p in d["layers"]), d


def test_every_offered_kind_appears(zoo):
    spec, ws, data = zoo
    kinds = {d["kind"] for d in data["decisions"]}
    assert ALWAYS <= kinds, (spec, kinds)
    if _conv_bn_pairs(ws.graph):
        assert "merge" in kinds
    if spec in HAS_BRANCH:
        assert "branch" in kinds, (spec, kinds)


def test_merge_on_every_conv_bn_pair(zoo):
    spec, ws, data = zoo
    merges = [set(d["layers"]) for d in data["decisions"] if d["kind"] == "merge"]
    pairs = _conv_bn_pairs(ws.graph)
    if spec != "torchvision:squeezenet1_0":
        assert pairs
    missing = [p for p in pairs if not any(set(p) <= m for m in merges)]
    assert not missing, missing


def test_quantisation_on_every_conv_and_linear(zoo):
    spec, ws, data = zoo
    layers = {p for p, m in ws.model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    for kind, identity in (("wbits", 32), ("abits", 32)):
        decisions = [d for d in data["decisions"] if d["kind"] == kind]
        assert {d["layers"][0] for d in decisions} == layers
        assert all(d["identity"] == identity and 8 in d["choices"] for d in decisions)


def test_rank_decisions_are_full_convs_that_can_get_cheaper(zoo):
    spec, ws, data = zoo
    modules = dict(ws.model.named_modules())
    for d in data["decisions"]:
        if d["kind"] != "rank":
            continue
        m = modules[d["layers"][0]]
        assert isinstance(m, (nn.Conv2d, nn.Linear)) and getattr(m, "groups", 1) == 1
        assert d["identity"] == 1.0 and all(0 < c <= 1 for c in d["choices"])


def test_output_layers_are_never_pruned(zoo):
    spec, ws, data = zoo
    out = OUTPUT_LAYER[spec]
    prune_ids = [d["id"] for d in data["decisions"] if d["kind"] == "prune"]
    assert prune_ids and f"prune:{out}" not in prune_ids
    deepest = Policy(spec, ws.space.fingerprint,
                     {d.id: max(d.choices) for d in ws.space.decisions if d.kind == "prune"})
    table = estimate(ws.space, deepest)
    row = table.by_target(out)
    width = modules_out(ws.model, out)
    assert row.out_ch == width
    # and every prunable group really shrinks
    base = estimate(ws.space, Policy.identity(ws.space)).totals()
    assert table.totals()["macs"] < 0.75 * base["macs"]


def modules_out(model: nn.Module, path: str) -> int:
    m = model.get_submodule(path)
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


def test_kinds_filter():
    ws = workspace("builtin:digits-net")
    only = build_space(ws.graph, "builtin:digits-net", kinds=("prune", "rank"))
    assert {d.kind for d in only.decisions} == {"prune", "rank"}
    assert [d.id for d in only.decisions] == [d.id for d in ws.space.decisions if d.kind in ("prune", "rank")]


def _prune_with(space, layer: str):
    found = [d for d in space.of_kind("prune") if layer in d.layers and d.id == f"prune:{d.info['root']}"]
    owners = [d for d in found if d.info["root"] == layer or layer in _out_side(d)]
    assert len(owners) == 1, (layer, [d.id for d in owners])
    return owners[0]


def _out_side(d) -> set[str]:
    return {p for p, side, _ in d.info["deps"] if side == "out"}


def test_resnet18_residual_stages_are_coupled_groups():
    space = workspace("torchvision:resnet18").space
    stages = {
        1: ("conv1", "layer1.0.conv2", "layer1.1.conv2"),
        2: ("layer2.0.downsample.0", "layer2.0.conv2", "layer2.1.conv2"),
        3: ("layer3.0.downsample.0", "layer3.0.conv2", "layer3.1.conv2"),
        4: ("layer4.0.downsample.0", "layer4.0.conv2", "layer4.1.conv2"),
    }
    groups = set()
    for stage, members in stages.items():
        d = _prune_with(space, members[1])
        assert set(members) <= set(d.layers), (stage, d.layers)
        assert set(members) <= _out_side(d), (stage, d.info["deps"])
        # the readers of the stage's channels are cut on their inputs
        readers = {f"layer{stage}.1.conv1", *((f"layer{stage + 1}.0.conv1", f"layer{stage + 1}.0.downsample.0")
                                              if stage < 4 else ("fc",))}
        assert readers <= set(d.layers) - _out_side(d), (stage, d.info["deps"])
        assert {f"layer{stage}.0.bn2", f"layer{stage}.1.bn2"} <= set(d.layers)
        groups.add(d.id)
        for m in members:
            if m != d.info["root"]:
                assert f"prune:{m}" not in space
    assert len(groups) == 4
    # each block's inner width is its own decision: conv1 -> bn1 -> conv2 (inputs)
    inner = space["prune:layer3.1.conv1"]
    assert set(inner.layers) == {"layer3.1.conv1", "layer3.1.bn1", "layer3.1.conv2"}
    assert len(space.of_kind("prune")) == 12


def test_space_json_is_serialisable_and_stable():
    ws = workspace("torchvision:resnet18")
    text = json.dumps(ws.space.to_json())
    assert json.loads(text) == ws.space.to_json()
