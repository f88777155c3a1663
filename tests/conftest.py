"""Shared fixtures: a private cache folder, memoised model workspaces and a CLI runner.

Loading and tracing a torchvision model costs seconds, so every test file
asks :func:`workspace` for it and the session builds each (spec, shape) once.
Tests must not change what they get from it: apply copies the model.
"""

from __future__ import annotations

import importlib
import os
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

TORCHVISION_ZOO = (
    "torchvision:resnet18",
    "torchvision:mobilenet_v2",
    "torchvision:googlenet",
    "torchvision:squeezenet1_0",
    "torchvision:shufflenet_v2_x1_0",
)
ZOO = (*TORCHVISION_ZOO, "builtin:digits-net")
SMALL_SHAPE = (1, 3, 64, 64)  # ImageNet models run at 64x64 too; ten times cheaper than 224x224


def small_shape(spec: str) -> tuple[int, ...] | None:
    """The reduced input shape for the torchvision models; builtin models keep their own."""
    return SMALL_SHAPE if spec.startswith("torchvision:") else None


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the group marks
def pytest_collection_modifyitems(items: list) -> None:
    """The `heavy` tests first and in one lane (one xdist worker, one after another): each runs several
    processes of its own, so two at once only contend for the cores, while the other worker runs the
    light tests beside them."""
    for item in items:
        if item.get_closest_marker("heavy") is not None:
            item.add_marker(pytest.mark.xdist_group("heavy"))
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)


@pytest.fixture(scope="session", autouse=True)
def autocompress_cache(tmp_path_factory) -> Path:
    """A session-private ``AUTOCOMPRESS_CACHE`` pre-seeded with digits-net weights.

    The pretrained digits model and measured targets must neither come from
    nor land in the user's cache, and tests must not spend minutes training.
    """
    cache = tmp_path_factory.mktemp("autocompress-cache")
    old = os.environ.get("AUTOCOMPRESS_CACHE")
    os.environ["AUTOCOMPRESS_CACHE"] = str(cache)
    seed_pretrained_digits(cache)
    yield cache
    if old is None:
        os.environ.pop("AUTOCOMPRESS_CACHE", None)
    else:
        os.environ["AUTOCOMPRESS_CACHE"] = old


def seed_pretrained_digits(cache: Path) -> Path:
    """Write a seeded, untrained digits-net where ``pretrained_builtin`` looks for the trained one."""
    from autocompress.models import BUILTIN_MODELS

    train = importlib.import_module("autocompress.evaluators.train")  # the package re-exports a function of that name

    torch.manual_seed(1234)
    model = BUILTIN_MODELS.get("digits-net").factory()
    path = cache / f"digits-net-v{train.CACHE_VERSION}-e{train.DIGITS_EPOCHS}-s0.pt"
    state = model.state_dict()
    for key in state:  # marked as having seen data, so the cache accepts it as a trained model
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1)
    torch.save(state, path)
    return path


@pytest.fixture(scope="session", autouse=True)
def single_thread_torch():
    """One intra-op thread: small tensors gain nothing from more, and OpenMP threads that spin while
    other processes hold the cores make a run tens of times slower. Results are also reproducible."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


_WORKSPACES: dict[tuple, object] = {}


def workspace(spec: str, input_shape: tuple[int, ...] | None = None):
    """``open_model(spec, input_shape=...)`` built once per session; seeded so weights are reproducible."""
    from autocompress.api import open_model

    key = (spec, tuple(input_shape) if input_shape else None)
    if key not in _WORKSPACES:
        torch.manual_seed(0)
        random.seed(0)
        _WORKSPACES[key] = open_model(spec, input_shape=input_shape)
    return _WORKSPACES[key]


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_cli(*args: str) -> CliResult:
    """Invoke the ``autocompress`` console script in-process (typer's CliRunner, stderr kept apart)."""
    from typer.testing import CliRunner

    from autocompress.cli.app import app
    from autocompress.cli.main import _register

    _register()
    result = CliRunner().invoke(app, [str(a) for a in args], prog_name="autocompress")
    return CliResult(result.exit_code, result.stdout, result.stderr)


def assert_one_line_error(result: CliResult, *fragments: str, code: int = 2) -> str:
    """A user error: exit code ``code``, one line on stderr containing ``fragments``, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output, result.output
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, result.stderr
    for frag in fragments:
        assert frag.lower() in lines[0].lower(), (frag, lines[0])
    return lines[0]
