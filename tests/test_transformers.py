"""Transformers: nn.MultiheadAttention split into linear layers, attention units found by structure."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from autocompress.compress.attention import SplitAttention, attention_units, split_attention
from autocompress.errors import UntraceableModelError
from autocompress.space.graph import trace
from autocompress.space.inputs import Inputs

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
