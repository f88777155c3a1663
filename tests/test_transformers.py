"""Transformers: nn.MultiheadAttention split into linear layers, attention units found by structure, and
head pruning, MLP widths, block dropping, factorisation and bit-widths on a BERT and a ViT."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from autocompress.compress import ApplyContext, apply, build_space, estimate
from autocompress.compress.attention import SplitAttention, attention_units, split_attention
from autocompress.compress.drop import PassThrough
from autocompress.compress.quant import layer_bits, strip_fake_quant
from autocompress.errors import UntraceableModelError
from autocompress.space.costs import CostTable
from autocompress.space.graph import trace
from autocompress.space.inputs import Inputs
from autocompress.space.policy import Policy
from test_apply_consistency import random_policies

transformers = pytest.importorskip("transformers")

SPLIT_ATOL = 1e-5


def _bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=128, num_labels=3)
    return transformers.BertForSequenceClassification(config).eval()


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                                                mlp_dim=128, num_classes=10).eval()


@pytest.fixture(scope="module")
def bert():
    model = _bert()
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    return model, ids, trace(model, inputs=Inputs.from_example((ids,), model))


@pytest.fixture(scope="module")
def vit():
    model = split_attention(_vit())
    return model, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), trace(model, (1, 3, 32, 32))


# -- split_attention -----------------------------------------------------------------------------

def _mha_cases():
    kpm = torch.zeros(3, 7, dtype=torch.bool)
    kpm[:, -2:] = True
    causal = torch.triu(torch.ones(5, 7, dtype=torch.bool), 1)
    return [dict(need_weights=False), dict(), dict(key_padding_mask=kpm), dict(attn_mask=causal, need_weights=False),
            dict(attn_mask=causal.float() * -1e4, key_padding_mask=kpm.float() * -1e4, average_attn_weights=False),
            dict(attn_mask=torch.randn(3 * 4, 5, 7), need_weights=False)]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [None, 24])
@pytest.mark.parametrize("case", range(6))
def test_split_attention_matches_multihead_attention(batch_first, kdim, case):
    torch.manual_seed(case)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first, kdim=kdim, vdim=kdim).eval()
    with torch.no_grad():
        mha.in_proj_bias.uniform_(-0.5, 0.5)  # torch initialises it to zeros, which would hide a bias mix-up
    split = SplitAttention.from_mha(mha).eval()
    q = torch.randn(3, 5, 32) if batch_first else torch.randn(5, 3, 32)
    kv = torch.randn(3, 7, kdim or 32) if batch_first else torch.randn(7, 3, kdim or 32)
    kwargs = _mha_cases()[case]
    with torch.no_grad():
        want, want_w = mha(q, kv, kv, **kwargs)
        got, got_w = split(q, kv, kv, **kwargs)
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= SPLIT_ATOL
    assert (got_w is None) == (want_w is None) == (kwargs.get("need_weights", True) is False)
    if want_w is not None:
        assert got_w.shape == want_w.shape and float((got_w - want_w).abs().max()) <= SPLIT_ATOL
    assert (split.num_heads, split.head_dim) == (4, 8)
    assert [m.out_features for m in (split.q_proj, split.k_proj, split.v_proj)] == [32, 32, 32]


def test_split_attention_takes_unbatched_inputs():
    mha = nn.MultiheadAttention(16, 2).eval()
    x = torch.randn(5, 16)
    with torch.no_grad():
        (want, want_w), (got, got_w) = mha(x, x, x), SplitAttention.from_mha(mha)(x, x, x)
    assert got.shape == (5, 16) and got_w.shape == (5, 5)
    assert float((got - want).abs().max()) <= SPLIT_ATOL and float((got_w - want_w).abs().max()) <= SPLIT_ATOL


def test_split_attention_refuses_extra_key_value_rows():
    model = nn.Sequential(nn.MultiheadAttention(16, 2, add_bias_kv=True))
    with pytest.raises(UntraceableModelError, match="add_bias_kv"):
        split_attention(model)


def test_split_vit_and_encoder_keep_their_outputs():
    model = _vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        got = split_attention(model)(x)
    assert isinstance(model.encoder.layers.encoder_layer_0.self_attention, SplitAttention)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    assert float((got - want).abs().max()) <= SPLIT_ATOL
    torch.manual_seed(1)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2).eval()
    x = torch.randn(2, 6, 32)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[0, -2:] = True
    with torch.no_grad():
        want, want_padded = enc(x), enc(x, src_key_padding_mask=padding)
        split_attention(enc)
        got, got_padded = enc(x), enc(x, src_key_padding_mask=padding)
    assert float((got - want).abs().max()) <= SPLIT_ATOL
    assert float((got_padded - want_padded)[~padding].abs().max()) <= SPLIT_ATOL  # padded rows are undefined


# -- attention units -----------------------------------------------------------------------------

def test_attention_units_are_found_in_bert_by_structure(bert):
    _, _, mg = bert
    units = attention_units(mg)
    assert [u.holder for u in units] == [f"bert.encoder.layer.{i}.attention.self" for i in range(4)]
    u = units[0]
    assert (u.q, u.k, u.v, u.out) == tuple(f"bert.encoder.layer.0.attention.{p}" for p in
                                           ("self.query", "self.key", "self.value", "output.dense"))
    assert (u.heads, u.head_dim) == (4, 16)
    assert any(mg.node(n)["op"] == "attention" for n in u.region)


def test_attention_units_are_found_in_split_vit(vit):
    _, _, mg = vit
    units = attention_units(mg)
    assert [u.holder for u in units] == [f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(2)]
    assert units[1].out == "encoder.layers.encoder_layer_1.self_attention.out_proj" and units[1].heads == 4


def test_eager_attention_is_found_too():
    class Eager(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.num_heads, self.head_dim = 2, 8
            self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

        def forward(self, x):
            q, k, v = (p(x).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
                       for p in (self.q, self.k, self.v))
            w = torch.softmax(q @ k.transpose(-2, -1) * self.head_dim ** -0.5, dim=-1)
            return self.o((w @ v).transpose(1, 2).flatten(2))

    units = attention_units(trace(Eager(), (1, 5, 16)))
    assert [(u.q, u.k, u.v, u.out, u.heads, u.head_dim) for u in units] == [("q", "k", "v", "o", 2, 8)]


# -- the space on transformers: heads, MLP widths, drop, rank, bits ------------------------------

KINDS = {"heads", "prune", "rank", "wbits", "abits", "drop"}


@pytest.fixture(scope="module")
def bert_space(bert):
    return build_space(bert[2], "test:bert")


@pytest.fixture(scope="module")
def vit_space(vit):
    return build_space(vit[2], "test:vit")


def _outputs(model, x):
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


def _measured(model, mg) -> dict:
    """Totals of the re-traced built model, each layer at its bit-widths. The float twin is traced because
    the torch.export capture sizes a leaf module by its first op, which for a fake-quant layer is a min."""
    table = CostTable.from_graph(trace(strip_fake_quant(model), inputs=mg.inputs))
    bits = layer_bits(model)
    for row in table:
        if row.op in ("conv", "linear"):
            row.wbits, row.abits = bits.get(row.target, (32, 32))
    return table.totals()


def test_bert_space_offers_heads_mlp_widths_drop_rank_and_bits(bert_space):
    space = bert_space
    assert {d.kind for d in space.decisions} == KINDS
    assert [d.id for d in space.of_kind("heads")] == [f"heads:bert.encoder.layer.{i}.attention.self" for i in range(4)]
    assert space["heads:bert.encoder.layer.0.attention.self"].choices == (0.0, 0.25, 0.5, 0.75)
    assert [d.id for d in space.of_kind("drop")] == [f"drop:bert.encoder.layer.{i}" for i in range(4)]
    prune = {d.id: set(d.layers) for d in space.of_kind("prune")}
    assert prune["prune:bert.encoder.layer.2.intermediate.dense"] == {"bert.encoder.layer.2.intermediate.dense",
                                                                     "bert.encoder.layer.2.output.dense"}
    assert len(prune) == 5  # four MLP widths and the pooler; never a projection of the attention
    assert not any("attention" in p for layers in prune.values() for p in layers)
    assert "rank:bert.encoder.layer.0.attention.self.query" in space and "wbits:classifier" in space


def test_vit_space_offers_heads_mlp_widths_drop_rank_and_bits(vit_space):
    space = vit_space
    assert {d.kind for d in space.decisions} == KINDS
    assert {d.id: d.layers for d in space.of_kind("prune")} == {
        f"prune:encoder.layers.encoder_layer_{i}.mlp.0": (f"encoder.layers.encoder_layer_{i}.mlp.0",
                                                          f"encoder.layers.encoder_layer_{i}.mlp.3") for i in range(2)}
    assert [d.id for d in space.of_kind("drop")] == [f"drop:encoder.layers.encoder_layer_{i}" for i in range(2)]
    assert "wbits:encoder.layers.encoder_layer_1.self_attention.v_proj" in space


@pytest.mark.parametrize("name, seeds", [("bert", (1, 2)), ("vit", (1, 2, 3))])
def test_random_policies_apply_run_and_match_the_estimate(name, seeds, request):
    model, x, mg = request.getfixturevalue(name)
    space = request.getfixturevalue(f"{name}_space")
    reference = _outputs(model, x)
    drawn = set()
    for seed in seeds:
        for i, policy in enumerate(random_policies(space, 4, seed=seed)):
            drawn |= {space[k].kind for k in policy.non_identity(space)}
            ctx = ApplyContext(space, mg.example(1, seed=0))
            built = apply(model, policy, space, ctx=ctx)
            out = _outputs(built, x)
            assert out.shape == reference.shape and torch.isfinite(out).all(), (seed, i, ctx.notes)
            predicted, measured = estimate(space, policy).totals(), _measured(built, mg)
            for key in ("macs", "params", "weight_bytes"):
                assert measured[key] == predicted[key], (name, seed, i, key, ctx.notes)
    assert drawn == KINDS


def _set_heads(attn_q, attn_k, attn_v, out, heads, head_dim, scale):
    """Scale the q/k/v rows and out-projection columns of ``heads`` (to make them the least important)."""
    with torch.no_grad():
        for h in heads:
            rows = slice(h * head_dim, (h + 1) * head_dim)
            for layer in (attn_q, attn_k, attn_v):
                layer.weight[rows] *= scale
                layer.bias[rows] *= scale
            out.weight[:, rows] *= scale


def test_head_pruning_cuts_the_weakest_whole_heads_and_updates_the_counts(bert, bert_space):
    model, x, _ = bert
    model = copy.deepcopy(model)
    att = model.bert.encoder.layer[0].attention
    _set_heads(att.self.query, att.self.key, att.self.value, att.output.dense, (1, 3), 16, 0.0)
    space = bert_space
    before = _outputs(model, x)
    policy = Policy(space.model, space.fingerprint, {"heads:bert.encoder.layer.0.attention.self": 0.5})
    pruned = apply(model, policy, space)
    sa = pruned.bert.encoder.layer[0].attention.self
    assert (sa.num_attention_heads, sa.all_head_size, sa.attention_head_size) == (2, 32, 16)
    assert sa.query.out_features == sa.key.out_features == sa.value.out_features == 32
    assert pruned.bert.encoder.layer[0].attention.output.dense.in_features == 32
    kept = torch.cat([torch.arange(0, 16), torch.arange(32, 48)])  # heads 0 and 2
    assert torch.equal(sa.value.weight, att.self.value.weight[kept])
    # the removed heads contributed nothing (zero values and out columns): the function is kept
    torch.testing.assert_close(_outputs(pruned, x), before, rtol=1e-4, atol=1e-5)
    table = estimate(space, policy)
    sdpa = [r for r in table if r.op == "attention"]
    assert [r.heads for r in sdpa] == [2, 4, 4, 4]
    assert table.totals()["params"] == sum(p.numel() for p in pruned.parameters())


def test_split_vit_heads_are_pruned_and_the_count_updated(vit, vit_space):
    model, x, _ = vit
    policy = Policy(vit_space.model, vit_space.fingerprint,
                    {"heads:encoder.layers.encoder_layer_1.self_attention": 0.75})
    pruned = apply(model, policy, vit_space)
    attn = pruned.encoder.layers.encoder_layer_1.self_attention
    assert (attn.num_heads, attn.head_dim, attn.q_proj.out_features, attn.out_proj.in_features) == (1, 16, 16, 16)
    assert model.encoder.layers.encoder_layer_1.self_attention.num_heads == 4  # the input model is untouched
    assert torch.isfinite(_outputs(pruned, x)).all()


def test_dropping_a_block_removes_its_parameters_and_passes_its_input_through(bert, bert_space):
    model, x, _ = bert
    space = bert_space
    policy = Policy(space.model, space.fingerprint, {"drop:bert.encoder.layer.1": 1})
    dropped = apply(model, policy, space)
    assert isinstance(dropped.bert.encoder.layer[1], PassThrough)
    block = sum(p.numel() for p in model.bert.encoder.layer[1].parameters())
    params = sum(p.numel() for p in dropped.parameters())
    assert params == sum(p.numel() for p in model.parameters()) - block == estimate(space, policy).totals()["params"]
    shorter = copy.deepcopy(model)
    del shorter.bert.encoder.layer[1]  # the same network without the block
    torch.testing.assert_close(_outputs(dropped, x), _outputs(shorter, x), rtol=1e-5, atol=1e-6)


def test_a_dropped_blocks_other_decisions_conflict_with_it(vit, vit_space):
    from autocompress.search.allocate import conflicting_options, slots
    from autocompress.search.tradeoff import removed_layers

    model, _, _ = vit
    space = vit_space
    slot_list = slots(space, space.decisions)
    names = [s.name for s in slot_list]
    pairs = conflicting_options(space, slot_list, removed_layers(model, space))
    for i in range(2):
        blocked = {names[b] for (a, _), (b, _) in pairs if names[a] == f"drop:encoder.layers.encoder_layer_{i}"}
        inside = {s.name for s in slot_list if f"encoder_layer_{i}." in s.name and s.kind != "drop"}
        assert blocked == inside and {f"heads:encoder.layers.encoder_layer_{i}.self_attention",
                                      f"prune:encoder.layers.encoder_layer_{i}.mlp.0"} <= blocked
    assert len(inside) == 1 + 1 + 6 + 6  # heads, MLP width, and rank and bits of each of six linears


# -- int8 deployment -----------------------------------------------------------------------------

INT8_RTOL = 0.1  # of the float model's largest output: the deployed int8 model's largest deviation


def _ort(path, args, optimised=None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if optimised is not None:
        options.optimized_model_filepath = str(optimised)
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)})[0]


@pytest.mark.parametrize("name", ["bert", "vit"])
def test_an_int8_policy_deploys_as_int8_matmuls_with_norms_and_softmax_in_float(name, request, tmp_path):
    import onnx

    from autocompress.export.int8 import export_int8

    model, _, mg = request.getfixturevalue(name)
    space = request.getfixturevalue(f"{name}_space")
    model = copy.deepcopy(model)
    if name == "vit":
        # torchvision starts the head at zero; a seeded init keeps the test independent of the tests before it
        # (over head seeds 0-7 the deployed error was 0.78-1.46x the simulation's)
        nn.init.normal_(model.heads.head.weight, std=0.05, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    calib = mg.inputs.example(32, seed=1)
    test = (torch.randint(0, 1000, (16, 16), generator=gen),) if name == "bert" else \
        (torch.randn(16, 3, 32, 32, generator=gen),)
    policy = Policy(space.model, space.fingerprint, {d.id: 8 for d in space.of_kind("wbits", "abits")})
    simulated = apply(model, policy, space, calibration=calib)
    float_model = strip_fake_quant(simulated)
    report = export_int8(float_model, tuple(t[:1] for t in calib), [calib], tmp_path / "m.int8.onnx",
                         layer_bits(simulated))
    linears = [p for p, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert sorted(report.quantised) == sorted(linears) and report.simulated_only == []
    proto = onnx.load(str(report.path))
    producer = {o: n.op_type for n in proto.graph.node for o in n.output}
    kept_float = [n for n in proto.graph.node if n.op_type in ("LayerNormalization", "Softmax")]
    assert len(kept_float) == (9 + 4 if name == "bert" else 5 + 2)
    assert all(producer.get(n.input[0]) != "DequantizeLinear" for n in kept_float)
    _ort(report.path, test[:1], optimised=tmp_path / "ort.onnx")
    kernels = [n.op_type for n in onnx.load(str(tmp_path / "ort.onnx")).graph.node]
    sequence_linears = 24 if name == "bert" else 12  # MatMul over tokens; the pooler/classifier/head are Gemm
    assert kernels.count("MatMulIntegerToFloat") == sequence_linears and "QGemm" in kernels
    want, got = _ort(report.fp32_path, test), _ort(report.path, test)
    with torch.no_grad():
        sim = _outputs(simulated, test[0]).numpy()
    err, sim_err = float(abs(got - want).max()), float(abs(sim - want).max())
    assert err <= INT8_RTOL * float(abs(want).max())
    assert err <= 2 * sim_err  # about as close as the fake-quant simulation the search scored


def test_a_bert_reading_an_attention_mask_gets_every_decision_and_matches_the_estimate():
    """The mask enters every block beside the hidden state: blocks are still found and dropped."""
    from autocompress.compress import build_space

    model = _bert()
    g = torch.Generator().manual_seed(1)
    ids, mask = torch.randint(0, 1000, (2, 16), generator=g), torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0
    mg = trace(model, inputs=Inputs.from_example((ids, mask), model))
    space = build_space(mg, "bert-masked")
    assert [d.id for d in space.of_kind("drop")] == [f"drop:bert.encoder.layer.{i}" for i in range(4)]
    with torch.no_grad():
        reference = model(ids, mask).logits
    for policy in random_policies(space, 4, seed=5):
        built = apply(model, policy, space, ctx=ApplyContext(space, mg.example(1, seed=0)))
        with torch.no_grad():
            out = built(ids, mask).logits
        assert out.shape == reference.shape and torch.isfinite(out).all()
        predicted, measured = estimate(space, policy).totals(), _measured(built, mg)
        assert (measured["macs"], measured["params"]) == (predicted["macs"], predicted["params"])


@pytest.mark.parametrize("name", ["bert", "vit"])
def test_random_policies_export_to_onnx_and_run_in_onnx_runtime(name, request, tmp_path):
    from autocompress.export.onnx import export_onnx

    model, x, mg = request.getfixturevalue(name)
    space = request.getfixturevalue(f"{name}_space")
    for i, policy in enumerate(random_policies(space, 3, seed=11)):
        built = strip_fake_quant(apply(model, policy, space, ctx=ApplyContext(space, mg.example(1, seed=0))))
        path = export_onnx(built, mg.example(1, seed=0), tmp_path / f"{name}{i}.onnx")
        got = _ort(path, (x,))
        want = _outputs(built, x).numpy()
        assert got.shape == want.shape and abs(got - want).max() <= 1e-4 * max(1.0, abs(want).max()), (name, i)


def test_torchvision_vit_b_16_offers_every_kind_and_a_policy_of_all_kinds_matches_its_estimate():
    from autocompress.workspace import open_model

    torch.manual_seed(0)
    ws = open_model("torchvision:vit_b_16")
    space = ws.space
    assert {d.kind for d in space.decisions} >= {"heads", "prune", "rank", "wbits", "abits", "drop"}
    assert len(space.of_kind("heads")) == len(space.of_kind("drop")) == 12
    choose = {space.of_kind("heads")[0].id: 0.5, space.of_kind("prune")[1].id: 0.5, space.of_kind("drop")[2].id: 1,
              space.of_kind("rank")[5].id: 0.5, space.of_kind("wbits")[7].id: 8, space.of_kind("abits")[7].id: 8}
    policy = Policy(space.model, space.fingerprint, choose, space.options)
    built = apply(ws.model, policy, space, ctx=ApplyContext(space, space.graph.example(1, seed=0)))
    predicted, measured = estimate(space, policy).totals(), _measured(built, space.graph)
    assert (measured["macs"], measured["params"]) == (predicted["macs"], predicted["params"])
    assert predicted["macs"] < space.base_table().totals()["macs"]
