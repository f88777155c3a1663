"""Several ``autocompress search`` processes on one Optuna study in a real PostgreSQL server.

Optuna's distributed mode: every worker asks and tells on the shared RDB
storage. The study's trial total counts all workers together; seeds are
enqueued once; a killed worker's trials run again, and a restarted worker
continues without losing completed trials.
"""

from __future__ import annotations

import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from autocompress.search.workers import pg_driver as _pg_driver
from cluster_utils import Postgres, cli_env, kill_group, read_result, search_args, wait_for, write_factories

STUDY = "shared-study"


@pytest.fixture(scope="module")
def postgres():
    server = Postgres().start()
    yield server
    server.stop()


def fresh_db(server: Postgres, name: str) -> str:
    subprocess.run(["runuser", "-u", "postgres", "--", str(server._pg("createdb")), "-h", "127.0.0.1", "-p",
                    str(server.port), "-U", "postgres", name], check=True, capture_output=True)
    return server.url.rsplit("/", 1)[0] + f"/{name}"


def study_trials(url: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=STUDY, storage=_pg_driver(url)).get_trials(deepcopy=False)


@pytest.mark.heavy
def test_two_workers_share_one_study(tmp_path, postgres):
    url = fresh_db(postgres, "two_workers")
    model, data = write_factories(tmp_path)
    trials = 10
    env = cli_env(AUTOCOMPRESS_CACHE=str(tmp_path / "cache"), AUTOCOMPRESS_HEARTBEAT_S="2")
    procs = [subprocess.Popen(search_args(model, data, tmp_path / f"out{i}", trials, "--storage", url,
                                          "--study-name", STUDY, "--low-epochs", "3"),
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]

    all_trials = study_trials(url)
    numbers = [t.number for t in all_trials]
    assert len(numbers) == len(set(numbers))  # no duplicated trial numbers
    evaluated = [t for t in all_trials if t.state in (TrialState.COMPLETE, TrialState.FAIL)]
    assert len(evaluated) == trials  # the total counts both workers together, no overshoot
    assert not [t for t in all_trials if t.state == TrialState.RUNNING]
    # Only repairs enqueued after the last slot was taken may be left waiting, as on one machine.
    assert all(t.user_attrs.get("origin", "").startswith("repair of")
               for t in all_trials if t.state == TrialState.WAITING)
    owners = {t.user_attrs["owner"] for t in evaluated}
    assert len(owners) == 2  # both workers fine-tuned candidates
    # The uniform seeds were enqueued once and each was taken by one worker only.
    seeds = [t for t in all_trials if t.user_attrs.get("origin") == "uniform"]
    seed_params = [tuple(sorted(t.params.items())) for t in seeds]
    assert seeds and len(seed_params) == len(set(seed_params))
    # Every fine-tuned trial carries the claim that reserved its slot.
    assert all(t.user_attrs.get("claimed") for t in evaluated)
    for i in range(2):
        result = read_result(tmp_path / f"out{i}")
        assert result["trials"]["complete"] + result["trials"]["failed"] == trials
        assert result["study"] == STUDY


@pytest.mark.heavy
def test_killed_worker_resumes_without_losing_trials(tmp_path, postgres):
    url = fresh_db(postgres, "resume")
    model, data = write_factories(tmp_path)
    trials = 8
    env = cli_env(AUTOCOMPRESS_CACHE=str(tmp_path / "cache"), AUTOCOMPRESS_HEARTBEAT_S="2")
    cmd = search_args(model, data, tmp_path / "out", trials, "--storage", url, "--study-name", STUDY,
                      "--low-epochs", "20")
    first = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)

    def completed():
        try:
            done = [t for t in study_trials(url) if t.state == TrialState.COMPLETE]
        except KeyError:  # the study does not exist yet
            return None
        return done if len(done) >= 2 else None

    try:
        wait_for(completed, 180, "two completed trials")
    finally:
        kill_group(first)  # SIGKILL mid-search
    before = {t.number: t.values for t in study_trials(url) if t.state == TrialState.COMPLETE}
    running = {t.number: bool(t.user_attrs.get("claimed")) for t in study_trials(url) if t.state == TrialState.RUNNING}
    assert len(before) < trials

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    after = {t.number: t for t in study_trials(url)}
    for number, values in before.items():  # no completed trial lost or changed
        assert after[number].state == TrialState.COMPLETE and after[number].values == values
    for number, claimed in running.items():
        if claimed:  # the killed process's fine-tune is not counted, and its candidate runs again
            assert after[number].state == TrialState.PRUNED
            assert after[number].user_attrs.get("reason") == "interrupted; run again"
            rerun = [t for t in after.values() if t.user_attrs.get("origin") == f"re-run of {number}"]
            assert len(rerun) == 1 and rerun[0].params == after[number].params
            assert rerun[0].state in (TrialState.COMPLETE, TrialState.FAIL)
        else:  # killed between asking and claiming a slot: never fine-tuned, so not counted
            assert after[number].state == TrialState.PRUNED
            assert after[number].user_attrs.get("reason") == "interrupted before fine-tuning"
    evaluated = [t for t in after.values() if t.state in (TrialState.COMPLETE, TrialState.FAIL)]
    assert len(evaluated) == trials
    assert read_result(tmp_path / "out")["trials"]["complete"] + read_result(tmp_path / "out")["trials"]["failed"] == trials


