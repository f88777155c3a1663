"""Faults: diverging and raising candidates, a killed Ray driver.

A candidate whose fine-tune diverges (NaN loss) or that raises is recorded as
failed with its reason and the sweep goes on, on both backends; the Ray
backend screens over-budget candidates before any fine-tuning; a Ray driver
killed with SIGKILL and restarted with the same command restores the Tune
experiment and loses no finished trial.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from cluster_utils import cli_env, kill_group, read_result, run_search, search_args, wait_for, write_factories


def rows(out: Path) -> list[dict]:
    with open(out / "trials.csv") as fh:
        return list(csv.DictReader(fh))


def tune_results(out: Path) -> dict[str, list[dict]]:
    found = {}
    for f in sorted(out.glob("ray-tune/*/trial_*/result.json")):
        lines = [json.loads(l) for l in f.read_text().splitlines() if l.strip()]
        if lines:
            found[f.parent.name] = lines
    return found


@pytest.fixture()
def short_tmp():
    """A short private TMPDIR for the local Ray instance (its socket paths must stay short)."""
    folder = tempfile.mkdtemp(prefix="acT", dir="/tmp")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_diverging_candidates_fail_with_their_reason(tmp_path, monkeypatch):
    from autocompress.compress.prune import kept_channels
    from autocompress.search.core import SearchConfig
    from autocompress.search.run import run_search

    model, data = write_factories(tmp_path)
    monkeypatch.setenv("AC_FAULT", "nan")  # conv2 pruned to half or less outputs NaN: the loss diverges
    config = SearchConfig(target="mobile", budget="0.0008MB", trials=8, low_epochs=0.5, full_epochs=0.5, finalists=1)
    result = run_search(config, model=model, data=data, out=tmp_path / "out", measure=False)
    counts = result["trials"]
    assert counts["complete"] + counts["failed"] == 8
    assert counts["failed"] >= 1 and counts["complete"] >= 1
    failed = [r for r in rows(tmp_path / "out") if r["state"] == "FAIL"]
    assert len(failed) == counts["failed"]
    assert all("diverged" in r["fail_reason"] for r in failed)
    chosen = json.loads((tmp_path / "out" / "policy.json").read_text())
    round_to = chosen["options"]["prune_round_to"]  # mobile's channel block

    def conv2_width(decisions: dict) -> int:
        return kept_channels(16, decisions.get("prune:conv2", 0.0), round_to)

    for r in failed:  # exactly the candidates that prune conv2 (16 channels) to half or less
        assert conv2_width(json.loads(r["policy"])) <= 8
    assert result["best"]["accuracy"] >= 0.0
    assert conv2_width(chosen["decisions"]) > 8


@pytest.mark.heavy
def test_ray_backend_screens_and_records_failures(tmp_path, short_tmp):
    model, data = write_factories(tmp_path)
    out = tmp_path / "out"
    trials = 8
    env = cli_env(AUTOCOMPRESS_CACHE=str(tmp_path / "cache"), AC_FAULT="raise", TMPDIR=short_tmp)
    # One trial at a time: the sampler sees every result before its next proposal, so the run is reproducible.
    cmd = search_args(model, data, out, trials, "--backend", "ray", "--max-concurrent", "1", "--seed", "2")
    res = run_search(cmd, env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Trial status" not in res.stdout  # Tune's own tables stay quiet; the CLI prints the summary
    result = read_result(out)
    counts = result["trials"]
    assert counts["complete"] + counts["failed"] + counts["pruned"] == trials
    assert result["ray"]["screened"] >= 1
    assert counts["pruned"] == result["ray"]["screened"] + result["ray"]["stopped_early"]
    found = tune_results(out)
    assert len(found) == trials
    screened = [r for r in found.values() if r[-1]["status"] == "infeasible"]
    assert len(screened) == result["ray"]["screened"]
    for r in screened:  # reported once, accuracy 0, before any fine-tuning
        assert len(r) == 1 and r[0]["accuracy"] == 0.0 and r[0]["size_bytes"] > result["budget"]["size_bytes"]
    failed = [r for r in rows(out) if r["state"] == "FAIL"]
    assert len(failed) == counts["failed"]
    assert all("injected fault" in r["fail_reason"] for r in failed)
    assert (out / "model.onnx").exists() and result["feasible"] is True


@pytest.mark.heavy
def test_killed_ray_driver_resumes_the_sweep(tmp_path, short_tmp):
    model, data = write_factories(tmp_path)
    out = tmp_path / "out"
    trials = 6
    env = cli_env(AUTOCOMPRESS_CACHE=str(tmp_path / "cache"), TMPDIR=short_tmp)
    cmd = search_args(model, data, out, trials, "--backend", "ray", "--max-concurrent", "1", "--low-epochs", "12")
    first = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)

    def finished():
        done = {k: v for k, v in tune_results(out).items()
                if v[-1]["status"] != "ok" or v[-1].get("chunk") == 3}
        return done if len(done) >= 2 else None

    try:
        wait_for(finished, 240, "two finished Ray trials")
        time.sleep(1.5)  # the experiment state is saved every second
    finally:
        kill_group(first)  # SIGKILL the driver and the local Ray instance it started
    before = finished()
    assert len(before) < trials

    again = run_search(cmd, env, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    after = tune_results(out)
    assert len(after) == trials
    for name, results in before.items():  # finished trials were restored, not run again
        assert after[name] == results
    result = read_result(out)
    counts = result["trials"]
    assert counts["complete"] + counts["failed"] + counts["pruned"] == trials
    assert counts["complete"] >= 1
