"""int8 ONNX export: checker, ONNX Runtime, excluded layers stay float, accuracy close to fp32."""

import numpy as np
import onnx
import pytest
import torch

from autocompress.compress.quant import layer_bits
from autocompress.evaluators import load_data, train
from autocompress.export.int8 import export_int8, layer_nodes, module_path_of_node, u8s8_saturates
from autocompress.models.digits import DigitsNet
from autocompress.space.graph import symbolic_trace

SHAPE = (1, 1, 32, 32)
SMALL = (1, 1, 16, 16)  # digits-net is fully convolutional; 16x16 trains 4x faster for the fixture


@pytest.fixture(scope="module")
def trained():
    bundle = load_data("sklearn:digits", SMALL)
    torch.manual_seed(0)
    model = train(DigitsNet(), bundle, epochs=1, lr=3e-3, seed=0)
    return model.eval(), bundle


def _run(path, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x.numpy()})[0]


def _feeding(proto, node):
    """Op types producing a node's (input, weight)."""
    prod = {o: n.op_type for n in proto.graph.node for o in n.output}
    inits = {t.name for t in proto.graph.initializer}
    return tuple("initializer" if i in inits else prod.get(i, "graph-input") for i in node.input[:2])


def test_all_layers_int8_accuracy_within_one_point(trained, tmp_path):
    model, bundle = trained
    xv, yv = bundle.val.tensors
    calib = bundle.train.tensors[0][:256]
    bits = {p: (8, 8) for p in layer_bits(model)}
    report = export_int8(model, calib[:1], calib, tmp_path / "m.int8.onnx", bits)
    onnx.checker.check_model(str(report.path))
    acc_fp32 = float((np.argmax(_run(report.fp32_path, xv), 1) == yv.numpy()).mean())
    acc_int8 = float((np.argmax(_run(report.path, xv), 1) == yv.numpy()).mean())
    assert acc_fp32 > 0.9  # the fixture model has learnt the task
    assert abs(acc_int8 - acc_fp32) <= 0.01
    assert all(l.realised == (8, 8) and not l.simulated_only for l in report.layers)
    assert len(report.layers) == 18 and report.simulated_only == []


def test_excluded_layers_stay_float_and_int4_is_reported(trained, tmp_path):
    model, bundle = trained
    calib = bundle.train.tensors[0][:128]
    bits = {p: (8, 8) for p in layer_bits(model)}
    bits.update({"inception1.branch1.0": (16, 8), "res.conv2": (8, 32), "fc2": (32, 32),
                 "inception2.branch2.1.0": (4, 8)})
    report = export_int8(model, calib[:1], calib, tmp_path / "mixed.onnx", bits, int4=True)
    proto = onnx.load(str(report.path))
    onnx.checker.check_model(proto)
    nodes = layer_nodes(proto)
    by_path = {l.path: l for l in report.layers}
    for path in ("inception1.branch1.0", "res.conv2", "fc2"):
        assert nodes[path].name in report.excluded_nodes
        assert _feeding(proto, nodes[path])[1] == "initializer"  # float weight, no DequantizeLinear
        # the input is still 8-bit where the producing layer is quantised (its output carries Q/DQ)
        assert by_path[path].realised == (32, 8) and by_path[path].simulated_only
    assert _feeding(proto, nodes["res.conv1"]) == ("DequantizeLinear", "DequantizeLinear")
    assert by_path["res.conv1"].realised == (8, 8)
    int4 = by_path["inception2.branch2.1.0"]
    assert int4.realised == ((4, 8) if report.int4_supported else (8, 8))
    assert int4.simulated_only == (not report.int4_supported)
    # three layers keep float weights: 18 - 3 weight DequantizeLinear nodes
    weight_dq = [n for n in proto.graph.node if n.op_type in ("Conv", "Gemm") and _feeding(proto, n)[1] == "DequantizeLinear"]
    assert len(weight_dq) == 15
    xv = bundle.val.tensors[0][:200]
    ref, out = _run(report.fp32_path, xv), _run(report.path, xv)
    assert (np.argmax(ref, 1) == np.argmax(out, 1)).mean() >= 0.97
    assert np.abs(out - ref).max() <= 0.1 * np.abs(ref).max()