@pytest.mark.heavy
def test_a_worker_killed_before_claiming_leaves_no_extra_trial(tmp_path, postgres):
    """A worker killed between asking for a trial and claiming a slot leaves a RUNNING trial with no
    owner and no heartbeat: once stale it is pruned as never fine-tuned, not failed into the count."""
    url = fresh_db(postgres, "orphan")
    model, data = write_factories(tmp_path)
    env = cli_env(AUTOCOMPRESS_CACHE=str(tmp_path / "cache"), AUTOCOMPRESS_HEARTBEAT_S="1")
    first = subprocess.run(search_args(model, data, tmp_path / "out", 2, "--storage", url, "--study-name", STUDY),
                           env=env, capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stderr[-3000:]
    study = optuna.load_study(study_name=STUDY, storage=_pg_driver(url))
    orphan = study.ask().number  # asked, then the worker died: no owner, no claim, no heartbeat

    total = 4
    again = subprocess.run(search_args(model, data, tmp_path / "out", total, "--storage", url, "--study-name", STUDY),
                           env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    after = {t.number: t for t in study_trials(url)}
    assert after[orphan].state == TrialState.PRUNED
    assert after[orphan].user_attrs.get("reason") == "interrupted before fine-tuning"
    evaluated = [t for t in after.values() if t.state in (TrialState.COMPLETE, TrialState.FAIL)]
    assert len(evaluated) == total
    assert not [t for t in after.values() if t.state == TrialState.RUNNING]


@pytest.mark.heavy
def test_two_workers_search_one_user_task_on_postgresql(tmp_path, postgres):
    """A Task file is imported by every worker; the study counts both workers' trials together."""
    from tests.test_tasks import TOKENS

    url = fresh_db(postgres, "task_workers")
    (tmp_path / "tokens.py").write_text(TOKENS)
    spec = str(tmp_path / "tokens.py")
    env = cli_env(AUTOCOMPRESS_CACHE=str(tmp_path / "cache"), AUTOCOMPRESS_HEARTBEAT_S="2")
    args = lambda i: [sys.executable, "-m", "autocompress.cli.main", "search", "--model", f"{spec}:model", "--task", f"{spec}:task", "--target",
                      "mobile", "--budget", "0.6x", "--trials", "4", "--space", "layers", "--low-epochs", "0.3",
                      "--full-epochs", "0.3", "--finalists", "1", "--no-measure", "--storage", url, "--study-name",
                      STUDY, "--out", str(tmp_path / f"out{i}")]
    procs = [subprocess.Popen(args(i), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
    evaluated = [t for t in study_trials(url) if t.state in (TrialState.COMPLETE, TrialState.FAIL)]
    assert len(evaluated) == 4
    for i in range(2):
        result = read_result(tmp_path / f"out{i}")
        assert result["metric"] == "balanced_acc" and result["study"] == STUDY
