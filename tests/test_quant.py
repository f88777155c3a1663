"""Fake quantisation: bit-width error, identity at 32 bits, STE, estimate rows, transform, tracing."""

import torch
from torch import nn

from autocompress.compress import apply, estimate
from autocompress.compress.base import ApplyContext
from autocompress.compress.quant import (ABITS_CHOICES, WBITS_CHOICES, QuantConv2d, QuantLinear, Quantize,
                                         calibrate_activations, fake_quant_activation, fake_quant_weight,
                                         layer_bits, strip_fake_quant)
from autocompress.models.digits import DigitsNet
from autocompress.space.costs import CostTable, LayerCost
from autocompress.space.graph import symbolic_trace, trace
from autocompress.space.policy import Policy
from autocompress.compress import build_space
from autocompress.space.space import Decision

SHAPE = (1, 1, 32, 32)


def _space(model):
    return build_space(trace(model, SHAPE), "builtin:digits-net", kinds=("wbits", "abits"))


def test_weight_error_shrinks_with_bits_and_32_is_identity():
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3) * torch.linspace(0.1, 2.0, 16).view(-1, 1, 1, 1)
    err = {b: (fake_quant_weight(w, b) - w).abs().max().item() for b in (16, 8, 4)}
    assert err[16] < err[8] < err[4]
    assert torch.equal(fake_quant_weight(w, 32), w)
    # per-channel symmetric: each channel's max is kept exactly and the error is at most half a step
    q4 = fake_quant_weight(w, 4)
    amax = w.abs().flatten(1).amax(1)
    assert torch.allclose(q4.abs().flatten(1).amax(1), amax, rtol=1e-6)
    step = (amax / 7).view(-1, 1, 1, 1)
    assert ((q4 - w).abs() <= step / 2 + 1e-6).all()
    assert all(len(torch.unique(q4[c])) <= 15 for c in range(16))
    assert torch.equal(fake_quant_weight(w, 16), w.half().float())


def test_activation_quant_is_affine_within_half_a_step():
    x = torch.linspace(-0.5, 3.0, 1000)
    lo, hi = torch.tensor(-0.5), torch.tensor(3.0)
    q = fake_quant_activation(x, 8, lo, hi)
    assert (q - x).abs().max().item() <= 3.5 / 255 / 2 + 1e-6
    assert len(torch.unique(q)) <= 256
    assert torch.equal(fake_quant_activation(x, 32, lo, hi), x)


def test_quant_layers_at_32_bits_match_float_exactly():
    torch.manual_seed(0)
    conv, lin = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(20, 5)
    x, v = torch.randn(2, 3, 8, 8), torch.randn(4, 20)
    assert torch.equal(QuantConv2d.from_float(conv)(x), conv(x))
    assert torch.equal(QuantLinear.from_float(lin)(v), lin(v))


def test_ste_gradient_reaches_float_weights():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    q = QuantConv2d.from_float(conv, wbits=4, abits=32)
    x = torch.randn(2, 3, 6, 6)
    q(x).square().sum().backward()
    # reference: the same loss with the quantised weights as a constant
    wq = fake_quant_weight(conv.weight.detach(), 4).requires_grad_(True)
    nn.functional.conv2d(x, wq, conv.bias.detach()).square().sum().backward()
    assert q.weight is conv.weight and q.weight.grad is not None
    assert torch.allclose(q.weight.grad, wq.grad, atol=1e-5)
    before = q.weight.detach().clone()
    torch.optim.SGD(q.parameters(), lr=0.1).step()
    assert not torch.equal(before, q.weight.detach())


def test_decisions_cover_every_conv_and_linear():
    model = DigitsNet()
    space = _space(model)
    paths = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert [d.id for d in space.of_kind("wbits")] == [f"wbits:{p}" for p in paths]
    assert [d.id for d in space.of_kind("abits")] == [f"abits:{p}" for p in paths]
    d = space["wbits:stem.0.0"]
    assert d.choices == WBITS_CHOICES and d.identity == 32 and d.layers == ("stem.0.0",)
    assert space["abits:fc2"].choices == ABITS_CHOICES


def test_estimate_sets_bits_on_the_right_rows():
    space = _space(DigitsNet())
    policy = Policy(space.model, space.fingerprint, {"wbits:fc1": 4, "abits:res.conv1": 8, "wbits:res.conv1": 8})
    base = CostTable.from_graph(space.graph)
    table = estimate(space, policy)
    bits = {r.target: (r.wbits, r.abits) for r in table if r.op in ("conv", "linear")}
    assert bits["fc1"] == (4, 32) and bits["res.conv1"] == (8, 8)
    assert all(v == (32, 32) for k, v in bits.items() if k not in ("fc1", "res.conv1"))
    saved = base.by_target("fc1").weight_numel * 28 / 8 + base.by_target("res.conv1").weight_numel * 24 / 8
    assert base.totals()["weight_bytes"] - table.totals()["weight_bytes"] == int(saved)


