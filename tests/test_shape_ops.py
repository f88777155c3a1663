"""Run-time shape arithmetic of a dynamic-axes export: counted in the graph ONNX Runtime runs, priced as dispatches."""

from __future__ import annotations

import math

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from autocompress.export.shape_ops import count_shape_ops, shape_nodes
from autocompress.hwmodels import get_target, predict
from autocompress.workspace import open_model


def _graph(nodes: list, inits: list | None = None) -> onnx.GraphProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return helper.make_graph(nodes, "g", [x], [y], initializer=inits or [])


def test_shape_nodes_counts_the_chain_that_computes_a_shape_not_the_reshape_that_reads_it():
    idx = helper.make_tensor("idx", TensorProto.INT64, [], [0])
    tail = helper.make_tensor("tail", TensorProto.INT64, [1], [8])
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "idx"], ["b"]),
             helper.make_node("Unsqueeze", ["b", "axes"], ["b1"]),
             helper.make_node("Constant", [], ["axes"], value=helper.make_tensor("a", TensorProto.INT64, [1], [0])),
             helper.make_node("Concat", ["b1", "tail"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["r"]),  # reads data: real work, not shape arithmetic
             helper.make_node("Relu", ["r"], ["y"])]
    # Constant sits after its reader here only to show the count does not depend on it being a shape.
    nodes = [nodes[3], *nodes[:3], *nodes[4:]]
    assert shape_nodes(_graph(nodes, [idx, tail])) == 4


def test_shape_nodes_ignores_arithmetic_on_constants_alone():
    one = helper.make_tensor("one", TensorProto.INT64, [1], [1])
    nodes = [helper.make_node("Add", ["one", "one"], ["two"]),  # constant folding's work, not a run-time op
             helper.make_node("Reshape", ["x", "two"], ["y"])]
    assert shape_nodes(_graph(nodes, [one])) == 0


def _bert() -> nn.Module:
    transformers = pytest.importorskip("transformers")  # the dev extra installs it
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def test_an_encoder_carries_its_export_shape_arithmetic_into_the_prediction(tmp_path):
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    ws = open_model("tiny-bert", module=_bert(), example_input=(ids, torch.ones_like(ids)))
    assert not ws.graph.fx_traced  # captured by torch.export: the sizes it reads are constants in the graph
    exported = count_shape_ops_of(ws, tmp_path)
    assert ws.graph.shape_ops == exported >= 10  # the dynamic batch and sequence axes' arithmetic, per layer
    table = ws.space.base_table()
    shares = [r.shape_ops for r in table if r.op == "reshape"]
    assert shares and math.isclose(sum(shares), exported)
    assert all(r.shape_ops == 0 for r in table if r.op != "reshape")
    t = get_target("mobile")
    with_ops = predict(table, t).latency_ms
    bare = table.copy()
    for r in bare:
        r.shape_ops = 0.0
    view_us = t.view_overhead_us or t.elementwise_overhead_us
    assert with_ops - predict(bare, t).latency_ms == pytest.approx(exported * view_us / 1e3, rel=1e-6)
    # A variant that drops a reshape drops its share of the shape arithmetic.
    dropped = table.copy()
    gone = next(r.name for r in dropped if r.op == "reshape")
    dropped.remove(gone)
    assert sum(r.shape_ops for r in dropped) == pytest.approx(exported - table[gone].shape_ops)


def count_shape_ops_of(ws, folder) -> int:
    from autocompress.export.onnx import export_onnx

    return count_shape_ops(export_onnx(ws.model.eval(), ws.graph.example(1, seed=0), folder / "m.onnx"))


def test_a_traceable_cnn_has_no_shape_arithmetic(tmp_path):
    ws = open_model("builtin:digits-net")
    assert ws.graph.fx_traced and ws.graph.shape_ops == 0
    assert count_shape_ops_of(ws, tmp_path) == 0
    assert all(r.shape_ops == 0 for r in ws.space.base_table())
