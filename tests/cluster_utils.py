"""Helpers for the cluster tests: a tiny model and data set, a real PostgreSQL server, a real Ray cluster.

Everything talks over loopback (127.0.0.0/8) and keeps its files in folders the caller owns,
so the tests never touch a shared /tmp/ray or a system database.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
CLI = str(VENV_BIN / "autocompress")
RAY = str(VENV_BIN / "ray")

TINY_MODEL = '''
import os

import torch
from torch import nn

INPUT_SHAPE = (1, 1, 16, 16)


def probe(x):
    """Identity on the full model; with AC_FAULT set, conv2 pruned to half or less fails the candidate."""
    mode = os.environ.get("AC_FAULT", "")
    if mode and x.shape[1] <= 8:
        if mode == "raise":
            raise RuntimeError("injected fault: conv2 pruned to half")
        if mode == "nan":
            return x * float("nan")
    return x


torch.fx.wrap("probe")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = probe(torch.relu(self.bn2(self.conv2(x))))
        return self.head(x.mean(dim=(2, 3)))


def tiny():
    torch.manual_seed(0)
    return Tiny()
'''

TINY_DATA = '''
import torch
from torch.utils.data import TensorDataset


def blobs():
    """Four classes of 16x16 images: a bright quadrant plus noise (seeded)."""
    gen = torch.Generator().manual_seed(0)
    n = 320
    y = torch.arange(n) % 4
    x = 0.3 * torch.randn(n, 1, 16, 16, generator=gen)
    for i in range(n):
        r, c = divmod(int(y[i]), 2)
        x[i, 0, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] += 1.0
    return TensorDataset(x[:256], y[:256]), TensorDataset(x[256:], y[256:])
'''


def write_factories(folder: Path) -> tuple[str, str]:
    """The tiny model and data files; returns their ``--model`` and ``--data`` specs."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny_model.py").write_text(TINY_MODEL)
    (folder / "tiny_data.py").write_text(TINY_DATA)
    return f"{folder / 'tiny_model.py'}:tiny", f"{folder / 'tiny_data.py'}:blobs"