def test_estimate_follows_a_factorised_path():
    rows = [LayerCost("a", "conv", "block.conv.0", in_ch=4, out_ch=2), LayerCost("b", "conv", "block.conv.1", in_ch=2, out_ch=4),
            LayerCost("c", "conv", "block.convx", in_ch=4, out_ch=4)]
    table = CostTable(rows)
    d = Decision("wbits:block.conv", "wbits", ("block.conv",), WBITS_CHOICES, 32, {"path": "block.conv"})
    Quantize().estimate(table, [(d, 8)], None)
    assert [r.wbits for r in table] == [8, 8, 32]


def test_transform_replaces_layers_and_keeps_macs():
    torch.manual_seed(0)
    model = DigitsNet().eval()
    space = _space(model)
    chosen = {d.id: (8 if d.kind == "wbits" else 8) for d in space.decisions}
    chosen.update({"wbits:fc1": 4, "abits:fc1": 32, "wbits:stem.0.0": 32})
    calib = torch.randn(8, *SHAPE[1:])
    qmodel = apply(model, Policy(space.model, space.fingerprint, chosen), space, calibration=calib)
    assert isinstance(qmodel.stem[0][0], QuantConv2d) and isinstance(qmodel.fc1, QuantLinear)
    assert isinstance(model.stem[0][0], nn.Conv2d) and not isinstance(model.stem[0][0], QuantConv2d)
    bits = layer_bits(qmodel)
    assert bits["fc1"] == (4, 32) and bits["stem.0.0"] == (32, 8) and bits["res.conv2"] == (8, 8)
    g0, g1 = trace(model, SHAPE), trace(qmodel, SHAPE)
    assert g1.totals() == g0.totals()
    assert g1.layers("conv", "linear") == g0.layers("conv", "linear")
    x = torch.randn(16, *SHAPE[1:])
    with torch.no_grad():
        ref, out = model(x), qmodel(x)
        assert (out - ref).abs().max() < 0.1 * ref.abs().max()
        float_copy = strip_fake_quant(qmodel)
        assert not any(isinstance(m, (QuantConv2d, QuantLinear)) for m in float_copy.modules())
        assert torch.equal(float_copy(x), ref)


def test_transform_follows_replacements_and_notes_removed_layers():
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 2, 1), nn.Conv2d(2, 4, 3)), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3))
    ctx = ApplyContext(None, torch.randn(1, 3, 8, 8))
    mk = lambda kind, path, bits: (Decision(f"{kind}:{path}", kind, (path,), (32, 8), 32, {"path": path}), bits)
    out = Quantize().transform(model, [mk("wbits", "0", 8), mk("abits", "0", 8), mk("wbits", "gone.conv", 8)], ctx)
    assert isinstance(out[0][0], QuantConv2d) and isinstance(out[0][1], QuantConv2d)
    assert layer_bits(out)["0.1"] == (8, 8) and layer_bits(out)["3"] == (32, 32)
    assert any("gone.conv" in n for n in ctx.notes)


def test_transform_in_a_graph_module_and_fx_traceable():
    torch.manual_seed(0)
    model = DigitsNet().eval()
    gm = symbolic_trace(model)
    space = _space(model)
    chosen = [(space[f"wbits:{p}"], 8) for p in ("inception1.branch1.0", "fc2")]
    out = Quantize().transform(gm, chosen, ApplyContext(space, torch.randn(1, *SHAPE[1:])))
    assert isinstance(out.get_submodule("inception1.branch1.0"), QuantConv2d)
    x = torch.randn(2, *SHAPE[1:])
    assert out(x).shape == (2, 10)
    retraced = torch.fx.symbolic_trace(out)  # the default tracer goes inside the layers: no tensor branches
    assert torch.allclose(retraced(x), out(x), atol=1e-6)


def test_calibration_sets_min_max_and_training_widens_it():
    torch.manual_seed(0)
    model = nn.Sequential(QuantLinear(4, 2, abits=8))
    calibrate_activations(model, [torch.full((2, 4), -1.0), torch.full((2, 4), 2.0)])
    layer = model[0]
    assert layer.act_min.item() == -1.0 and layer.act_max.item() == 2.0
    model.train()
    model(torch.full((1, 4), 5.0))
    assert layer.act_max.item() == 5.0 and layer.act_min.item() == -1.0
    model.eval()
    model(torch.full((1, 4), 9.0))
    assert layer.act_max.item() == 5.0


def test_fake_quant_model_exports_to_onnx_in_eval_mode(tmp_path):
    import onnxruntime as ort

    from autocompress.export.onnx import export_onnx

    torch.manual_seed(0)
    model = nn.Sequential(QuantConv2d(3, 8, 3, wbits=4, abits=8), nn.ReLU(), nn.Flatten(),
                          QuantLinear(8 * 6 * 6, 5, wbits=16, abits=16)).eval()
    calibrate_activations(model, [torch.randn(16, 3, 8, 8)])
    x = torch.randn(4, 3, 8, 8)
    path = export_onnx(model, x[:1], tmp_path / "fq.onnx")
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    # rounding ties may land one step apart between the two runtimes: allow a few quantisation steps
    assert abs(out - ref).max() <= 0.05 * abs(ref).max()
