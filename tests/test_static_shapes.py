"""``--static-shapes``: ONNX files with every dimension fixed at the example input's, exported, quantised,
scored and timed as shipped."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from autocompress.export.int8 import export_int8
from autocompress.export.onnx import export_onnx
from autocompress.export.ort_module import OrtModule
from tests.conftest import run_cli
from tests.test_search import TINY


def _dims(path: Path) -> list[list]:
    import onnx

    return [[d.dim_value if d.HasField("dim_value") else d.dim_param for d in i.type.tensor_type.shape.dim]
            for i in onnx.load(str(path)).graph.input]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()


def test_a_static_file_fixes_every_dimension_and_computes_what_the_dynamic_one_does(tmp_path):
    net, x = _net(), torch.randn(2, 3, 12, 12)
    dynamic = export_onnx(net, x, tmp_path / "d.onnx")
    static = export_onnx(net, x, tmp_path / "s.onnx", static_shapes=True)
    assert _dims(dynamic) == [["batch", 3, 12, 12]] and _dims(static) == [[2, 3, 12, 12]]
    xs = torch.randn(5, 3, 12, 12)
    with torch.no_grad():
        want = net(xs)
    # batch 5 through a batch-2 file: two full slices and one padded by repeating its last sample
    got = OrtModule(static, like=net, example=x)(xs)
    assert got.shape == (5, 5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(OrtModule(dynamic, like=net, example=x)(xs), want, rtol=1e-4, atol=1e-5)


def test_a_static_int8_file_is_calibrated_at_the_example_batch(tmp_path):
    net, x = _net(), torch.randn(1, 3, 12, 12)
    bits = {"0": (8, 8), "2": (8, 8)}
    report = export_int8(net, x, [torch.randn(16, 3, 12, 12)], tmp_path / "m.int8.onnx", bits, static_shapes=True)
    assert _dims(report.path) == [[1, 3, 12, 12]] and _dims(report.fp32_path) == [[1, 3, 12, 12]]
    assert sorted(report.quantised) == ["0", "2"]
    xs = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        want = net(xs)
    got = OrtModule(report.path, like=net, example=x)(xs)
    assert got.shape == (4, 5) and (got - want).abs().max() < 0.1 * want.abs().max()


def test_a_static_transformer_export_folds_the_shape_arithmetic(tmp_path):
    import transformers

    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).eval()
    ids, mask = torch.randint(0, 100, (1, 16)), torch.ones(1, 16, dtype=torch.long)
    import onnx

    counts = {}
    for static in (False, True):
        path = export_onnx(model, (ids, mask), tmp_path / f"{static}.onnx", static_shapes=static)
        counts[static] = sum(n.op_type in ("Shape", "Unsqueeze", "Concat", "Slice")
                             for n in onnx.load(str(path)).graph.node)
        assert _dims(path) == ([[1, 16], [1, 16]] if static else [["batch", "sequence"], ["batch", "sequence"]])
        with torch.no_grad():
            want = model(ids, mask).logits
        torch.testing.assert_close(OrtModule(path, like=model, example=(ids, mask))(ids, mask).logits, want,
                                   rtol=1e-4, atol=1e-4)
    assert counts[True] < counts[False] / 4, counts


# A device that logs the input dimensions of every file it is sent and answers 1 ms per 10 kB.
RECORDING_DEVICE = textwrap.dedent('''
    import json, os, pathlib, sys
    import onnx
    path = pathlib.Path(sys.argv[1])
    dims = [[d.dim_value if d.HasField("dim_value") else d.dim_param for d in i.type.tensor_type.shape.dim]
            for i in onnx.load(str(path)).graph.input]
    with open(os.environ["DIMS_LOG"], "a") as log:
        log.write(json.dumps({"file": path.name, "dims": dims}) + "\\n")
    print(f"{path.stat().st_size / 10000:.6f}")
''')


@pytest.mark.heavy
def test_a_static_shapes_search_times_scores_and_ships_static_files(tmp_path, monkeypatch):
    (tmp_path / "tiny.py").write_text(TINY)
    (tmp_path / "device.py").write_text(RECORDING_DEVICE)
    log = tmp_path / "dims.jsonl"
    monkeypatch.setenv("DIMS_LOG", str(log))
    out = tmp_path / "out"
    tiny = tmp_path / "tiny.py"
    res = run_cli("search", "--model", f"{tiny}:model", "--data", f"{tiny}:data", "--target", "mobile",
                  "--budget", "0.9x", "--trials", "4", "--low-epochs", "0.25", "--full-epochs", "0.25",
                  "--finalists", "2", "--measure-cmd", f"{sys.executable} {tmp_path / 'device.py'} {{onnx}}",
                  "--static-shapes", "--out", str(out))
    assert res.exit_code == 0, res.output
    timed = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(timed) >= 3  # the finalists and the original model, for the relative budget
    assert all(t["dims"] == [[1, 1, 16, 16]] for t in timed), timed
    result = json.loads((out / "result.json").read_text())
    assert result["onnx_shapes"] == "static"
    shipped = [p for p in ("model.onnx", "model.int8.onnx", "model.fp16.onnx") if (out / p).exists()]
    assert "model.onnx" in shipped and all(_dims(out / p) == [[1, 1, 16, 16]] for p in shipped)
    deployed = result["best"]["deployed_accuracy"]
    assert set(deployed) == set(shipped) and all(v is not None for v in deployed.values())
    assert deployed["model.onnx"] == pytest.approx(result["best"]["accuracy"], abs=0.02)
    assert result["measured"]["finalists"] and result["measured_feasible"] is not None
    assert "The ONNX files have static shapes" in (out / "report.md").read_text()


def test_apply_writes_dynamic_files_unless_asked(tmp_path):
    from autocompress.space.policy import Policy
    from tests.conftest import workspace

    space = workspace("builtin:digits-net").space
    policy = Policy(space.model, space.fingerprint, {"prune:fc1": 0.5, "wbits:fc1": 8, "abits:fc1": 8}, space.options)
    policy.save(tmp_path / "p.json")
    for flag, word, dims in (((), "dynamic", [["batch", 1, 32, 32]]), (("--static-shapes",), "static", [[1, 1, 32, 32]])):
        out = tmp_path / word
        res = run_cli("apply", "--model", "builtin:digits-net", "--policy", str(tmp_path / "p.json"), "--out",
                      str(out), "--no-measure", *flag)
        assert res.exit_code == 0, res.output
        assert json.loads((out / "result.json").read_text())["onnx_shapes"] == word
        assert _dims(out / "model.onnx") == dims and _dims(out / "model.int8.onnx") == dims
