"""docs/tasks.md's examples run as written: every line of its ``bash`` blocks, from a copy of the repository's examples."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def doc_commands() -> list[list[str]]:
    """The commands of docs/tasks.md's ```bash blocks, one list of arguments per command."""
    text = (ROOT / "docs" / "tasks.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip():
                commands.append(shlex.split(line))
    return commands


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    head = {"python": [sys.executable], "autocompress": [sys.executable, "-m", "autocompress.cli.main"]}[argv[0]]
    # A cache of its own, as on a fresh clone: `local` is calibrated on first use there, not in the session's
    # One torch thread: the suite's other worker holds the second core
    env = {**os.environ, "AUTOCOMPRESS_CACHE": str(cwd / ".cache"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([*head, *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=900, env=env)


def test_the_docs_list_both_examples():
    commands = doc_commands()
    assert [c[0] for c in commands] == ["python", "autocompress", "python", "autocompress"]
    assert {c[c.index("--task") + 1] for c in commands if "--task" in c} == {
        "examples/text_task.py:make_task", "examples/segmentation_task.py:make_task"}


@pytest.mark.heavy
@pytest.mark.parametrize("example", ["text", "seg"])
def test_a_docs_example_runs_as_written(example: str, tmp_path: Path):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    pair = [c for c in doc_commands() if any(a.startswith(f"examples/{'text' if example == 'text' else 'segmentation'}")
                                             for a in c)]
    assert len(pair) == 2
    for argv in pair:
        done = _run(argv, tmp_path)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = tmp_path / pair[1][pair[1].index("--out") + 1]
    result = json.loads((out / "result.json").read_text())
    metric = "macro_f1" if example == "text" else "mean_iou"
    assert result["metric"] == metric and result["feasible"] is True
    assert result["baseline"][metric] > 0.9  # the example trains a model worth compressing
    assert result["best"][metric] > 0.5 and result["best"]["latency_ms"] < result["baseline"]["latency_ms"]
    assert (out / "model.onnx").exists() and f"| {metric} (held-out) |" in (out / "report.md").read_text()
