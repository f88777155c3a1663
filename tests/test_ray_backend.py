"""The Ray Tune backend on a real two-node Ray cluster (two raylets on 127.0.0.1), through the CLI.

The sweep must run trials on both nodes, survive the worker node being killed
mid-sweep (its trial is retried on the head node), and account for every
requested trial as complete, failed or pruned.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from cluster_utils import RayCluster, cli_env, read_result, search_args, wait_for, write_factories


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
    c = RayCluster(cli_env(AUTOCOMPRESS_CACHE=str(tmp_path / "cache"))).start(workers=1)
    yield c
    c.stop()


def test_two_node_sweep_survives_a_node_kill(tmp_path, cluster):
    model, data = write_factories(tmp_path)
    out = tmp_path / "out"
    trials = 8
    cmd = search_args(model, data, out, trials, "--backend", "ray", "--address", cluster.address,
                      "--max-concurrent", "2", "--cpus-per-trial", "1", "--low-epochs", "24")
    proc = subprocess.Popen(cmd, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def nodes_seen():
        rows = trial_results(out / "ray-tune")
        return {r[-1]["node"] for r in rows.values()} if len(rows) >= 2 else set()

    try:
        wait_for(lambda: len(nodes_seen()) >= 2, 240, "trials on both nodes")
        worker = cluster.workers[0]
        cluster.kill_worker(worker)  # SIGKILL to the worker node's raylet and its workers
        killed_at = time.time()
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert cluster.alive_nodes() == 1

    result = read_result(out)
    counts = result["trials"]
    assert counts["complete"] + counts["failed"] + counts["pruned"] == trials
    assert counts["complete"] >= 1
    assert len(result["ray"]["nodes"]) == 2  # trials ran on both nodes
    assert sum(result["ray"]["nodes"].values()) == trials - result["ray"]["errored"]
    assert result["ray"]["address"] == cluster.address
    # After the kill, every result came from the surviving head node.
    rows = trial_results(out / "ray-tune")
    assert len(rows) == trials
    late = {r["node"] for rs in rows.values() for r in rs if r["timestamp"] > killed_at + 5}
    assert len(late) <= 1
    for name in ("policy.json", "model.onnx", "report.md", "trials.csv", "pareto.png"):
        assert (out / name).exists(), name
    assert 0.0 <= result["best"]["accuracy"] <= 1.0
    assert result["feasible"] is True
