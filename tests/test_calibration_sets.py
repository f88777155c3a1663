"""What calibration builds and times: the designed set's configurations and the searched networks' variants."""

from __future__ import annotations

import textwrap

import onnx

from autocompress.hwmodels.calibrate._designed import build_configs, build_variants, designed_set, spec_of_variant
from autocompress.hwmodels.calibrate._sequence_nets import encoder

TOKEN_MODEL = textwrap.dedent('''
    import torch
    from torch import nn

    EXAMPLE_INPUT = (torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0)),)


    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(100, 16)
            self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)

        def forward(self, ids):
            return self.fc2(torch.relu(self.fc1(self.emb(ids))))


    def model():
        torch.manual_seed(0)
        return Tagger()
''')


def test_both_designed_sets_time_int8_linears_on_one_row_and_on_token_rows():
    for quick in (False, True):
        int8_linears = [(name, shape) for name, _, shape in designed_set(quick) if name.startswith("int8 linear")]
        assert {len(shape) for _, shape in int8_linears} == {2, 3}, (quick, int8_linears)


def test_an_int8_configuration_with_sequence_inputs_is_exported_with_int8_linears(tmp_path):
    make, inputs = encoder(16, 2, 32, 4)
    (built,) = build_configs([("int8 encoder d16 T4", make, inputs)], tmp_path)
    assert built.path.name.endswith(".int8.onnx")
    ops = {n.op_type for n in onnx.load(str(built.path)).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    linears = [r for r in built.table if r.op == "linear"]
    assert len(linears) == 6 and all((r.wbits, r.abits) == (8, 8) for r in linears)


def test_variants_of_a_network_with_token_inputs_are_built_with_its_own_inputs(tmp_path):
    """``calibrate --model file.py:model`` on a network that reads token ids: each variant is exported
    with int64 ids from the file's EXAMPLE_INPUT, as a search opens it."""
    script = tmp_path / "tagger.py"
    script.write_text(TOKEN_MODEL)
    spec = f"{script}:model"
    built = build_variants([(spec, None)], 4, tmp_path)
    assert len(built) == 4 and all(spec_of_variant(b.name) == spec for b in built)
    for b in built:
        graph = onnx.load(str(b.path)).graph
        (ids,) = graph.input
        assert ids.type.tensor_type.elem_type == onnx.TensorProto.INT64
    # random policies: the variants' tables cost different amounts (the table is the compressed one)
    assert len({sum(r.macs for r in b.table) for b in built}) > 1