def search_args(model: str, data: str, out: Path, trials: int, *extra: str) -> list[str]:
    """A fast ``autocompress search`` command line for the tiny model, over one parameter per decision: these
    tests drive the workers' mechanics (screening, claims, failures), which need candidates the sampler
    proposes freely, over budget and broken ones included."""
    return [CLI, "search", "--model", model, "--data", data, "--target", "mobile", "--budget", "0.0008MB",
            "--trials", str(trials), "--low-epochs", "0.5", "--full-epochs", "0.5", "--finalists", "1",
            "--no-measure", "--out", str(out), "--space", "layers", *extra]


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("AUTOCOMPRESS_CACHE", tempfile.mkdtemp(prefix="ac-cache-"))
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}, **extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_result(out: Path) -> dict:
    return json.loads((out / "result.json").read_text())


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def session_members(sid: int) -> list[int]:
    """Processes in session ``sid`` (Ray gives each worker process its own process group, not session)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # after "pid (comm)": state, ppid, pgrp, session
            found.append(int(stat.parent.name))
    return found


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a process started with ``start_new_session=True`` and everything it spawned."""
    for _ in range(3):
        for pid in session_members(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def run_search(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``subprocess.run`` for a search that may start a local Ray instance: in its own session, so a timeout
    kills the Ray daemons too (they would outlive the driver and load the rest of the test run)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# -- PostgreSQL -----------------------------------------------------------------------------------
def _pg_bin() -> Path:
    """The PostgreSQL server binaries: on PATH, else the newest Debian/Ubuntu install."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    return versions[-1] if versions else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()


def _pg_user() -> list[str]:
    """PostgreSQL refuses to run as root: run its binaries as the ``postgres`` user then."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


class Postgres:
    """A throwaway server: initdb in a private folder, TCP on 127.0.0.1 only, socket in that folder."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="ac-pg-"))
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/autocompress"

    @staticmethod
    def _pg(name: str) -> Path:
        return PG_BIN / name

    def _run(self, *cmd: str) -> None:
        subprocess.run([*_pg_user(), *cmd], check=True, capture_output=True, timeout=120)

    def start(self) -> "Postgres":
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
        data = self.root / "data"
        self._run(str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c max_connections=50"
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(self.root / "log"), "-o", opts, "-w", "start")
        self._run(str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "autocompress")
        return self

    def stop(self) -> None:
        try:
            self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.root / "data"), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


# -- Ray ------------------------------------------------------------------------------------------
class RayCluster:
    """A head node and worker nodes started with ``ray start`` on loopback addresses.

    Ray replaces 127.0.0.1 by the machine's outward address, so the head uses
    127.0.0.2 and each worker node the next loopback address (127.0.0.3, ...):
    every connection stays inside 127.0.0.0/8.

    Session files go to a private short folder (Unix socket paths must stay
    under ~100 characters); the dashboard is off. Each worker node runs
    ``ray start --block`` in its own process group, so killing that group
    kills exactly that node.
    """

    def __init__(self, env: dict[str, str]) -> None:
        self.temp = Path(tempfile.mkdtemp(prefix="acray-", dir="/tmp"))
        self.port = free_port()
        self.address = f"127.0.0.2:{self.port}"
        token = self.temp / "auth_token"  # a private token instead of the shared ~/.ray/auth_token
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        # Workers at normal priority, as docs/cluster.md advises for shared nodes: the test suite shares the machine.
        self.env = dict(env, RAY_TMPDIR=str(self.temp), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
                        RAY_worker_niceness="0")
        self.workers: list[subprocess.Popen] = []
        self.head: subprocess.Popen | None = None

    def _common(self, ip: str) -> list[str]:
        return ["--num-cpus=1", f"--node-ip-address={ip}", "--object-store-memory=100000000", "--block"]

    def start(self, workers: int = 1) -> "RayCluster":
        self.head = subprocess.Popen(
            [RAY, "start", "--head", f"--port={self.port}", f"--temp-dir={self.temp}", "--include-dashboard=false",
             "--disable-usage-stats", *self._common("127.0.0.2")],
            env=self.env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_nodes(1)
        self.head_id = self.alive_node_ids()[0]
        for _ in range(workers):
            self.add_worker()
        return self

    def add_worker(self) -> subprocess.Popen:
        ip = f"127.0.0.{3 + len(self.workers)}"
        proc = subprocess.Popen([RAY, "start", f"--address={self.address}", *self._common(ip)], env=self.env,
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.workers.append(proc)
        self._wait_nodes(1 + len(self.workers))
        return proc

    def alive_node_ids(self) -> list[str]:
        code = ("import ray, json; ray.init(address='%s', logging_level='ERROR', log_to_driver=False); "
                "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))" % self.address)
        res = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=120)
        try:
            return json.loads(res.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return []

    def alive_nodes(self) -> int:
        return len(self.alive_node_ids())

    def _wait_nodes(self, n: int) -> None:
        wait_for(lambda: self.alive_nodes() >= n, 120, f"{n} Ray nodes", poll=1.0)

    def kill_worker(self, proc: subprocess.Popen) -> None:
        kill_group(proc)

    def stop(self) -> None:
        for proc in [*self.workers, self.head]:
            if proc is not None and proc.poll() is None:
                kill_group(proc)
        shutil.rmtree(self.temp, ignore_errors=True)


def kill_after_completed(args: list[str], out: Path, completed: int = 2, timeout: float = 240.0) -> str:
    """Run ``autocompress ARGS`` and SIGKILL it once its journal study in ``out`` has ``completed``
    finished trials; returns the study's name (fails the test, with the search's stderr, if that never happens).

    The journal is opened as a shared ``--storage`` file, not as ``--out``'s own journal: opening it as the
    owner would remove the lock link the live search holds mid-write."""
    import optuna
    import pytest

    from autocompress.search.optuna_driver import make_storage

    log = out.parent / f"{out.name}.stderr"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "autocompress.cli.main", *args],
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)
    deadline = time.time() + timeout
    done = 0
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
            if not (out / "study.journal").exists():
                continue
            storage = make_storage(str(out / "study.journal"), out)
            names = optuna.get_all_study_names(storage)
            if names:
                trials = optuna.load_study(study_name=names[0], storage=storage).trials
                done = sum(t.state.name == "COMPLETE" for t in trials)
                if done >= completed:
                    os.killpg(proc.pid, signal.SIGKILL)
                    return names[0]
        why = f"it exited with code {proc.returncode}" if proc.poll() is not None else f"{timeout:.0f} s passed"
        tail = log.read_text(errors="replace")[-3000:]
        pytest.fail(f"the search completed {done} of {completed} trials before {why}; its stderr ends:\n{tail}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
