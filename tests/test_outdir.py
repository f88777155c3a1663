"""One search per --out: a lock, a folder that remembers what it holds, --force that moves old results aside."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import assert_one_line_error, run_cli
from tests.test_tasks import TOKENS


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("outdir") / "tokens.py"
    path.write_text(TOKENS)
    return path


def _args(tokens: Path, out: Path, budget: str = "0.6x", *extra: str) -> list[str]:
    return ["search", "--model", f"{tokens}:model", "--task", f"{tokens}:task", "--target", "mobile", "--budget",
            budget, "--trials", "1", "--low-epochs", "0.2", "--full-epochs", "0.2", "--finalists", "1",
            "--space", "layers", "--no-measure", "--out", str(out), *extra]


def test_a_second_search_on_a_locked_out_is_refused_naming_the_holder(tokens: Path, tmp_path: Path):
    from autocompress.search.outdir import FolderLock

    out = tmp_path / "out"
    with FolderLock(out):
        res = run_cli(*_args(tokens, out))
    msg = assert_one_line_error(res, "is in use by a running search", "pid ")
    assert str(out) in msg
    assert not (out / "study.journal").exists()


def test_another_search_is_refused_and_force_moves_the_old_results_aside(tokens: Path, tmp_path: Path):
    out = tmp_path / "out"
    first = run_cli(*_args(tokens, out, "0.6x"))
    assert first.exit_code == 0, first.output
    manifest = json.loads((out / "search.json").read_text())
    assert manifest["budget"] == "0.6x" and manifest["data"] == f"task:{tokens}:task"
    before = (out / "result.json").read_text()

    refused = run_cli(*_args(tokens, out, "0.8x"))
    assert_one_line_error(refused, "holds another search", "budget '0.6x' -> '0.8x'", "--force")
    assert (out / "result.json").read_text() == before  # nothing touched

    forced = run_cli(*_args(tokens, out, "0.8x", "--force"))
    assert forced.exit_code == 0, forced.output
    aside = [p for p in out.iterdir() if p.name.startswith("previous-")]
    assert len(aside) == 1 and (aside[0] / "result.json").read_text() == before
    assert (aside[0] / "study.journal").exists()  # the old study went along, never deleted
    assert json.loads((out / "search.json").read_text())["budget"] == "0.8x"
    assert json.loads((out / "result.json").read_text())["budget"] != json.loads(before)["budget"]


def test_a_refused_search_leaves_no_folder_behind(tokens: Path, tmp_path: Path):
    out = tmp_path / "new"
    res = run_cli(*_args(tokens, out, "0.01x"))
    assert_one_line_error(res, "cannot be met")
    assert not out.exists()


def test_a_refused_search_adds_nothing_to_an_existing_folder(tokens: Path, tmp_path: Path):
    """An impossible budget in an empty --out (a mounted volume, a folder made beforehand) leaves it empty,
    so the next command with a feasible budget is not refused as 'another search'."""
    from autocompress.search.outdir import FolderClaim, claim

    out = tmp_path / "made"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    res = run_cli(*_args(tokens, out, "0.01x"))
    assert_one_line_error(res, "cannot be met")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert claim(out, FolderClaim("m", "d", "mobile", "0.6x", ("accuracy",), "tradeoff")) is None


def test_an_older_folder_is_compared_by_its_result(tmp_path: Path):
    from autocompress.errors import UserInputError
    from autocompress.search.outdir import FolderClaim, claim

    out = tmp_path / "old"
    out.mkdir()
    (out / "result.json").write_text(json.dumps({"model": "builtin:digits-net", "data": "sklearn:digits",
                                                 "target": "mobile", "budget": {"latency_ms": 5.0}}))
    same = FolderClaim("builtin:digits-net", "sklearn:digits", "mobile", "5ms", ("accuracy",), "tradeoff")
    assert claim(out, same) is None  # the same model, data and target: resumed, not refused
    other = FolderClaim("torchvision:resnet18", "sklearn:digits", "mobile", "5ms", ("accuracy",), "tradeoff")
    with pytest.raises(UserInputError, match="model 'builtin:digits-net' -> 'torchvision:resnet18'"):
        claim(out, other)


def test_a_journal_lock_left_in_out_by_a_killed_run_is_removed_and_one_elsewhere_is_kept(tmp_path: Path):
    import optuna

    from autocompress.search.optuna_driver import make_storage

    out = tmp_path / "out"
    out.mkdir()
    lock = out / "study.journal.lock"
    os.symlink(out / "study.journal", lock)  # what a SIGKILL during a journal write leaves
    storage = make_storage(None, out)  # --out's journal: this process holds the folder's lock
    assert not lock.is_symlink()
    optuna.create_study(storage=storage, study_name="s").optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    assert len(optuna.load_study(study_name="s", storage=storage).trials) == 1
    shared = tmp_path / "shared.journal"  # --storage FILE.journal: other processes may write it
    os.symlink(shared, Path(f"{shared}.lock"))
    make_storage(str(shared), out)
    assert Path(f"{shared}.lock").is_symlink()
