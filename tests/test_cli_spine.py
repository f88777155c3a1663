"""The CLI's model commands: ``profile`` and ``space`` numbers, formats, and one-line errors on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from autocompress.compress import estimate
from autocompress.space.policy import Policy
from conftest import SMALL_SHAPE, assert_one_line_error, run_cli, workspace

PROFILE_MACS = {
    "torchvision:resnet18": 1.814e9,
    "torchvision:mobilenet_v2": 0.301e9,
    "torchvision:googlenet": 1.498e9,
    "torchvision:squeezenet1_0": 0.819e9,
    "torchvision:shufflenet_v2_x1_0": 0.145e9,
}
TOTAL_KEYS = {"macs", "params", "weight_bytes", "peak_activation_bytes", "latency_ms", "energy_mj"}
LAYER_KEYS = {"name", "op", "macs", "params", "latency_ms", "energy_mj"}


def _profile(*args: str) -> dict:
    result = run_cli("profile", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def resnet18_profile() -> dict:
    return _profile("--model", "torchvision:resnet18")


def test_profile_resnet18(resnet18_profile):
    data = resnet18_profile
    assert data["model"] == "torchvision:resnet18" and data["target"] == "mobile"
    totals = data["totals"]
    assert TOTAL_KEYS <= set(totals)
    assert totals["macs"] == pytest.approx(1.814e9, rel=0.02)
    assert totals["params"] == 11_689_512
    assert totals["weight_bytes"] == 4 * 11_689_512
    assert totals["latency_ms"] > 0 and totals["energy_mj"] > 0
    # the largest live set: conv1's 64x112x112 output and its BN's output, in fp32
    assert totals["peak_activation_bytes"] >= 2 * 4 * 64 * 112 * 112
    layers = data["layers"]
    assert all(LAYER_KEYS <= set(l) for l in layers)
    assert sum(l["macs"] for l in layers) == totals["macs"]
    assert sum(l["params"] for l in layers) == totals["params"]
    # the layers' latencies plus the target's fixed per-call overhead
    from autocompress.hwmodels import get_target

    call_ms = get_target("mobile").call_overhead_us / 1000
    assert sum(l["latency_ms"] for l in layers) + call_ms == pytest.approx(totals["latency_ms"], rel=1e-6)
    conv1 = next(l for l in layers if l["name"] == "conv1")
    assert conv1["op"] == "conv" and conv1["macs"] == 118_013_952


@pytest.mark.parametrize("spec", [s for s in PROFILE_MACS if s != "torchvision:resnet18"])
def test_profile_macs_of_the_zoo(spec):
    assert _profile("--model", spec)["totals"]["macs"] == pytest.approx(PROFILE_MACS[spec], rel=0.02)


def test_profile_batch_and_target(resnet18_profile):
    data = _profile("--model", "torchvision:resnet18", "--batch", "4", "--target", "x86-server")
    assert data["target"] == "x86-server"
    assert data["totals"]["macs"] == 4 * resnet18_profile["totals"]["macs"]
    assert data["totals"]["params"] == resnet18_profile["totals"]["params"]


def test_profile_under_a_policy(tmp_path):
    ws = workspace("torchvision:resnet18", SMALL_SHAPE)
    policy = Policy(ws.space.model, ws.space.fingerprint,
                    {"prune:conv1": 0.5, "wbits:layer1.0.conv1": 8, "rank:fc": 0.25})
    policy.save(tmp_path / "p.json")
    data = _profile("--model", "torchvision:resnet18", "--input-shape", "1,3,64,64",
                    "--policy", str(tmp_path / "p.json"))
    predicted = estimate(ws.space, policy).totals()
    assert data["totals"]["macs"] == predicted["macs"] and data["totals"]["params"] == predicted["params"]
    assert data["totals"]["weight_bytes"] == predicted["weight_bytes"]
    base = _profile("--model", "torchvision:resnet18", "--input-shape", "1,3,64,64")
    assert data["totals"]["macs"] < base["totals"]["macs"]
    assert data["totals"]["latency_ms"] < base["totals"]["latency_ms"]
    bits = {l["name"]: (l["wbits"], l["abits"]) for l in data["layers"] if l["op"] == "conv"}
    assert bits["layer1.0.conv1"] == (8, 32)


def test_space_at_the_default_shape():
    result = run_cli("space", "--model", "torchvision:resnet18", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["input_shape"] == [1, 3, 224, 224]
    assert data["fingerprint"] == workspace("torchvision:resnet18").space.fingerprint
    small = workspace("torchvision:resnet18", SMALL_SHAPE).space
    assert data["fingerprint"] != small.fingerprint  # the input size is part of the architecture
    # ids do not depend on the input size where the decision does not
    ids = {d["id"] for d in data["decisions"] if d["kind"] in ("prune", "rank", "wbits", "abits")}
    assert ids == {d.id for d in small.decisions if d.kind in ("prune", "rank", "wbits", "abits")}


def test_human_readable_tables():
    result = run_cli("profile", "--model", "builtin:digits-net")
    assert result.exit_code == 0 and "total" in result.stdout and "stem.0.0" in result.stdout
    result = run_cli("space", "--model", "builtin:digits-net")
    assert result.exit_code == 0 and "prune:fc1" in result.stdout and "decisions" in result.stdout


UNTRACEABLE = textwrap.dedent("""
    import torch
    from torch import nn

    INPUT_SHAPE = (1, 3, 16, 16)

    class Gate(nn.Module):
        def forward(self, x):
            if x.mean() > 0:  # data-dependent control flow
                return x * 2
            return x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.gate = Gate()
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(self.gate(self.conv(x)).mean((2, 3)))

    def build():
        return Net()
