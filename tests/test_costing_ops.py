"""Every layer is costed truthfully: 1-d and 3-d convs, RNNs, attention, norms, embeddings, on every target.

MACs and params are counted by hand; predictions are checked for being there (every row that computes has
a latency), finite, growing with the sequence, and following the stated rules (docs in hwmodels.sequence).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autocompress.hwmodels import get_target, predict
from autocompress.hwmodels.fusion import structure
from autocompress.hwmodels.targets import TARGETS
from autocompress.space.costs import CostTable
from autocompress.space.export_graph import capture
from autocompress.space.graph import ModelGraph, fingerprint, trace
from autocompress.space.inputs import Inputs
from conftest import run_cli


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Built-in targets only: no calibrated file from the user's cache."""
    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path / "cache"))


def table_of(model: nn.Module, shape: tuple[int, ...]) -> CostTable:
    return CostTable.from_graph(trace(model.eval(), shape))


def exported_table(model: nn.Module, shape: tuple[int, ...]) -> CostTable:
    """The table from the torch.export graph builder (what models torch.fx cannot trace get)."""
    g, order = capture(model.eval(), (torch.randn(*shape),), RuntimeError("use torch.export"))
    return CostTable.from_graph(ModelGraph(model, g, shape, fingerprint(g, order), (), order, None, fx_traced=False))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def assert_costed_everywhere(table: CostTable) -> dict[str, float]:
    """Every row with MACs gets a finite nonzero latency (its own or its kernel's) on every target."""
    totals = {}
    for name in TARGETS.names():
        p = predict(table, name)
        assert math.isfinite(p.latency_ms) and math.isfinite(p.energy_mj) and p.latency_ms > 0
        for row in table:
            if row.macs > 0:
                layer = p.layer(row.name)
                assert layer.latency_ms > 0 and not layer.fused_into, (name, row.name, row.op)
                assert math.isfinite(layer.latency_ms) and layer.energy_mj > 0
        totals[name] = p.latency_ms
    return totals


# ---- 1-d and 3-d convolutions ------------------------------------------------------------------

