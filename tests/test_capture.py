"""Capturing a model: shapes without memory at any input size, quiet libraries, exact torch.export counts.

Shapes propagate on the meta device, so these sizes are costed without running the model (resnet18 at
32768x32768 would need 68 GB for its first activation alone); what tracers and exporters print goes to the
debug log; torch.export graphs count an LSTM's steps and parameters read outside leaf modules.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from autocompress.errors import AutocompressError, UntraceableModelError, UserInputError
from autocompress.hwmodels import predict
from autocompress.models import load_model
from autocompress.space.costs import CostTable
from autocompress.space.graph import MAX_INPUT_ELEMENTS, REAL_RUN_ELEMENTS, symbolic_trace, trace
from conftest import assert_one_line_error, run_cli


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- shapes on the meta device ---------------------------------------------------------------

def resnet18_macs(n: int) -> int:
    """Conv and linear MACs of resnet18 on an n x n image, by stage (output sides n/2 ... n/32)."""
    side = lambda k: (n // k) ** 2  # noqa: E731
    return (3 * 49 * 64 * side(2) + 4 * 64 * 9 * 64 * side(4)
            + (64 * 9 * 128 + 3 * 128 * 9 * 128 + 64 * 128) * side(8)
            + (128 * 9 * 256 + 3 * 256 * 9 * 256 + 128 * 256) * side(16)
            + (256 * 9 * 512 + 3 * 512 * 9 * 512 + 256 * 512) * side(32) + 512 * 1000)


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return load_model("torchvision:resnet18").model.eval()


def test_the_by_hand_count_is_torchvisions_at_224(resnet18):
    assert trace(resnet18, (1, 3, 224, 224)).totals()["macs"] == resnet18_macs(224) == 1_814_073_344


@pytest.mark.parametrize("side", [4096, 32768])
def test_resnet18_is_costed_at_huge_inputs_without_running_it(resnet18, side):
    x = torch.randn(1, 3, 32, 32)
    before = resnet18(x)
    graph = trace(resnet18, (1, 3, side, side))
    assert graph.totals() == {"macs": resnet18_macs(side), "params": 11_689_512}
    conv1 = graph.node(graph.node_of_module("conv1"))
    assert conv1["out_shape"] == (1, 64, side // 2, side // 2)
    assert graph.node(graph.node_of_module("fc"))["out_shape"] == (1, 1000)
    table = CostTable.from_graph(graph)
    assert table.totals()["macs"] == resnet18_macs(side)
    assert table.peak_activation_bytes() >= 4 * 64 * (side // 2) ** 2  # conv1's output, as if it ran
    assert math.isfinite(predict(table, "mobile").latency_ms)
    # The user's model is as it was: its own weights, on the CPU, giving the same outputs.
    assert all(p.device.type == "cpu" for p in (*resnet18.parameters(), *resnet18.buffers()))
    assert torch.equal(resnet18(x), before)


def test_the_fingerprint_does_not_depend_on_how_shapes_were_found(resnet18):
    """A leaf that reads tensor values cannot run on shapes alone: a small input runs it on real data, with
    the same node attributes a shape-only run gives the rest of the model."""
    class Gate(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else -x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.gate, self.head = nn.Conv2d(3, 8, 3, padding=1), Gate(), nn.Linear(8, 4)

        def forward(self, x):
            return self.head(self.gate(self.conv(x)).mean((2, 3)))

    small = trace(Net(), (1, 3, 16, 16), leaf_paths=["gate"])
    assert small.totals()["macs"] == 3 * 9 * 8 * 256 + 8 * 4
    assert small.node(small.node_of_module("gate"))["out_shape"] == (1, 8, 16, 16)
    with pytest.raises(UntraceableModelError, match=r"input shape \[1, 3, 2048, 2048\].*real data only up to") as exc:
        trace(Net(), (1, 3, 2048, 2048), leaf_paths=["gate"])
    assert "\n" not in str(exc.value)


def test_an_input_too_large_to_run_is_refused_before_anything_is_allocated(resnet18):
    with pytest.raises(UserInputError, match="elements per sample") as exc:
        trace(resnet18, (1, 3, 2 ** 21, 2 ** 21))
    assert "\n" not in str(exc.value) and 3 * 2 ** 42 > MAX_INPUT_ELEMENTS
    result = run_cli("profile", "--model", "builtin:digits-net", "--input-shape", "1,1,2000000,2000000")
    assert_one_line_error(result, "4e+12 elements per sample", "--input-shape")


def test_a_big_input_the_model_rejects_keeps_the_models_own_message():
    model = load_model("builtin:digits-net").model
    assert 3 * 4096 * 4096 > REAL_RUN_ELEMENTS  # so this never runs for real
    with pytest.raises(UntraceableModelError) as exc:
        trace(model, (1, 3, 4096, 4096))
    first = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    assert f"input shape [1, 3, 4096, 4096]: Invalid channel dimensions in module {first!r} (Conv2d(1, " \
           in str(exc.value) and "given [1, 3, 4096, 4096])" in str(exc.value)
    assert str(exc.value).endswith("pass the right --input-shape N,C,H,W")


def test_torch_pruning_groups_on_shapes_alone_equal_the_real_ones(resnet18):
    """What ModelGraph.on_shapes offers passes that need shapes only: the same coupled groups at any size."""
    tp = pytest.importorskip("torch_pruning")

    def groups(graph, x):
        dg = tp.DependencyGraph().build_dependency(graph.gm, example_inputs=x)
        names = {m: n for n, m in graph.gm.named_modules()}
        return sorted(sorted(f"{names[d.target.module]}:{dg.is_out_channel_pruning_fn(d.handler)}"
                             for d, _ in g if d.target.module in names)
                      for g in dg.get_all_groups(root_module_types=[nn.Conv2d, nn.Linear]))

    small = trace(resnet18, (1, 3, 64, 64))
    real = groups(small, small.example())
    big = trace(resnet18, (1, 3, 4096, 4096))
    assert big.on_shapes(lambda *x: groups(big, x), grad=True) == real and len(real) == 13


# ---- torch.export on meta, LSTMs and parameters read by functions ----------------------------

class TakesLongSequences(nn.Module):
    """A branch on a shape defeats torch.fx; torch.export takes it."""

    def __init__(self, hidden: int = 32, bidirectional: bool = False, layers: int = 1) -> None:
        super().__init__()
        self.lstm = nn.LSTM(16, hidden, num_layers=layers, batch_first=True, bidirectional=bidirectional)
        self.fc = nn.Linear(hidden * (2 if bidirectional else 1), 4)

    def forward(self, x):
        out, (h, c) = self.lstm(x)
        if x.shape[1] > 3:
            out = out * 2
        return self.fc(out[:, -1]) + h[-1, :, :4] + c[-1, :, :4]


@pytest.mark.parametrize("bidirectional,layers", [(False, 1), (True, 2)])
def test_an_exported_lstm_counts_its_steps_and_keeps_its_output_shape(bidirectional, layers):
    model = TakesLongSequences(bidirectional=bidirectional, layers=layers).eval()
    graph = trace(model, (1, 12, 16))
    assert not graph.fx_traced
    dirs = 2 if bidirectional else 1
    # 4 gates x hidden x (inputs + hidden) per layer and direction; layer 2 reads both directions' outputs.
    weights = dirs * 4 * 32 * (16 + 32) + (layers - 1) * dirs * 4 * 32 * (32 * dirs + 32)
    lstm = graph.node("lstm")
    assert lstm["macs"] == 12 * weights and lstm["seq_len"] == 12
    assert lstm["out_shape"] == (1, 12, 32 * dirs)  # the sequence output, not the last state tensor
    assert lstm["in_shapes"][0] == (1, 12, 16)
    assert graph.totals() == {"macs": 12 * weights + 32 * dirs * 4, "params": n_params(model)}
    assert CostTable.from_graph(graph).totals()["macs"] == graph.totals()["macs"]


def encoder_macs(t: int, d: int = 64, ffn: int = 128) -> int:
    return 4 * t * d * d + 2 * t * t * d + 2 * t * d * ffn  # q, k, v, out; Q.K^T and .V; the FFN


def test_an_exported_encoder_layer_counts_the_parameters_its_attention_reads_as_functions():
    """nn.MultiheadAttention hands in_proj_weight and out_proj's tensors to F.multi_head_attention_forward:
    no leaf module owns those reads, so the linear functions that read them count them, once."""
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True).eval()
    graph = trace(model, (1, 16, 64))
    assert not graph.fx_traced
    assert graph.totals() == {"macs": encoder_macs(16), "params": n_params(model)} and n_params(model) == 33_472
    linears = [graph.node(n) for n in graph.layers("linear") if not graph.node(n)["module_type"]]
    assert [(a["macs"], a["params"]) for a in linears] == [(16 * 64 * 192, 64 * 192 + 192), (16 * 64 * 64, 64 * 64 + 64)]
    table = CostTable.from_graph(graph).totals()
    assert (table["macs"], table["params"], table["weight_bytes"]) == (encoder_macs(16), 33_472, 4 * 33_472)


def test_a_long_sequence_is_exported_on_the_meta_device():
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True).eval()
    tokens = 2 ** 17  # 8M input elements, a 64 GB attention score matrix
    graph = trace(model, (1, tokens, 64))
    assert graph.totals() == {"macs": encoder_macs(tokens), "params": 33_472}
    assert all(p.device.type == "cpu" for p in model.parameters())


# ---- quiet tracing -----------------------------------------------------------------------------

class RoundSTE(torch.autograd.Function):
    """Rounding with a straight-through gradient, reading a weight as numpy (fine in a Function's forward)."""

    @staticmethod
    def forward(ctx, x, w):
        return torch.round(x * float(w.numpy().std() > 0) * 4) / 4

    @staticmethod
    def backward(ctx, g):
        return g, None


class Quantised(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(RoundSTE.apply(self.conv(x), self.conv.weight).mean((2, 3)))


def test_a_custom_autograd_function_stays_one_node_with_its_backward():
    """torch.fx used to trace through Function.apply: the graph lost the custom backward and ran the forward's
    code with grad on (w.numpy() raised inside Torch-Pruning's pass, and fx printed its 24-line traceback)."""
    torch.manual_seed(0)
    model = Quantised().eval()
    gm = symbolic_trace(model)
    assert [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"][:1] == ["RoundSTE_apply"]
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(gm(x), model(x))
    gm(x).sum().backward()  # through the straight-through backward: rounding's own gradient is zero
    assert model.conv.weight.grad is not None and model.conv.weight.grad.abs().sum() > 0


def test_a_custom_autograd_function_model_opens_silently(capfd):
    from autocompress.api import open_model

    torch.manual_seed(0)
    ws = open_model("quantised", module=Quantised(), input_shape=(1, 3, 16, 16))
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    assert ws.graph.fx_traced and ws.graph.totals() == {"macs": 3 * 9 * 8 * 196 + 8 * 2, "params": 242}
    assert "prune:conv" in {d.id for d in ws.space.decisions}


def test_a_failed_torch_export_says_one_line_and_prints_nothing(capfd, caplog):
    class ReadsValues(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, x):
            y = self.conv(x)
            return y * 2 if y.sum() > 0 else -y  # neither fx nor torch.export captures this

    caplog.set_level(logging.DEBUG, logger="autocompress.debug")
    with pytest.raises(UntraceableModelError, match="torch.export failed too") as exc:
        trace(ReadsValues(), (1, 3, 8, 8))
    assert "\n" not in str(exc.value) and "AUTOCOMPRESS_DEBUG=1" in str(exc.value)
    assert capfd.readouterr() == ("", "")
    assert "def forward(" in caplog.text  # the graph torch.export dumped, in the debug log


class Spectrum(nn.Module):
    def forward(self, x):
        return torch.fft.rfft(x).abs()  # no ONNX export at opset 17


def test_a_failed_onnx_export_keeps_its_ir_dump_off_stdout(tmp_path, capfd, caplog):
    from autocompress.export.onnx import export_onnx

    caplog.set_level(logging.DEBUG, logger="autocompress.debug")
    with pytest.raises(AutocompressError, match="ONNX export failed.*fft_rfft") as exc:
        export_onnx(Spectrum().eval(), torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    assert "\n" not in str(exc.value)
    assert capfd.readouterr() == ("", "")
    assert "Torch IR graph at exception" in caplog.text
    assert not list(tmp_path.iterdir())


def test_autocompress_debug_lets_the_exporter_print(tmp_path, capfd, monkeypatch):
    from autocompress.export.onnx import export_onnx

    monkeypatch.setenv("AUTOCOMPRESS_DEBUG", "1")
    with pytest.raises(AutocompressError):
        export_onnx(Spectrum().eval(), torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    out, err = capfd.readouterr()
    assert "Torch IR graph at exception" in out + err


def test_an_export_that_works_still_exports_quietly(tmp_path, capfd):
    from autocompress.export.onnx import export_onnx

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    path = export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    assert path.exists() and capfd.readouterr() == ("", "")
    import onnxruntime as ort

    x = torch.randn(2, 3, 8, 8)
    got = ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})[0]
    assert torch.allclose(torch.from_numpy(got), model(x), atol=1e-5)
