"""The Ray Tune backend on a real two-node Ray cluster (two raylets on loopback addresses), through the CLI.

The sweep must run trials on both nodes, survive the worker node being killed
mid-sweep (its trial is retried on the head node), and account for every
requested trial as complete, failed or pruned.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cluster_utils import RayCluster, cli_env, read_result, run_search, search_args, wait_for, write_factories


def trial_results(experiment_root: Path) -> dict[str, list[dict]]:
    """Every reported result per Tune trial folder, read from the files Tune writes."""
    out: dict[str, list[dict]] = {}
    for f in sorted(experiment_root.glob("*/trial_*/result.json")):
        rows = [json.loads(l) for l in f.read_text().splitlines() if l.strip()]
        if rows:
            out[f.parent.name] = rows
    return out


@pytest.fixture()
def cluster(tmp_path):
    c = RayCluster(cli_env(AUTOCOMPRESS_CACHE=str(tmp_path / "cache")))
    try:
        yield c.start(workers=1)
    finally:
        c.stop()


@pytest.mark.heavy
def test_two_node_sweep_survives_a_node_kill(tmp_path, cluster):
    model, data = write_factories(tmp_path)
    out = tmp_path / "out"
    trials = 8
    # Chunks long enough that a worker's trial is seen mid-fine-tune while the head reports too (at 60 epochs
    # a busy neighbour lane let every worker trial finish unseen in two full-suite runs).
    cmd = search_args(model, data, out, trials, "--backend", "ray", "--address", cluster.address,
                      "--max-concurrent", "2", "--cpus-per-trial", "1", "--low-epochs", "150",
                      "--no-early-stop")  # ASHA must not end the victim before the node dies
    proc = subprocess.Popen(cmd, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def fine_tuning_on_worker():
        """A trial that reported a chunk (not its last) from the worker node and is still fine-tuning there."""
        rows = trial_results(out / "ray-tune")
        busy = [name for name, r in rows.items()
                if r[-1]["node"] != cluster.head_id and r[-1]["status"] == "ok" and r[-1]["chunk"] in (1, 2)]
        if proc.poll() is not None:  # the sweep ended before a victim was seen: say what it ran
            seen = sorted((r[-1]["node"] == cluster.head_id, r[-1].get("chunk", -1)) for r in rows.values())
            raise AssertionError(f"sweep exited ({proc.returncode}) before a kill; (on head, last chunk): {seen}")
        return busy[0] if busy and any(r[-1]["node"] == cluster.head_id for r in rows.values()) else None

    try:
        victim = wait_for(fine_tuning_on_worker, 240, "trials on both nodes, one mid-fine-tune on the worker", 0.2)
        victim_node = trial_results(out / "ray-tune")[victim][-1]["node"]
        cluster.kill_worker(cluster.workers[0])  # SIGKILL to the worker node's raylet and its workers
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    wait_for(lambda: cluster.alive_nodes() == 1, 90, "Ray to notice the dead node", poll=2.0)

    result = read_result(out)
    counts = result["trials"]
    assert counts["complete"] + counts["failed"] + counts["pruned"] == trials
    assert counts["complete"] >= 1
    assert trials - result["ray"]["errored"] <= sum(result["ray"]["nodes"].values()) <= trials
    assert result["ray"]["address"] == cluster.address
    rows = trial_results(out / "ray-tune")
    # A trial started on the worker just as it died may leave no report of its own; it is still
    # counted above. Every other trial reported.
    assert trials - 1 <= len(rows) <= trials
    assert {r["node"] for rs in rows.values() for r in rs} == {cluster.head_id, victim_node}  # both nodes ran trials
    assert rows[victim][0]["node"] != cluster.head_id
    # The trial cut off on the killed node was retried on the head and finished there, or, when
    # Ray gave up on it, it is recorded as failed: never lost. (Its last chunk may also have
    # finished on the worker between the poll that chose it and the kill.)
    retried = rows[victim][-1]["node"] == cluster.head_id and rows[victim][-1]["status"] in ("ok", "failed")
    finished_first = rows[victim][-1]["node"] == victim_node and rows[victim][-1]["chunk"] == 3
    assert retried or finished_first or counts["failed"] >= 1 or len(rows) < trials, rows[victim]
    for name in ("policy.json", "model.onnx", "report.md", "trials.csv", "pareto.png"):
        assert (out / name).exists(), name
    assert 0.0 <= result["best"]["accuracy"] <= 1.0
    assert result["feasible"] is True


@pytest.mark.heavy
def test_ray_stays_out_of_the_import_path_and_resume_needs_a_sweep(tmp_path):
    code = ("import sys, autocompress, autocompress.cli.main, autocompress.search.run; "
            "print('ray' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "False", res.stderr[-2000:]

    model, data = write_factories(tmp_path)
    out = tmp_path / "out"
    res = subprocess.run(search_args(model, data, out, 2, "--backend", "ray", "--resume"),
                         env=cli_env(AUTOCOMPRESS_CACHE=str(tmp_path / "cache")), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "no interrupted sweep" in lines[0], res.stderr
    assert not (out / "result.json").exists()


@pytest.mark.heavy
def test_a_private_ray_instance_runs_its_trials_at_normal_priority():
    """Ray's default worker niceness (15) lets any busy neighbour starve the trials."""
    code = ("import os, ray; from autocompress.search._ray_session import session\n"
            "with session(None, 1):\n"
            "    print(ray.get(ray.remote(lambda: os.nice(0)).remote()))\n"
            "print(os.environ.get('RAY_worker_niceness'))")
    short = tempfile.mkdtemp(prefix="acN", dir="/tmp")  # Ray's socket paths must stay short
    env = cli_env(TMPDIR=short)
    env.pop("RAY_worker_niceness", None)
    try:
        res = run_search([sys.executable, "-c", code], env, timeout=180)
    finally:
        shutil.rmtree(short, ignore_errors=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["0", "None"]  # the worker's niceness, then the driver's environment restored


@pytest.mark.heavy
def test_the_ray_backend_locks_out_and_refuses_a_folder_holding_another_search(tmp_path):
    """The same rules as the Optuna backend: one search per --out, and a folder that holds another search
    is refused (nothing touched) before Ray starts."""
    from autocompress.search.outdir import FolderLock

    model, data = write_factories(tmp_path)
    env = cli_env(AUTOCOMPRESS_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "out"
    with FolderLock(out):
        res = subprocess.run(search_args(model, data, out, 2, "--backend", "ray"), env=env, capture_output=True,
                             text=True, timeout=120)
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert res.returncode == 2 and len(lines) == 1 and "is in use by a running search" in lines[0], res.stderr

    held = {"format": "autocompress.search-folder/1", "model": "builtin:digits-net", "data": "sklearn:digits",
            "target": "mobile", "budget": "9ms", "objectives": ["accuracy"], "space": "tradeoff"}
    (out / "search.json").write_text(json.dumps(held))
    (out / "result.json").write_text("{}")
    res = subprocess.run(search_args(model, data, out, 2, "--backend", "ray"), env=env, capture_output=True,
                         text=True, timeout=120)
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "holds another search" in lines[0] and "--force" in lines[0], lines
    assert json.loads((out / "search.json").read_text()) == held and (out / "result.json").read_text() == "{}"
    assert not (out / "ray-tune").exists()


def test_the_ray_backend_says_each_stage_of_a_first_use_calibration(monkeypatch, capsys):
    import autocompress.hwmodels.first_use as first_use
    from autocompress.errors import UserInputError
    from autocompress.search.core import SearchConfig
    from autocompress.search.ray_backend import run_ray_search

    def calibrating(name, progress=None):
        progress("calibrating `local` on first use (about a minute)")

    monkeypatch.setattr(first_use, "ready_target", calibrating)
    with pytest.raises(UserInputError, match="bad Ray resources"):  # stops right after the calibration
        run_ray_search(SearchConfig(target="local", budget="1x"), cpus_per_trial=0)
    assert "calibrating `local` on first use" in capsys.readouterr().err
