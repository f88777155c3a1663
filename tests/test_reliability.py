"""Bad input and hostile environments: one-line errors with the right exit code, nothing lost."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from autocompress.errors import EnvironmentProblem, PolicyError, UserInputError
from autocompress.export.artifacts import STAGING_PREFIX, commit_folder
from autocompress.models.sources import parse_input_shape
from autocompress.space.policy import MAX_BYTES, Policy
from tests.conftest import assert_one_line_error, run_cli, workspace


@pytest.mark.parametrize("text", ["1,1,x,32", "1,,3", "1,3,a,4", "3", "1,0,4,4", "-1,3,4,4"])
def test_malformed_input_shapes_are_refused(text: str) -> None:
    with pytest.raises(UserInputError, match="bad input shape"):
        parse_input_shape(text)


def test_well_formed_input_shapes_parse() -> None:
    assert parse_input_shape("1,3,224,224") == (1, 3, 224, 224)
    assert parse_input_shape("1x3x32x32") == (1, 3, 32, 32)
    assert parse_input_shape(" 1, 1, 32, 32 ") == (1, 1, 32, 32)


def _policy_file(tmp_path: Path, decisions: dict) -> Path:
    space = workspace("builtin:digits-net").space
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"format": "autocompress.policy/1", "model": space.model,
                                "fingerprint": space.fingerprint, "decisions": decisions}))
    return path


def test_a_value_within_tolerance_of_a_choice_becomes_that_choice(tmp_path: Path) -> None:
    space = workspace("builtin:digits-net").space
    prune = space.of_kind("prune")[0].id
    policy = Policy.load(_policy_file(tmp_path, {prune: 0.5000000001})).validate(space)
    assert policy.decisions[prune] == 0.5 and repr(policy.decisions[prune]) == "0.5"
    with pytest.raises(PolicyError, match="is not one of"):
        Policy.load(_policy_file(tmp_path, {prune: 0.51})).validate(space)
    with pytest.raises(PolicyError, match="is not one of"):
        Policy.load(_policy_file(tmp_path, {prune: True})).validate(space)


def test_an_oversized_or_deeply_nested_policy_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    with open(big, "wb") as fh:
        fh.truncate(MAX_BYTES + 1)
    with pytest.raises(PolicyError, match="at most"):
        Policy.load(big)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(PolicyError, match="nested too deeply"):
        Policy.load(deep)


def test_apply_writes_the_normalised_policy(tmp_path: Path) -> None:
    space = workspace("builtin:digits-net").space
    prune = space.of_kind("prune")[0].id
    res = run_cli("apply", "--model", "builtin:digits-net", "--policy", str(_policy_file(tmp_path, {prune: 0.5000000001})),
                  "--out", str(tmp_path / "out"), "--no-measure")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "out" / "policy.json").read_text())["decisions"] == {prune: 0.5}


def test_staging_lives_inside_the_output_folder_and_stale_staging_is_cleaned(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    dead = out / f"{STAGING_PREFIX}999999999"  # no such process
    dead.mkdir()
    (dead / "model.onnx").write_text("half")
    seen = []

    def build(folder: Path) -> int:
        seen.append(folder)
        (folder / "a.txt").write_text("x")
        return 7

    assert commit_folder(out, build) == 7
    assert seen[0].parent == out  # same filesystem as the destination, even when out is a mount point
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]


def test_a_failed_build_leaves_no_new_empty_output_folder(tmp_path: Path) -> None:
    def build(folder: Path) -> None:
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError):
        commit_folder(tmp_path / "new", build)
    assert not (tmp_path / "new").exists()


def test_an_unwritable_output_folder_exits_3(tmp_path: Path, monkeypatch) -> None:
    real_access = os.access
    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == ro else real_access(p, mode))
    space = workspace("builtin:digits-net").space
    res = run_cli("apply", "--model", "builtin:digits-net", "--policy", str(_policy_file(tmp_path, {})),
                  "--out", str(ro / "out"), "--no-measure")
    assert_one_line_error(res, "not writable", code=3)
    assert space is not None


@pytest.mark.parametrize("args, fragment", [
    (["--low-epochs", "-1"], "--low-epochs"), (["--full-epochs", "nan"], "--full-epochs"),
    (["--finalists", "0"], "--finalists"), (["--space", "grid"], "unknown search space"),
    (["--tie", "prune"], "--space layers"), (["--input-shape", "1,1,x,32"], "bad input shape"),
])
def test_bad_search_options_are_one_line_errors(args: list[str], fragment: str, tmp_path: Path) -> None:
    res = run_cli("search", "--target", "mobile", "--budget", "5ms", "--out", str(tmp_path / "out"), *args)
    assert_one_line_error(res, fragment)
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.parametrize("budget", ["1e400ms", "1e308s", "1e400MB"])
def test_a_budget_too_large_to_be_finite_is_refused(budget: str) -> None:
    from autocompress.errors import BudgetError
    from autocompress.hwmodels import parse_budget

    with pytest.raises(BudgetError, match="too large"):
        parse_budget(budget)


def _image_folder(root: Path, classes: int, corrupt: bool = False) -> Path:
    from PIL import Image

    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), color=40 * c + i).save(folder / f"{i}.png")
    if corrupt:
        (root / "class0" / "broken.png").write_bytes(b"not an image")
    return root


def test_a_one_class_image_folder_is_refused(tmp_path: Path) -> None:
    from autocompress.errors import DataError
    from autocompress.evaluators.data import load_data

    with pytest.raises(DataError, match="at least two"):
        load_data(f"imagefolder:{_image_folder(tmp_path / 'one', 1)}", (1, 1, 8, 8))


def test_a_one_class_folder_is_refused_before_a_built_in_model_trains(tmp_path: Path, monkeypatch) -> None:
    import importlib

    from autocompress.errors import DataError
    from autocompress.search.setup import prepare

    train = importlib.import_module("autocompress.evaluators.train")  # the package exports a function of that name
    trained: list[str] = []
    monkeypatch.setattr(train, "pretrained_builtin", lambda name: trained.append(name))  # minutes on first use
    with pytest.raises(DataError, match="at least two"):
        prepare("builtin:digits-net", data=f"imagefolder:{_image_folder(tmp_path / 'one', 1)}")
    assert trained == []


def test_a_corrupt_image_is_named(tmp_path: Path) -> None:
    from autocompress.errors import DataError
    from autocompress.evaluators.data import as_tensors, load_data

    bundle = load_data(f"imagefolder:{_image_folder(tmp_path / 'two', 2, corrupt=True)}", (1, 1, 8, 8))
    with pytest.raises(DataError, match="broken.png"):  # the 4th file of class0: in the training split
        as_tensors(bundle.train)


def test_storage_that_cannot_be_opened_exits_3(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/missing/folder/study.db"
    res = run_cli("search", "--target", "mobile", "--budget", "5ms", "--trials", "1", "--storage", url,
                  "--out", str(tmp_path / "out"), "--low-epochs", "0.05", "--full-epochs", "0.05", "--no-measure")
    assert_one_line_error(res, "cannot open --storage", code=3)


def test_a_missing_database_driver_is_named(monkeypatch) -> None:
    from autocompress.search.workers import rdb_storage

    for name in ("psycopg2", "psycopg"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed: importing it raises ImportError
    with pytest.raises(EnvironmentProblem, match="psycopg2-binary") as info:
        rdb_storage("postgresql+psycopg2://user:secret@127.0.0.1:1/db")
    assert "secret" not in str(info.value)


@pytest.mark.heavy
def test_a_redirected_search_logs_each_trial_as_it_finishes(tmp_path: Path) -> None:
    """stdout to a file (CI logs, nohup): plain lines per phase and trial, flushed as they happen."""
    import subprocess

    from tests.test_search import TINY

    (tmp_path / "tiny.py").write_text(TINY)
    log = tmp_path / "log.txt"
    cmd = [sys.executable, "-m", "autocompress.cli.main", "search", "--model", f"{tmp_path}/tiny.py:model",
           "--data", f"{tmp_path}/tiny.py:data", "--target", "mobile", "--budget", "0.9x", "--trials", "2",
           "--low-epochs", "0.2", "--full-epochs", "0.2", "--finalists", "1", "--no-measure", "--out", str(tmp_path / "out")]
    with open(log, "w") as fh:
        res = subprocess.run(cmd, stdout=fh, stderr=subprocess.PIPE, text=True, timeout=300,
                             env={**os.environ, "AUTOCOMPRESS_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr[-2000:]
    lines = log.read_text().splitlines()
    assert any(l.startswith("phase: searching") for l in lines)
    trials = [l for l in lines if l.startswith("trial ") and " complete (" in l]
    assert len(trials) >= 2 and all("best" in l and "elapsed" in l for l in trials)
    assert "\r" not in log.read_text() and not any(l.startswith("searching") for l in lines)  # no progress bar


def test_an_empty_budget_is_a_bad_budget_not_a_missing_one(tmp_path: Path) -> None:
    res = run_cli("search", "--target", "mobile", "--budget", "", "--out", str(tmp_path / "out"))
    assert_one_line_error(res, "empty budget")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("spec, fragment", [
    ("bogus", "bad data spec"), ("sklearn:iris", "iris"), ("imagefolder:{tmp}/missing", "does not exist"),
    ("{tmp}/missing.py:data", "does not exist"), ("nosuch:x", "unknown source"),
])
def test_a_bad_data_spec_is_refused_before_the_builtin_model_is_trained(spec: str, fragment: str, tmp_path: Path,
                                                                       monkeypatch) -> None:
    """A first search trains digits-net for minutes; a --data it cannot use is said before that."""
    import importlib

    train = importlib.import_module("autocompress.evaluators.train")  # the package re-exports a function of that name

    def trains(*args, **kwargs):
        raise AssertionError("the built-in model was trained before --data was checked")

    monkeypatch.setattr(train, "pretrained_builtin", trains)
    data = spec.replace("{tmp}", str(tmp_path))
    res = run_cli("search", "--target", "mobile", "--budget", "5ms", "--data", data, "--out", str(tmp_path / "out"))
    assert_one_line_error(res, fragment)
    policy = tmp_path / "p.json"
    policy.write_text(json.dumps({"format": "autocompress.policy/1", "decisions": {}}))
    res = run_cli("apply", "--model", "builtin:digits-net", "--policy", str(policy), "--data", data,
                  "--out", str(tmp_path / "applied"), "--no-measure")
    assert_one_line_error(res, fragment)
    assert not (tmp_path / "out").exists() and not (tmp_path / "applied").exists()


def test_a_weights_file_that_is_no_state_dict_is_one_line_and_never_unpickled(tmp_path: Path, capfd) -> None:
    import pickle
    import warnings

    from autocompress.errors import WeightsError
    from autocompress.models.sources import load_weights

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    model = workspace("builtin:digits-net").model
    (tmp_path / "w.pt").write_bytes(pickle.dumps(Payload(), protocol=4))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(WeightsError, match="as a state dict"):
            load_weights(model, tmp_path / "w.pt")
    assert not seen and capfd.readouterr() == ("", "")  # torch's protocol warning used to precede the error
    assert not (tmp_path / "ran").exists()
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(WeightsError, match="empty or truncated"):
        load_weights(model, tmp_path / "empty.pt")


@pytest.mark.parametrize("args", [["profile", "--model", "builtin:digits-net"],
                                  ["space", "--model", "builtin:digits-net", "--json"]])
def test_a_reader_that_has_gone_is_no_error(args: list[str]) -> None:
    """`autocompress ... | head`: a table (rich) or JSON (print) into a pipe nobody reads any more."""
    import subprocess

    read, write = os.pipe()
    os.close(read)  # every write now fails with EPIPE, as after `head` has exited
    try:
        res = subprocess.run([sys.executable, "-m", "autocompress.cli.main", *args], stdout=write,
                             stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write)
    assert (res.returncode, res.stderr) == (0, "")  # was 1 (rich's exit) or 120 and 'Exception ignored' (print)


def test_a_ctrl_c_that_surfaces_as_another_exception_is_still_an_interruption(capsys) -> None:
    import signal

    import typer

    from autocompress.cli.app import guard

    @guard
    def command() -> None:
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            raise ImportError("initialization failed") from None  # what an extension module's import made of it

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(typer.Exit) as info:
            command()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the command's handler is gone
    finally:
        signal.signal(signal.SIGINT, previous)
    assert info.value.exit_code == 130
    assert capsys.readouterr().err.startswith("error: interrupted;")
