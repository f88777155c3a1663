"""Small sequence models for the designed set and the predictor benchmark: a transformer encoder layer
built from torch.nn parts, a tiny BERT (when ``transformers`` is installed), LSTMs and GRUs, a Conv1d.

Each is a (module factory, ``Inputs``) pair, so token-id models are traced, exported and timed with
their own inputs. Imported only when a designed set is built (it imports torch).
"""

from __future__ import annotations

import importlib.util
import random
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from autocompress.space.inputs import InputSpec, Inputs

Net = tuple[Callable[[], nn.Module], Inputs]


class EncoderBlock(nn.Module):
    """A post-norm transformer encoder layer: q/k/v/o linears, scaled-dot-product attention, LayerNorm, GELU FFN."""

    def __init__(self, d: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.up, self.act, self.down = nn.Linear(d, ffn), nn.GELU(), nn.Linear(ffn, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (y.view(b, t, self.heads, d // self.heads).transpose(1, 2) for y in (self.q(x), self.k(x), self.v(x)))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = self.ln1(x + self.o(a))
        return self.ln2(x + self.down(self.act(self.up(x))))


class Recurrent(nn.Module):
    """An LSTM or GRU over a batch-first sequence, returning its output sequence."""

    def __init__(self, kind: str, features: int, hidden: int, layers: int, bidirectional: bool) -> None:
        super().__init__()
        cls = nn.LSTM if kind == "lstm" else nn.GRU
        self.rnn = cls(features, hidden, num_layers=layers, bidirectional=bidirectional, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


def has_transformers() -> bool:
    return importlib.util.find_spec("transformers") is not None


def encoder(d: int, heads: int, ffn: int, tokens: int) -> Net:
    return (lambda: EncoderBlock(d, heads, ffn)), Inputs.from_shape((1, tokens, d))


def bert(hidden: int, layers: int, heads: int, ffn: int, tokens: int, vocab: int = 1000) -> Net:
    def make() -> nn.Module:
        import transformers

        config = transformers.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                         num_attention_heads=heads, intermediate_size=ffn)
        return transformers.BertModel(config)

    return make, Inputs((InputSpec("input_ids", (1, tokens), "int64", 0, vocab),))


def recurrent(kind: str, features: int, hidden: int, layers: int, bidirectional: bool, steps: int) -> Net:
    return (lambda: Recurrent(kind, features, hidden, layers, bidirectional)), Inputs.from_shape((1, steps, features))


def conv1d(channels: int, length: int) -> Net:
    return (lambda: nn.Sequential(nn.Conv1d(channels, channels, 3, padding=1, bias=False),
                                  nn.BatchNorm1d(channels), nn.ReLU())), Inputs.from_shape((1, channels, length))


def sequence_configs(quick: bool) -> list[tuple[str, Callable[[], nn.Module], Inputs]]:
    """The designed set's sequence models: attention at two widths and lengths, recurrent layers from
    latency-bound (hidden 16) to compute-bound (hidden 256), a 1-d conv; a tiny BERT where installed."""
    nets: list[tuple[str, Net]] = [
        ("encoder d64 T16", encoder(64, 4, 128, 16)),
        ("lstm h16 T64", recurrent("lstm", 16, 16, 1, False, 64)),
        # enough GELU, softmax and layer-norm elements for the fit to see ``math_ns`` (at T16 it hit its floor)
        ("encoder d128 T64", encoder(128, 4, 512, 64)),
    ]
    if not quick:
        nets += [("encoder d256 T128", encoder(256, 8, 1024, 128)),
                 ("int8 encoder d128 T64", encoder(128, 4, 512, 64)),  # int8 linears, attention in float
                 ("lstm 2x bi h64 T32", recurrent("lstm", 32, 64, 2, True, 32)),
                 ("gru h256 T16", recurrent("gru", 128, 256, 1, False, 16)),
                 ("conv1d 64@256", conv1d(64, 256))]
        if has_transformers():
            nets += [("bert-tiny T16", bert(64, 2, 4, 128, 16)), ("bert-tiny T64", bert(64, 2, 4, 128, 64))]
    return [(name, make, inputs) for name, (make, inputs) in nets]


def random_sequence_net(kind: str, rng: random.Random) -> tuple[str, Net]:
    """A random small architecture of ``kind`` ("encoder", "bert", "lstm" or "gru") and its description."""
    tokens = rng.choice((8, 16, 32, 64, 128))
    if kind in ("encoder", "bert"):
        heads = rng.choice((2, 4))
        d = heads * rng.choice((16, 32))
        ffn = d * rng.choice((2, 4))
        if kind == "bert":
            layers = rng.choice((1, 2))
            return f"bert d{d} h{heads} ffn{ffn} L{layers} T{tokens}", bert(d, layers, heads, ffn, tokens)
        return f"encoder d{d} h{heads} ffn{ffn} T{tokens}", encoder(d, heads, ffn, tokens)
    hidden, features = rng.choice((16, 32, 64, 128)), rng.choice((16, 32, 64))
    layers, bidirectional = rng.choice((1, 2)), rng.random() < 0.5
    desc = f"{kind} in{features} h{hidden} L{layers}{' bi' if bidirectional else ''} T{tokens}"
    return desc, recurrent(kind, features, hidden, layers, bidirectional, tokens)


def example(inputs: Inputs) -> Any:
    """The example input of ``inputs`` (seeded), as export and tracing take it."""
    return inputs.example(1, seed=0)
