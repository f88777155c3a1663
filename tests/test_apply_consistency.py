"""apply and estimate agree, and the compressed model exports to ONNX and runs there.

For each model of the zoo, a fixed set of seeded random policies draws every
decision kind the model offers. Each policy is applied; the result runs, its
fp32 ONNX export runs in ONNX Runtime with the same outputs, and its traced
MACs, params and weight bytes (at each layer's bit-width) equal what the
analytic twin (``estimate``) predicted.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from autocompress.compress import ApplyContext, apply, estimate
from autocompress.compress.quant import layer_bits, strip_fake_quant
from autocompress.export.onnx import export_onnx
from autocompress.space.costs import CostTable
from autocompress.space.graph import trace
from autocompress.space.policy import Policy
from conftest import ZOO, small_shape, workspace

# Grouped convolutions (1 < groups < channels) are pruned in whole conv groups.
GROUPED_ZOO = ("torchvision:regnet_x_400mf", "torchvision:resnext50_32x4d")
POLICIES_PER_MODEL = 4
DENSITIES = (0.15, 0.3, 0.5, 1.0)  # share of decisions changed; the last changes every one
ORT_RTOL = 1e-4  # of the output's largest magnitude
COST_RTOL = 0.01


def random_policies(space, count: int, seed: int) -> list[Policy]:
    """``count`` seeded policies; together they set every offered kind to a non-identity choice.

    Policy ``i`` changes each decision with probability ``DENSITIES[i]``;
    the first also changes one decision of every kind, so no kind goes
    undrawn, and the last changes every decision (the deepest combination
    the primitives must survive together).
    """
    rng = random.Random(seed)
    policies = []
    for i in range(count):
        p_change = DENSITIES[i % len(DENSITIES)]
        picks = {}
        for d in space.decisions:
            if rng.random() < p_change:
                picks[d.id] = rng.choice([c for c in d.choices if c != d.identity])
        if i == 0:
            for kind in {d.kind for d in space.decisions}:
                d = rng.choice(space.of_kind(kind))
                picks.setdefault(d.id, rng.choice([c for c in d.choices if c != d.identity]))
        policies.append(Policy(space.model, space.fingerprint, picks, space.options))
    return policies


def _ort_run(path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _measured_totals(model, shape) -> dict:
    """Totals of the built model: traced geometry, with each layer's weight bits read off the layer."""
    table = CostTable.from_graph(trace(model, shape))
    bits = layer_bits(model)
    for row in table:
        if row.op in ("conv", "linear"):
            row.wbits, row.abits = bits.get(row.target, (32, 32))
    return table.totals()


@pytest.fixture(scope="module", params=(*ZOO, *GROUPED_ZOO))
def case(request):
    spec = request.param
    ws = workspace(spec, small_shape(spec))
    policies = random_policies(ws.space, POLICIES_PER_MODEL, seed=sum(map(ord, spec)))
    return spec, ws, policies


def test_policies_draw_every_offered_kind(case):
    spec, ws, policies = case
    offered = {d.kind for d in ws.space.decisions}
    drawn = {ws.space[k].kind for p in policies for k in p.decisions}
    assert drawn == offered
    assert {"prune", "wbits", "abits", "rank", "merge"} <= offered or spec == "torchvision:squeezenet1_0"


@pytest.mark.parametrize("index", range(POLICIES_PER_MODEL))
def test_apply_runs_exports_and_matches_estimate(case, index, tmp_path):
    spec, ws, policies = case
    policy = policies[index]
    space = ws.space
    shape = space.input_shape
    torch.manual_seed(index)
    x = torch.randn(2, *shape[1:])
    ctx = ApplyContext(space, torch.randn(1, *shape[1:]))
    before = [p.detach().clone() for p in ws.model.parameters()]
    compressed = apply(ws.model, policy, space, ctx=ctx)
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, ws.model.parameters())), "apply changed its input"

    with torch.no_grad():
        out = compressed(x)
        reference = ws.model(x)
    assert out.shape == reference.shape and torch.isfinite(out).all()

    bits = {k: v for k, v in layer_bits(compressed).items() if v != (32, 32)}
    wanted = {space[k].layers[0] for k, v in policy.non_identity(space).items() if space[k].kind in ("wbits", "abits")}
    assert bool(bits) == bool(wanted), (bits, wanted, ctx.notes)

    float_model = strip_fake_quant(compressed)
    with torch.no_grad():
        float_out = float_model(x)
    onnx_path = export_onnx(float_model, x[:1], tmp_path / "model.onnx")
    ort_out = _ort_run(onnx_path, x)
    scale = float(float_out.abs().max()) or 1.0
    err = float(np.abs(ort_out - float_out.numpy()).max())
    assert err <= ORT_RTOL * scale, f"{spec} policy {index}: ORT differs by {err} (scale {scale})"

    predicted = estimate(space, policy).totals()
    actual = _measured_totals(compressed, shape)
    for key in ("macs", "params", "weight_bytes"):
        assert actual[key] == pytest.approx(predicted[key], rel=COST_RTOL), (
            f"{spec} policy {index}: {key} applied {actual[key]} vs estimated {predicted[key]}; notes {ctx.notes}")
    kinds = {space[k].kind for k in policy.non_identity(space)}
    if kinds & {"prune", "rank"} and "branch" not in kinds:  # branch absorption trades MACs for fewer layers
        assert predicted["macs"] < estimate(space, Policy.identity(space)).totals()["macs"]


def test_apply_and_estimate_are_deterministic_and_pure():
    ws = workspace("builtin:digits-net")
    space = ws.space
    dense = random_policies(space, POLICIES_PER_MODEL, seed=7)[-1]

    before = space.base_table().totals()
    first = estimate(space, dense).totals()
    assert estimate(space, dense).totals() == first
    assert space.base_table().totals() == before  # estimates edit a copy
    example = torch.randn(1, *space.input_shape[1:])
    a = apply(ws.model, dense, space, ctx=ApplyContext(space, example))
    b = apply(ws.model, dense, space, ctx=ApplyContext(space, example))
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