@pytest.mark.parametrize("flags, machine, saturates", [
    ("fpu sse4_2 avx avx2 fma", "x86_64", True),  # AVX2 only: vpmaddubsw sums pairs into int16
    ("avx2 avx512f avx512bw", "x86_64", True),  # AVX-512 before VNNI
    ("avx2 avx512f avx512_vnni", "x86_64", False),
    ("avx2 avx_vnni", "x86_64", False),
    ("fp asimd asimddp", "aarch64", False),  # Arm: int32 accumulation
])
def test_u8s8_saturation_is_read_from_the_cpu_flags(flags, machine, saturates):
    cpuinfo = f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n"
    assert u8s8_saturates(cpuinfo, machine) is saturates


@pytest.mark.parametrize("reduce_range", [True, False])
def test_reduce_range_keeps_int8_weights_to_seven_bits(tmp_path, reduce_range):
    torch.manual_seed(0)
    model = DigitsNet().eval()
    calib = torch.randn(8, *SHAPE[1:])
    bits = {p: (8, 8) for p in layer_bits(model)}
    report = export_int8(model, calib[:1], calib, tmp_path / "m.onnx", bits, reduce_range=reduce_range)
    assert report.reduce_range is reduce_range and report.to_json()["reduce_range"] is reduce_range
    proto = onnx.load(str(report.path))
    q = [w for w in (onnx.numpy_helper.to_array(t) for t in proto.graph.initializer
                     if t.data_type == onnx.TensorProto.INT8) if w.ndim >= 2]  # 1-D ones are zero points
    assert len(q) == 18  # one int8 weight per conv/linear layer
    peak = max(int(np.abs(w.astype(np.int32)).max()) for w in q)
    assert peak <= 64 if reduce_range else peak == 127  # symmetric per-channel: the largest weight maps to qmax


def test_default_reduce_range_follows_this_cpu(tmp_path):
    torch.manual_seed(0)
    model = DigitsNet().eval()
    calib = torch.randn(4, *SHAPE[1:])
    report = export_int8(model, calib[:1], calib, tmp_path / "m.onnx", {p: (8, 8) for p in layer_bits(model)})
    assert report.reduce_range is u8s8_saturates()


def test_node_names_of_a_graph_module_map_to_their_modules(tmp_path):
    torch.manual_seed(0)
    model = DigitsNet().eval()
    gm = symbolic_trace(model)
    calib = torch.randn(8, *SHAPE[1:])
    bits = {p: (8, 8) for p in layer_bits(gm)}
    bits["inception2.branch1.0"] = (32, 32)  # its name collides with inception1's in the exported graph
    report = export_int8(gm, calib[:1], calib, tmp_path / "gm.onnx", bits)
    by_path = {l.path: l for l in report.layers}
    assert by_path["inception2.branch1.0"].realised[0] == 32
    assert by_path["inception1.branch1.0"].realised == (8, 8)
    assert len({l.node for l in report.layers}) == 18


def test_module_path_of_node_joins_scopes():
    assert module_path_of_node("/layer1/layer1.0/conv1/Conv") == "layer1.0.conv1"
    assert module_path_of_node("/inception1/branch2/branch2.0/branch2.0.0/Conv") == "inception1.branch2.0.0"
    assert module_path_of_node("/fc1/Gemm") == "fc1"
    assert module_path_of_node("Conv_0") is None


def _ort_kernels(path, tmp_path):
    """Op types of the graph ONNX Runtime actually runs (after its optimisations)."""
    import collections

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "ort-optimised.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


class _Residual(torch.nn.Module):
    """conv-bn-relu x3 with a residual add: untrained, so every folded bias is the same zero tensor."""

    def __init__(self):
        super().__init__()
        cbr = lambda: torch.nn.Sequential(torch.nn.Conv2d(32, 32, 3, padding=1, bias=False),
                                          torch.nn.BatchNorm2d(32), torch.nn.ReLU())
        self.a, self.b, self.c = cbr(), cbr(), cbr()
        self.pool = torch.nn.MaxPool2d(2)

    def forward(self, x):
        y = self.a(x)
        return self.pool(self.c(self.b(y) + y))


@pytest.mark.parametrize("wbits", [8, 4])
def test_untrained_model_runs_integer_kernels(tmp_path, wbits):
    """Shared zero biases are copied per layer, and 4-bit weights are stored as int8 by default,
    so ONNX Runtime fuses every layer into QLinearConv instead of a float conv fed dequantised weights."""
    torch.manual_seed(0)
    model = _Residual().eval()
    x = torch.randn(4, 32, 16, 16)
    bits = {p: (wbits, 8) for p in layer_bits(model)}
    report = export_int8(model, x[:1], [x], tmp_path / "m.onnx", bits)
    kernels = _ort_kernels(report.path, tmp_path)
    assert kernels["QLinearConv"] == 3 and kernels["Conv"] == 0
    assert [l.realised for l in report.layers] == [(8, 8)] * 3
    assert all(l.simulated_only == (wbits == 4) for l in report.layers)


