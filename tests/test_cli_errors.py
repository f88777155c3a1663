"""Usage errors and early refusals through the installed console script: one line, exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import workspace

EXE = [sys.executable, "-m", "autocompress.cli.main"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*EXE, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, fragment", [
    (("profile", "--model", "builtin:digits-net", "--batch", "0"), "--batch"),
    (("space",), "--model"),
    (("bogus",), "bogus"),
    (("space", "--model", "builtin:digits-net", "--bad"), "--bad"),
])
def test_usage_errors_are_one_line(args, fragment) -> None:
    res = _run(*args)
    assert res.returncode == 2, res.stderr
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and fragment in lines[0] and "--help" in lines[0], res.stderr
    assert "Traceback" not in res.stderr


def test_out_that_is_a_file_is_refused_before_any_work(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    res = _run("search", "--target", "mobile", "--budget", "5ms", "--out", str(afile))
    assert res.returncode == 2 and "is a file" in res.stderr
    assert afile.read_text() == "keep me"


def test_space_options_are_validated() -> None:
    from autocompress.api import open_model
    from autocompress.errors import PolicyError

    for bad in ({"prune_round_to": "abc"}, {"prune_importance": "foo"}, {"colour": 1}):
        with pytest.raises(PolicyError) as info:
            open_model("builtin:digits-net", options=bad)
        assert list(bad)[0] in str(info.value)


def test_pytorch_artifact_takes_any_batch(tmp_path: Path) -> None:
    from autocompress.export.artifacts import save_pytorch

    model = workspace("builtin:digits-net").model
    save_pytorch(model, torch.randn(1, 1, 32, 32), tmp_path)
    loaded = torch.export.load(str(tmp_path / "model.pt2")).module()
    x = torch.randn(3, 1, 32, 32)
    assert torch.allclose(loaded(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("value", ["-1", "101", "nan"])
def test_a_repair_drop_outside_0_to_100_points_is_refused(tmp_path: Path, value: str) -> None:
    res = _run("search", "--target", "mobile", "--budget", "5ms", "--repair-max-drop", value,
               "--out", str(tmp_path / "o"))
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert res.returncode == 2 and len(lines) == 1 and "--repair-max-drop" in lines[0], res.stderr
    assert not (tmp_path / "o").exists()