def test_conv1d_by_hand():
    model = nn.Sequential(nn.Conv1d(8, 16, 5, stride=2, padding=2, groups=2), nn.BatchNorm1d(16), nn.ReLU(),
                          nn.MaxPool1d(2))
    table = table_of(model, (1, 8, 40))
    conv = next(r for r in table if r.op == "conv")
    assert (conv.kernel, conv.stride, conv.spatial) == ((5,), (2,), 20)
    assert conv.macs == (8 // 2) * 5 * 16 * 20 == 6400
    assert conv.params == (8 // 2) * 5 * 16 + 16
    assert conv.in_numel == 8 * 40  # the input before striding
    assert [r.op for r in table][1:] == ["conv", "bn", "act", "pool"]
    assert table.totals()["params"] == n_params(model) == 336 + 32
    assert_costed_everywhere(table)
    for name in TARGETS.names():  # conv + BN + ReLU is one kernel, as for Conv2d
        p = predict(table, name)
        assert [l.fused_into for l in p.layers if l.op in ("bn", "act")] == [conv.name, conv.name]


def test_conv3d_by_hand():
    model = nn.Sequential(nn.Conv3d(4, 8, 3, stride=(1, 2, 2), padding=1), nn.BatchNorm3d(8), nn.ReLU(),
                          nn.AvgPool3d(2))
    table = table_of(model, (1, 4, 6, 16, 16))
    conv = next(r for r in table if r.op == "conv")
    assert (conv.kernel, conv.stride, conv.spatial) == ((3, 3, 3), (1, 2, 2), 6 * 8 * 8)
    assert conv.macs == 4 * 27 * 8 * 384 == 331_776
    assert conv.in_numel == 4 * 6 * 16 * 16
    assert table.totals()["params"] == n_params(model) == 4 * 27 * 8 + 8 + 2 * 8
    assert {r.op for r in table} >= {"conv", "bn", "act", "pool"}
    assert_costed_everywhere(table)


def test_non_2d_convs_keep_plain_tensors_on_blocked_layout_targets():
    conv1d = table_of(nn.Sequential(nn.Conv1d(64, 64, 3, padding=1)), (1, 64, 256))
    conv2d = table_of(nn.Sequential(nn.Conv2d(64, 64, (1, 3), padding=(0, 1))), (1, 64, 1, 256))
    assert conv1d.totals()["macs"] == conv2d.totals()["macs"]
    local = get_target("local")
    s1, s2 = structure(conv1d, local), structure(conv2d, local)
    # The 2-d conv runs blocked: its input is reordered in and the output reordered out; the 1-d one not.
    def reordered(st) -> float:
        return sum(k.reordered_elements for k in st.kernels) + sum(o.reordered_elements for o in st.ops)

    assert reordered(s1) == 0 and reordered(s2) == 64 * 256
    assert not s1.kernels[0].plain and s1.kernels[0].padded_macs == s2.kernels[0].padded_macs
    assert predict(conv1d, local).latency_ms < predict(conv2d, local).latency_ms
    # Targets without layouts cost the same conv in 1-d and 2-d alike.
    assert predict(conv1d, "mobile").latency_ms == pytest.approx(predict(conv2d, "mobile").latency_ms, rel=1e-12)


# ---- recurrent layers --------------------------------------------------------------------------

class TwoLayerBiLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(20, 32, num_layers=2, bidirectional=True, batch_first=True)
        self.fc = nn.Linear(64, 5)
        self.state = nn.Linear(32, 5)

    def forward(self, x):
        out, (h, c) = self.lstm(x)  # a tuple: every consumer goes through getitem
        return self.fc(out[:, -1]) + self.state(h[-1] + c[-1])


# Weights per layer and direction: 4 gates x hidden x (inputs + hidden); layer 1 reads 2 x 32 (both directions).
BILSTM_WEIGHTS = 2 * 4 * 32 * (20 + 32) + 2 * 4 * 32 * (64 + 32)
BILSTM_STEPS = 7


@pytest.mark.parametrize("builder", [table_of, exported_table], ids=["fx", "export"])
def test_bidirectional_two_layer_lstm_by_hand(builder):
    model = TwoLayerBiLSTM()
    table = builder(model, (1, BILSTM_STEPS, 20))
    rnn = next(r for r in table if r.op == "rnn")
    assert (rnn.rnn_layers, rnn.directions, rnn.gates, rnn.spatial) == (2, 2, 4, BILSTM_STEPS)
    assert rnn.macs == BILSTM_STEPS * BILSTM_WEIGHTS == 7 * 37_888
    assert rnn.params == BILSTM_WEIGHTS + 2 * 4 * 32 * 2 * 2 == n_params(model.lstm)  # two bias vectors per gate
    assert rnn.out_numel == BILSTM_STEPS * 64
    assert table.totals()["macs"] == rnn.macs + 64 * 5 + 32 * 5
    assert table.totals()["params"] == n_params(model)
    assert_costed_everywhere(table)


def test_gru_reading_a_sequence_first_input_by_hand():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gru = nn.GRU(12, 24)  # (seq, batch, features)

        def forward(self, x):
            out, _ = self.gru(x.transpose(0, 1))
            return out[-1]

    table = table_of(Net(), (1, 9, 12))
    gru = next(r for r in table if r.op == "rnn")
    assert (gru.gates, gru.spatial) == (3, 9)
    assert gru.macs == 9 * 3 * 24 * (12 + 24) == 23_328
    assert table.totals()["params"] == 3 * 24 * (12 + 24) + 2 * 3 * 24 == n_params(Net())
    assert_costed_everywhere(table)


def test_an_rnn_is_latency_bound_one_synchronised_step_at_a_time():
    """One runtime op per layer, and every step of every layer and direction waits for the one before:
    a longer sequence costs at least its extra steps' overheads more."""
    short, long = table_of(TwoLayerBiLSTM(), (1, 7, 20)), table_of(TwoLayerBiLSTM(), (1, 14, 20))
    name = next(r.name for r in short if r.op == "rnn")
    for target in TARGETS.names():
        t = get_target(target)
        kernel = next(k for k in structure(short, t).kernels if k.head == name)
        assert (kernel.launches, kernel.steps) == (2, 2 * 2 * 7)
        # The recurrent weights (4 x 32 x 32 per layer-direction) are read again at each later step.
        weights = 4 * BILSTM_WEIGHTS + 4 * 2 * 4 * 32 * 2 * 2
        assert kernel.weight_bytes == weights and kernel.bytes_moved > weights + 6 * 4 * (4 * 32 * 32 * 4)
        a, b = predict(short, t).layer(name).latency_ms, predict(long, t).layer(name).latency_ms
        assert a > (2 * t.kernel_overhead_us + 28 * t.step_overhead_us) / 1e3
        assert b - a >= 28 * t.step_overhead_us / 1e3 * (1 - 1e-9)


# ---- attention, norms, GELU ----------------------------------------------------------------------

class Block(nn.Module):
    """A transformer encoder layer from torch.nn parts (traced by torch.fx)."""

    def __init__(self, d: int = 64, heads: int = 4, ffn: int = 128) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.up, self.act, self.down = nn.Linear(d, ffn), nn.GELU(), nn.Linear(ffn, d)

    def forward(self, x):
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        a = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        x = self.ln1(x + self.o(a.transpose(1, 2).reshape(b, t, d)))
        return self.ln2(x + self.down(self.act(self.up(x))))


def block_macs(t: int, d: int = 64, ffn: int = 128) -> int:
    return 4 * t * d * d + 2 * t * t * d + 2 * t * d * ffn  # q, k, v, o; Q.K^T and .V over all heads; the FFN


def test_nn_transformer_block_by_hand():
    table = table_of(Block(), (1, 16, 64))
    assert table.totals()["macs"] == block_macs(16) == 557_056
    assert table.totals()["params"] == n_params(Block()) == 4 * (64 * 64 + 64) + 2 * 128 + 64 * 128 + 128 + 128 * 64 + 64
    att = next(r for r in table if r.op == "attention")
    assert (att.heads, att.head_dim, att.seq_q, att.seq_k) == (4, 16, 16, 16)
    assert [r.op for r in table if r.target in ("ln1", "ln2", "act")] == ["norm", "act", "norm"]
    short = assert_costed_everywhere(table)
    long = assert_costed_everywhere(table_of(Block(), (1, 32, 64)))
    assert all(long[n] > short[n] for n in short), (short, long)


def test_linear_over_tokens_is_a_gemm_with_m_rows():
    table = table_of(Block(), (1, 16, 64))
    up = next(r for r in table if r.target == "up")
    assert (up.spatial, up.in_ch, up.out_ch, up.macs) == (16, 64, 128, 16 * 64 * 128)
    kernel = next(k for k in structure(table, get_target("mobile")).kernels if k.head == up.name)
    assert (kernel.macs, kernel.output_positions, kernel.output_elements) == (16 * 64 * 128, 16, 16 * 128)
    # Weights (at 32 bits) plus 16 rows in and out: not a matrix-vector product served from cache.
    assert kernel.bytes_moved == 4 * (64 * 128 + 128) + 4 * 16 * (64 + 128)


def test_onnx_runtime_adds_a_sequence_linear_bias_in_a_pass_of_its_own():
    """ORT exports a linear over tokens as MatMul + Add and fuses neither (Gemm fusions take 2-d inputs): the
    bias is a second launch reading and writing the output, unless a GELU follows (BiasGelu)."""
    table = table_of(Block(), (1, 16, 64))
    local = get_target("local")
    assert not local.sequence_linear_epilogue and get_target("mobile").sequence_linear_epilogue
    kernels = {k.head: k for k in structure(table, local).kernels}
    fused = {k.head: k for k in structure(table, local.with_(sequence_linear_epilogue=True)).kernels}
    q, up, down = (next(r.name for r in table if r.target == t) for t in ("q", "up", "down"))
    assert kernels[q].launches == 2 and fused[q].launches == 1
    assert kernels[q].bytes_moved - fused[q].bytes_moved == 2 * 16 * 64 * 4 + 64 * 4
    assert kernels[up].launches == 1 and kernels[up].bytes_moved == fused[up].bytes_moved  # BiasGelu takes the bias
    add = next(r.name for r in table if r.op == "add" and down in r.inputs)
    assert predict(table, local).layer(add).fused_into == ""  # the residual add does not join a MatMul
    assert predict(table, local.with_(sequence_linear_epilogue=True)).layer(add).fused_into == down


def test_attention_scores_go_through_memory_unless_the_runtime_fuses_it():
    table = table_of(Block(), (1, 32, 64))
    name = next(r.name for r in table if r.op == "attention")
    for target in TARGETS.names():
        t = get_target(target)
        unfused, fused = t.with_(fused_attention=False), t.with_(fused_attention=True)
        k_unfused = next(k for k in structure(table, unfused).kernels if k.head == name)
        k_fused = next(k for k in structure(table, fused).kernels if k.head == name)
        scores = 4 * 32 * 32  # heads x seq_q x seq_k
        assert k_unfused.bytes_moved - k_fused.bytes_moved == 4 * scores * 4  # written, read, written, read
        assert (k_unfused.launches, k_fused.launches) == (3, 1)
        assert k_fused.macs == 2 * 4 * 32 * 32 * 16 and k_fused.weight_bytes == 0
        assert predict(table, unfused).layer(name).latency_ms > predict(table, fused).layer(name).latency_ms
    assert get_target("gpu").fused_attention and not get_target("local").fused_attention


def test_gelu_is_its_own_pass_where_the_runtime_does_not_fuse_it():
    table = table_of(Block(), (1, 16, 64))
    act = next(r.name for r in table if r.target == "act")
    up = next(r.name for r in table if r.target == "up")
    for target in TARGETS.names():
        layer = predict(table, target).layer(act)
        if get_target(target).fuses_gelu:
            assert layer.fused_into == up and layer.latency_ms == 0
        else:
            assert not layer.fused_into and layer.latency_ms > 0
    assert get_target("gpu").fuses_gelu and not get_target("local").fuses_gelu


def test_an_embedding_reads_the_rows_it_gathers_not_the_table():
    def ops_bytes(vocab: int) -> float:
        model = nn.Sequential(nn.Embedding(vocab, 32))
        ids = torch.randint(0, vocab, (1, 10))
        table = CostTable.from_graph(trace(model, inputs=Inputs.from_example((ids,), model)))
        row = next(r for r in table if r.op == "embedding")
        assert row.params == vocab * 32
        st = structure(table, get_target("mobile"))
        return next(o for o in st.ops if o.name == row.name).bytes_moved

    assert ops_bytes(1000) == ops_bytes(50_000) == 10 * 8 + 10 * 32 * 4 * 2  # ids, the rows read, the output


class CrossAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(64, 4, batch_first=True)
        self.fc = nn.Linear(64, 8)

    def forward(self, x, memory):
        a, _ = self.att(x, memory, memory)
        return self.fc(a)


def test_a_whole_multihead_attention_is_costed_with_its_projections():
    """torch.fx keeps nn.MultiheadAttention whole: its four projections and attention over its key length."""
    model = CrossAttention().eval()
    x, memory = torch.randn(1, 16, 64), torch.randn(1, 24, 64)
    table = CostTable.from_graph(trace(model, inputs=Inputs.from_example((x, memory), model)))
    mha = next(r for r in table if r.op == "mha")
    assert (mha.heads, mha.head_dim, mha.seq_q, mha.seq_k) == (4, 16, 16, 24)
    assert mha.macs == 2 * 16 * 64 * 64 + 2 * 24 * 64 * 64 + 2 * 16 * 24 * 64  # q, out; k, v; Q.K^T, .V
    assert mha.params == n_params(model.att) and table.totals()["params"] == n_params(model)
    assert_costed_everywhere(table)


def test_a_transformer_encoder_layer_through_torch_export_by_hand():
    """nn.TransformerEncoderLayer defeats torch.fx: torch.export sees its attention as functions (the packed
    projection is a linear function on a parameter) and the MACs still add up."""
    model = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True).eval()
    graph = trace(model, (1, 16, 64))
    assert not graph.fx_traced
    table = CostTable.from_graph(graph)
    assert table.totals()["macs"] == block_macs(16)
    assert_costed_everywhere(table)


# ---- a transformers BERT (torch.export) ---------------------------------------------------------

BERT = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


def bert_table(tokens: int) -> CostTable:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**BERT)).eval()
    ids = torch.randint(0, 1000, (1, tokens))
    graph = trace(model, inputs=Inputs.from_example((ids,), model))
    assert not graph.fx_traced
    table = CostTable.from_graph(graph)
    assert table.totals()["params"] == n_params(model)
    return table