def test_ops_between_float_layers_stay_float(tmp_path):
    """One int8 layer in a float model: the add and pool next to float layers are not quantised."""
    torch.manual_seed(0)
    model = _Residual().eval()
    x = torch.randn(4, 32, 16, 16)
    bits = {"a.0": (32, 32), "b.0": (8, 8), "c.0": (32, 32)}
    report = export_int8(model, x[:1], [x], tmp_path / "m.onnx", bits)
    kernels = _ort_kernels(report.path, tmp_path)
    assert kernels["QLinearConv"] == 1
    assert kernels["QLinearAdd"] == 0 and kernels["QLinearMaxPool"] == 0
    proto = onnx.load(str(report.path))
    # one quantise for b's input and one for its output, nothing around the add or the pool
    assert sum(n.op_type == "QuantizeLinear" for n in proto.graph.node) == 2
    ref, out = _run(report.fp32_path, x), _run(report.path, x)
    assert np.abs(out - ref).max() <= 0.1 * np.abs(ref).max()


class _Shuffle(torch.nn.Module):
    """Two convs around a channel shuffle whose view shapes are computed at run time (dynamic batch)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(32, 32, 1)
        self.b = torch.nn.Conv2d(32, 32, 1)

    def forward(self, x):
        y = self.a(x)
        n, c, h, w = y.size()
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
        return self.b(y)


def test_a_reshape_between_int8_layers_stays_int8(tmp_path):
    """The run-time shape a view reads is not data: the shuffle between two int8 layers stays in int8."""
    torch.manual_seed(0)
    model = _Shuffle().eval()
    x = torch.randn(4, 32, 8, 8)
    report = export_int8(model, x[:1], [x], tmp_path / "m.onnx", {"a": (8, 8), "b": (8, 8)})
    proto = onnx.load(str(report.path))
    excluded = set(report.excluded_nodes)
    reshapes = [n for n in proto.graph.node if n.op_type in ("Reshape", "Transpose")]
    assert len(reshapes) == 3 and not any(n.name in excluded for n in reshapes)
    kernels = _ort_kernels(report.path, tmp_path)
    assert kernels["QLinearConv"] == 2
    assert kernels["QuantizeLinear"] == 1 and kernels["DequantizeLinear"] == 1  # graph input and output only


def test_the_half_precision_file_keeps_32_bit_layers_in_float32_and_scores_as_fp32(trained, tmp_path):
    from autocompress.export.fp16 import export_fp16, half_layers
    from autocompress.export.int8 import call_order
    from autocompress.export.onnx import export_onnx

    model, bundle = trained
    xv, yv = bundle.val.tensors
    bits = {p: (16, 16) for p in layer_bits(model)}
    bits.update({"fc2": (32, 32), "res.conv2": (16, 32)})  # a 32-bit input keeps the layer in float32
    assert half_layers(bits) == set(bits) - {"fc2", "res.conv2"}
    fp32 = export_onnx(model, xv[:1], tmp_path / "m.onnx")
    path = export_fp16(model, xv[:1], fp32, tmp_path / "m.fp16.onnx", set(bits) - half_layers(bits))
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    inits = {t.name: t.data_type for t in proto.graph.initializer}
    nodes = layer_nodes(proto, call_order(model, xv[:1]))
    half, single = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    assert inits[nodes["fc2"].input[1]] == single and inits[nodes["res.conv2"].input[1]] == single
    assert inits[nodes["inception1.branch1.0"].input[1]] == half and inits[nodes["fc1"].input[1]] == half
    assert proto.graph.input[0].type.tensor_type.elem_type == single  # runs where model.onnx runs
    acc_fp32 = float((np.argmax(_run(fp32, xv), 1) == yv.numpy()).mean())
    acc_fp16 = float((np.argmax(_run(path, xv), 1) == yv.numpy()).mean())
    assert abs(acc_fp16 - acc_fp32) <= 0.005
    modules = dict(model.named_modules())
    kept = sum(p.numel() for path in ("fc2", "res.conv2") for p in modules[path].parameters())
    total = sum(p.numel() for p in model.parameters())
    expected = 2 * (total - kept) + 4 * kept  # bytes of weights: half precision but for the float32 layers
    assert path.stat().st_size == pytest.approx(expected, rel=0.03)