""")


@pytest.fixture
def untraceable(tmp_path) -> Path:
    path = tmp_path / "gated.py"
    path.write_text(UNTRACEABLE)
    return path


def test_untraceable_model_and_the_leaf_fix(untraceable):
    spec = f"{untraceable}:build"
    for command in ("space", "profile"):
        line = assert_one_line_error(run_cli(command, "--model", spec), "gate", "--leaf gate")
        assert "torch.fx" in line
    result = run_cli("space", "--model", spec, "--leaf", "gate", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["input_shape"] == [1, 3, 16, 16]
    assert {"wbits:conv", "wbits:fc"} <= {d["id"] for d in data["decisions"]}


@pytest.mark.parametrize("args, fragments", [
    (["space", "--model", "torchvision:resnet1000"], ["'resnet1000'"]),
    (["space", "--model", "builtin:nope"], ["'nope'", "digits-net"]),
    (["space", "--model", "resnet18"], ["bad model spec", "builtin:NAME"]),
    (["space", "--model", "hub:resnet18"], ["unknown source 'hub'"]),
    (["profile", "--model", "missing/model.py:build"], ["does not exist"]),
    (["space", "--model", "builtin:digits-net", "--input-shape", "1,3,abc"], ["bad input shape"]),
    (["profile", "--model", "builtin:digits-net", "--input-shape", "1,3,32,32"], ["input shape [1, 3, 32, 32]"]),
    (["profile", "--model", "builtin:digits-net", "--target", "nowhere"], ["unknown target 'nowhere'", "mobile"]),
    (["profile", "--model", "builtin:digits-net", "--policy", "missing-policy.json"], ["does not exist"]),
    (["profile", "--model", "builtin:digits-net", "--weights", "missing-weights.pt"], ["does not exist"]),
])
def test_bad_input_is_one_line_exit_2(args, fragments):
    assert_one_line_error(run_cli(*args), *fragments)


def test_profile_rejects_a_policy_of_another_model(tmp_path):
    ws = workspace("torchvision:resnet18", SMALL_SHAPE)
    Policy(ws.space.model, ws.space.fingerprint, {"prune:conv1": 0.5}).save(tmp_path / "p.json")
    assert_one_line_error(run_cli("profile", "--model", "builtin:digits-net", "--policy", str(tmp_path / "p.json")),
                          "fingerprint", "another architecture")
    (tmp_path / "bad.json").write_text("{not json")
    assert_one_line_error(run_cli("profile", "--model", "builtin:digits-net", "--policy", str(tmp_path / "bad.json")),
                          "not valid JSON")


def test_console_script_exit_code():
    """The installed entry point in a fresh process: exit 2, one stderr line, nothing on stdout."""
    exe = Path(sys.executable).with_name("autocompress")
    bad = subprocess.run([str(exe), "space", "--model", "builtin:nope", "--json"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "80"}, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr + bad.stdout
    assert len(bad.stderr.strip().splitlines()) == 1 and "'nope'" in bad.stderr and bad.stdout == ""
