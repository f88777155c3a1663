"""``autocompress apply``: the output folder's files and their contents, other checkpoints, and refusals
that leave the output folder as it was."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from autocompress.compress import ApplyContext, apply, estimate
from autocompress.compress.quant import strip_fake_quant
from autocompress.evaluators.train import pretrained_builtin
from autocompress.models import BUILTIN_MODELS
from autocompress.space.policy import Policy
from conftest import assert_one_line_error, run_cli, workspace

SPEC = "builtin:digits-net"
DECISIONS = {
    "prune:fc1": 0.5,
    "prune:inception1.branch2.1.0": 0.25,
    "rank:res.conv1": 0.25,
    "merge:bn:stem.0.0": 1,
    "wbits:stem.1.0": 8,
    "abits:stem.1.0": 8,
}
RESULT_KEYS = {"target", "budget", "baseline", "best", "trials", "feasible"}
COST_KEYS = {"latency_ms", "energy_mj", "size_bytes", "macs"}


def _policy() -> Policy:
    space = workspace(SPEC).space
    return Policy(space.model, space.fingerprint, DECISIONS, space.options)


def _ort(path: Path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _apply(tmp: Path, out: Path, *extra: str, policy: Policy | None = None):
    path = tmp / "policy-in.json"
    (policy or _policy()).save(path)
    return run_cli("apply", "--model", SPEC, "--policy", str(path), "--out", str(out), *extra)


@pytest.fixture(scope="module")
def applied(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("apply")
    result = _apply(tmp, tmp / "out")
    assert result.exit_code == 0, result.output
    return tmp / "out"


def test_output_folder_files(applied):
    names = {p.name for p in applied.iterdir()}
    assert {"policy.json", "model.onnx", "model.int8.onnx", "model.pt2", "model.state.pt", "result.json"} <= names
    assert not [p for p in applied.parent.iterdir() if p.name.startswith(".")], "staging folder left behind"
    assert Policy.load(applied / "policy.json") == _policy()


def test_result_json(applied):
    result = json.loads((applied / "result.json").read_text())
    assert RESULT_KEYS <= set(result)
    assert result["target"] == "mobile" and result["feasible"] is True
    assert set(result["trials"]) == {"complete", "failed", "pruned"}
    base, best = result["baseline"], result["best"]
    assert COST_KEYS <= set(base) and COST_KEYS | {"measured_latency_ms_local"} <= set(best)
    space = workspace(SPEC).space
    predicted = estimate(space, _policy()).totals()
    assert best["macs"] == predicted["macs"] and best["size_bytes"] == predicted["weight_bytes"]
    assert base["macs"] == 109_511_936 and base["size_bytes"] == 4 * 850_186
    assert best["macs"] < base["macs"] and best["size_bytes"] < base["size_bytes"]
    assert best["latency_ms"] < base["latency_ms"] and best["measured_latency_ms_local"] > 0
    assert "accuracy" not in best  # no data was given


def _expected_model():
    """What apply should have written: the policy on the (pre-seeded) pretrained digits model.

    Without data, activation ranges come from the example input apply draws after seeding with --seed (0).
    """
    ws = workspace(SPEC)
    torch.manual_seed(0)
    example = torch.randn(1, *ws.space.input_shape[1:])
    return apply(pretrained_builtin("digits-net"), _policy(), ws.space, ctx=ApplyContext(ws.space, example))


def test_onnx_and_pytorch_artifacts_reproduce_the_model(applied):
    torch.manual_seed(0)
    x = torch.randn(3, 1, 32, 32)
    model = _expected_model()
    with torch.no_grad():
        fake_quant = model(x)
        float_out = strip_fake_quant(model)(x)
    onnx_out = _ort(applied / "model.onnx", x)
    assert np.abs(onnx_out - float_out.numpy()).max() <= 1e-4 * float(float_out.abs().max())
    # the state dict loads without unpickling code, into the same compressed architecture
    state = torch.load(applied / "model.state.pt", weights_only=True)
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v), k
    program = torch.export.load(str(applied / "model.pt2"))
    with torch.no_grad():  # exported at batch 1
        torch.testing.assert_close(program.module()(x[:1]), fake_quant[:1], rtol=1e-5, atol=1e-5)
    int8_out = _ort(applied / "model.int8.onnx", x)
    assert int8_out.shape == (3, 10) and np.isfinite(int8_out).all()


def test_int8_file_has_quantised_ops(applied):
    import onnx

    ops = {n.op_type for n in onnx.load(str(applied / "model.int8.onnx")).graph.node}
    assert ops & {"QuantizeLinear", "QLinearConv", "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"}


def test_same_policy_on_another_checkpoint(applied, tmp_path):
    torch.manual_seed(99)
    other = BUILTIN_MODELS.get("digits-net").factory()
    torch.save(other.state_dict(), tmp_path / "other.pt")
    result = _apply(tmp_path, tmp_path / "out", "--weights", str(tmp_path / "other.pt"))
    assert result.exit_code == 0, result.output
    mine = torch.load(tmp_path / "out" / "model.state.pt", weights_only=True)
    default = torch.load(applied / "model.state.pt", weights_only=True)
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in default.items()}
    assert not torch.equal(mine["fc2.weight"], default["fc2.weight"])
    # the untouched head layer still carries the given checkpoint's weights where pruning kept its inputs
    kept = mine["fc2.weight"]
    assert any(torch.equal(kept[:, 0], other.fc2.weight.detach()[:, j]) for j in range(128))


def test_no_int8_file_without_8_bit_layers(tmp_path):
    space = workspace(SPEC).space
    policy = Policy(space.model, space.fingerprint, {"prune:fc1": 0.5, "wbits:fc2": 16}, space.options)
    result = _apply(tmp_path, tmp_path / "out", policy=policy)
    assert result.exit_code == 0, result.output
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert "model.onnx" in names and not any("int8" in n for n in names)


def _state_of(folder: Path) -> dict[str, bytes] | None:
    if not folder.exists():
        return None
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _bad_policies() -> dict[str, tuple[Policy | str, tuple[str, ...]]]:
    space = workspace(SPEC).space
    other = workspace("torchvision:resnet18", (1, 3, 64, 64)).space
    return {
        "other-architecture": (Policy(other.model, other.fingerprint, {"prune:conv1": 0.5}),
                               ("fingerprint", "another architecture")),
        "unknown-ids": (Policy(space.model, space.fingerprint, {"prune:nowhere": 0.5}), ("'prune:nowhere'",)),
        "out-of-range": (Policy(space.model, space.fingerprint, {"prune:fc1": 0.9}), ("prune:fc1=0.9",)),
        "corrupt-json": ('{"format": "autocompress.policy/1", "decisions": {"prune:fc1": 0.5', ("not valid JSON",)),
    }


@pytest.mark.parametrize("case", ["other-architecture", "unknown-ids", "out-of-range", "corrupt-json"])
@pytest.mark.parametrize("existing", [False, True])
def test_bad_policy_writes_nothing(tmp_path, case, existing):
    policy, fragments = _bad_policies()[case]
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("from an earlier run")
    before = _state_of(out)
    path = tmp_path / "policy-in.json"
    if isinstance(policy, str):
        path.write_text(policy)
    else:
        policy.save(path)
    result = run_cli("apply", "--model", SPEC, "--policy", str(path), "--out", str(out))
    assert_one_line_error(result, *fragments)
    assert _state_of(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["policy-in.json"] + (["out"] if existing else []))


@pytest.mark.parametrize("existing", [False, True])
def test_mismatched_weights_write_nothing(tmp_path, existing):
    from autocompress.models.digits import DigitsNet

    torch.save(DigitsNet(num_classes=7).state_dict(), tmp_path / "w.pt")
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("from an earlier run")
    before = _state_of(out)
    _policy().save(tmp_path / "p.json")
    result = run_cli("apply", "--model", SPEC, "--policy", str(tmp_path / "p.json"), "--out", str(out),
                     "--weights", str(tmp_path / "w.pt"))
    assert_one_line_error(result, "does not match", "fc2.weight")
    assert _state_of(out) == before
    result = run_cli("apply", "--model", SPEC, "--policy", str(tmp_path / "p.json"), "--out", str(out),
                     "--weights", str(tmp_path / "absent.pt"))
    assert_one_line_error(result, "does not exist")
    assert _state_of(out) == before


@pytest.mark.heavy
def test_a_policy_with_16_bit_layers_ships_a_half_precision_file_scored_like_the_others(tmp_path):
    half = {"wbits:inception1.branch1.0": 16, "abits:inception1.branch1.0": 16, "wbits:fc1": 16, "abits:fc1": 16}
    space = workspace(SPEC).space
    policy = Policy(space.model, space.fingerprint, {**DECISIONS, **half}, space.options)
    out = tmp_path / "out"
    # a short fine-tune: the half-precision file is compared with the fp32 one, not with the original
    result = _apply(tmp_path, out, "--data", "sklearn:digits", "--epochs", "0.25", policy=policy)
    assert result.exit_code == 0, result.output
    assert (out / "model.fp16.onnx").is_file()
    best = json.loads((out / "result.json").read_text())["best"]
    deployed = best["deployed_accuracy"]
    assert set(deployed) == {"model.onnx", "model.int8.onnx", "model.fp16.onnx"}
    assert deployed["model.fp16.onnx"] == pytest.approx(deployed["model.onnx"], abs=0.005)


def test_a_target_with_fast_fp16_is_sent_the_half_precision_file(tmp_path):
    from autocompress.deploy import deployed_file
    from autocompress.evaluators.train import pretrained_builtin

    ws = workspace(SPEC)
    half = {"wbits:fc1": 16, "abits:fc1": 16}
    policy = Policy(ws.space.model, ws.space.fingerprint, half, ws.space.options)
    example = torch.randn(1, 1, 32, 32)
    model = apply(pretrained_builtin("digits-net"), policy, ws.space, ctx=ApplyContext(ws.space, example))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert deployed_file(model, example, tmp_path / "a", fp16=True).name == "model.fp16.onnx"
    assert deployed_file(model, example, tmp_path / "b", fp16=False).name == "model.onnx"


def test_a_half_precision_file_that_fails_to_convert_leaves_the_other_files_and_says_why(tmp_path, monkeypatch):
    import autocompress.export.artifacts as artifacts
    from autocompress.evaluators.train import pretrained_builtin

    def broken(*args, **kwargs):
        raise ValueError("no fp16 kernel for this op")

    monkeypatch.setattr(artifacts, "export_fp16", broken)
    ws = workspace(SPEC)
    policy = Policy(ws.space.model, ws.space.fingerprint, {"wbits:fc1": 16, "abits:fc1": 16}, ws.space.options)
    example = torch.randn(1, 1, 32, 32)
    model = apply(pretrained_builtin("digits-net"), policy, ws.space, ctx=ApplyContext(ws.space, example))
    info = artifacts.write_model_files(model, example, tmp_path)
    assert info["fp16"] == {"layers": 1, "error": "ValueError: no fp16 kernel for this op"}
    assert (tmp_path / "model.onnx").is_file() and not (tmp_path / "model.fp16.onnx").exists()
