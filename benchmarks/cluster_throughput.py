"""Trials per hour with one and two workers, and what Ray adds per trial, for one fixed small search.

The search: a 2-conv CNN on 16x16 images (the test model), 256 training
images, every candidate feasible (a 4 MB size budget, so nothing is
screened and both backends fine-tune every trial), ``--low-epochs 40`` per
candidate (about 1 s of fine-tuning each), 12 trials. Configurations:

- ``optuna-1``: the Optuna backend, one process, journal storage.
- ``optuna-2-postgres``: two Optuna processes on one study in a local
  PostgreSQL server (Optuna's distributed mode).
- ``ray-1``, ``ray-2``: the Ray Tune backend on a local Ray instance with
  one and two concurrent trials (one CPU each). ASHA is switched off here
  (``chunks=1``) so every trial fine-tunes for the same epochs as on the
  Optuna backend; its early stopping saves work on top of these numbers.

For each configuration the script times the search phase only (``Search.run``
or ``Tuner.fit``, without model loading, finalists and export) and the
fine-tuning inside it, so ``overhead per trial = (phase - fine-tuning) / trials``
on one worker. Run: ``python benchmarks/cluster_throughput.py [--trials N]``;
it prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

BUDGET, LOW_EPOCHS, FULL_EPOCHS = "4MB", 40.0, 0.5


def _config(trials: int):
    from autocompress.search.core import SearchConfig

    return SearchConfig(target="mobile", budget=BUDGET, trials=trials, low_epochs=LOW_EPOCHS,
                        full_epochs=FULL_EPOCHS, finalists=1)


def one_optuna(model: str, data: str, out: str, trials: int, storage: str | None, study: str | None) -> dict:
    """Run in a child process: the Optuna backend with ``OptunaDriver.run`` timed."""
    from autocompress.search import optuna_driver
    from autocompress.search.run import run_search

    timing = {}
    run = optuna_driver.OptunaDriver.run

    def timed(self):
        t = time.perf_counter()
        try:
            return run(self)
        finally:
            timing["phase_s"] = time.perf_counter() - t
            mine = [tr for tr in self.study.get_trials(deepcopy=False) if tr.user_attrs.get("owner") == self.worker]
            timing["finetune_s"] = sum(tr.user_attrs.get("seconds", 0.0) for tr in mine)
            timing["mine"] = sum(tr.state.name in ("COMPLETE", "FAIL") for tr in mine)

    optuna_driver.OptunaDriver.run = timed
    result = run_search(_config(trials), model=model, data=data, out=out, storage=storage, study_name=study,
                        measure=False)
    return {**timing, "trials": result["trials"]}


def one_ray(model: str, data: str, out: str, trials: int, concurrent: int) -> dict:
    """Run in a child process: the Ray backend with ``Tuner.fit`` and ``ray.init`` timed."""
    import ray
    from ray import tune

    from autocompress.search import ray_backend

    timing = {}
    fit, init = tune.Tuner.fit, ray.init

    def timed_fit(self):
        t = time.perf_counter()
        grid = fit(self)
        timing["phase_s"] = time.perf_counter() - t
        timing["finetune_s"] = sum((r.metrics or {}).get("time_total_s", 0.0) for r in grid)
        return grid

    def timed_init(*a, **k):
        t = time.perf_counter()
        try:
            return init(*a, **k)
        finally:
            timing["ray_init_s"] = time.perf_counter() - t

    tune.Tuner.fit, ray_backend.ray.init = timed_fit, timed_init
    result = ray_backend.run_ray_search(_config(trials), model=model, data=data, out=out, max_concurrent=concurrent,
                                        cpus_per_trial=1, measure=False, chunks=1)
    return {**timing, "trials": result["trials"], "nodes": len(result["ray"]["nodes"])}


def child(kind: str, *args: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import cluster_throughput as b; "
            f"print('RESULT' + json.dumps(b.{kind}(*json.loads(sys.argv[1]))))")
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(list(args))], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return proc  # type: ignore[return-value]


def collect(proc) -> dict:
    out, err = proc.communicate(timeout=1800)
    lines = [l for l in out.splitlines() if l.startswith("RESULT")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark child failed: {err[-2000:]}")
    return json.loads(lines[-1][len("RESULT"):])


def main() -> None:
    from cluster_utils import Postgres, write_factories

    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=12)
    args = ap.parse_args()
    n = args.trials
    work = Path(tempfile.mkdtemp(prefix="ac-bench-"))
    os.environ.setdefault("AUTOCOMPRESS_CACHE", str(work / "cache"))
    model, data = write_factories(work)
    rows = []

    def row(name: str, workers: int, wall: float, phase: float, finetune: float, trials: int, extra: str = "") -> None:
        rows.append((name, workers, trials, wall, phase, 3600 * trials / phase, (phase * workers - finetune) / trials,
                     extra))

    t = time.perf_counter()
    r = collect(child("one_optuna", model, data, str(work / "o1"), n, None, None))
    row("optuna-1", 1, time.perf_counter() - t, r["phase_s"], r["finetune_s"], r["trials"]["complete"] + r["trials"]["failed"])

    pg = Postgres().start()
    try:
        t = time.perf_counter()
        procs = [child("one_optuna", model, data, str(work / f"o2-{i}"), n, pg.url, "bench") for i in range(2)]
        rs = [collect(p) for p in procs]
        wall = time.perf_counter() - t
        phase = max(x["phase_s"] for x in rs)
        row("optuna-2-postgres", 2, wall, phase, sum(x["finetune_s"] for x in rs),
            rs[0]["trials"]["complete"] + rs[0]["trials"]["failed"], f"split {rs[0]['mine']}/{rs[1]['mine']}")
    finally:
        pg.stop()

    for c in (1, 2):
        t = time.perf_counter()
        r = collect(child("one_ray", model, data, str(work / f"r{c}"), n, c))
        row(f"ray-{c}", c, time.perf_counter() - t, r["phase_s"], r["finetune_s"], sum(r["trials"].values()),
            f"ray.init {r['ray_init_s']:.1f} s")

    print(f"{n} trials, --low-epochs {LOW_EPOCHS}, budget {BUDGET}, {os.cpu_count()} CPUs\n")
    print("| configuration | workers | trials | command wall (s) | search phase (s) | trials/hour (phase) "
          "| overhead per trial (s) | notes |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, w, trials, wall, phase, tph, over, extra in rows:
        print(f"| {name} | {w} | {trials} | {wall:.1f} | {phase:.1f} | {tph:.0f} | {over:.2f} | {extra} |")


if __name__ == "__main__":
    main()