def bert_macs(t: int, h: int = 64, ffn: int = 128, layers: int = 2) -> int:
    return layers * (4 * t * h * h + 2 * t * t * h + 2 * t * h * ffn) + h * h  # encoder layers, then the pooler


def test_bert_by_hand_and_costed_on_every_target():
    short, long = bert_table(16), bert_table(32)
    assert short.totals()["macs"] == bert_macs(16) == 1_118_208
    assert long.totals()["macs"] == bert_macs(32)
    ops = [r.op for r in short]
    assert ops.count("attention") == 2 and ops.count("embedding") == 3 and ops.count("norm") == 5
    a, b = assert_costed_everywhere(short), assert_costed_everywhere(long)
    assert all(b[n] > a[n] for n in a), (a, b)
    for row in short:  # norms, embeddings and softmax-free elementwise rows are memory passes, never free
        if row.op in ("norm", "embedding"):
            assert all(predict(short, n).layer(row.name).latency_ms > 0 for n in TARGETS.names())


# ---- the space lists what it cannot compress -----------------------------------------------------

LSTM_MODEL = """
import torch
from torch import nn

INPUT_SHAPE = (1, 12, 16)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(16, 32, batch_first=True)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.fc(out[:, -1])


def model():
    return Net()
"""


def test_space_json_lists_an_lstm_as_not_compressible(tmp_path):
    (tmp_path / "lstm.py").write_text(LSTM_MODEL)
    result = run_cli("space", "--model", f"{tmp_path}/lstm.py:model", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["not_compressible"] == [{
        "layer": "lstm", "op": "rnn", "macs": 12 * 4 * 32 * (16 + 32), "params": 4 * 32 * (16 + 32) + 2 * 4 * 32,
        "reason": data["not_compressible"][0]["reason"]}]
    reason = data["not_compressible"][0]["reason"]
    assert reason.startswith("no decisions for LSTM layers") and "per step" in reason
    assert all("lstm" not in d["layers"] for d in data["decisions"])
    assert any(d["layers"] == ["fc"] for d in data["decisions"])
    table = run_cli("space", "--model", f"{tmp_path}/lstm.py:model")
    assert table.exit_code == 0 and "not compressible" in table.stdout and "LSTM" in table.stdout


def test_a_bert_space_lists_its_embeddings_but_not_the_attention_its_projections_feed():
    transformers = pytest.importorskip("transformers")
    from autocompress.compress import build_space

    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**BERT)).eval()
    ids = torch.randint(0, 1000, (1, 16))
    space = build_space(trace(model, inputs=Inputs.from_example((ids,), model)), "bert")
    rest = {r["layer"]: r for r in space.not_compressible()}
    embeddings = ("embeddings.word_embeddings", "embeddings.position_embeddings", "embeddings.token_type_embeddings")
    assert all(rest[e]["op"] == "embedding" and "gather" in rest[e]["reason"] for e in embeddings)
    assert rest["embeddings.word_embeddings"]["params"] == 1000 * 64
    assert not [r for r in rest.values() if r["op"] in ("attention", "linear")]  # q/k/v decisions cover them
    assert space.to_json()["not_compressible"] == list(rest.values())
