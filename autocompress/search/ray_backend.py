"""The search on a Ray cluster: Ray Tune schedules, Optuna samples, ASHA stops weak candidates.

The same space, objectives, budget and finalists rung as the Optuna driver
(:mod:`autocompress.search.optuna_driver`), over :mod:`autocompress.search.core`:

- ``OptunaSearch`` (multi-objective, the same sampler) proposes parameters;
- each trial screens its candidate analytically first: over budget, it reports
  ``status="infeasible"`` with accuracy 0 and stops (recorded as pruned);
- a feasible candidate is fine-tuned in ``chunks`` slices of ``low_epochs``,
  reporting selection accuracy after each, so ``ASHAScheduler`` halts weak ones;
- a candidate that raises or diverges reports ``status="failed"`` with its
  reason and the sweep goes on; a worker or node that dies has its trial
  retried (``FailureConfig(max_failures=...)``).

Workers receive only specs (model, data, weights path, config, parameters)
and rebuild the workspace once per worker process. The driver rebuilds it
too, turns Tune's results into an in-memory Optuna study (for trials.csv and
the Pareto plot), fine-tunes the finalists and writes the same output folder
as the Optuna driver.

This module imports ray at the top: only the CLI's ``--backend ray`` path imports it.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import optuna
import ray
import torch
from optuna.trial import TrialState
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from autocompress.errors import TrialFailed, UserInputError
from autocompress.search import _ray_session
from autocompress.search.core import (OBJECTIVES, SearchConfig, check_target_and_budget, model_and_data,
                                      study_name_for)
from autocompress.search.optuna_driver import conclude, distributions, make_sampler
from autocompress.search.screen import Screen
from autocompress.search import setup
from autocompress.search.setup import task_label
from autocompress.search.tradeoff import make_params
from autocompress.space.policy import Policy

MAX_FAILURES = 3  # retries of a trial whose worker or node died


@dataclass(frozen=True)
class JobSpec:
    """Everything a worker needs to rebuild the workspace: specs and paths, never models."""

    model: str
    data: str | None
    config: SearchConfig
    weights: str | None = None
    input_shape: tuple[int, ...] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    chunks: int = 3
    teacher_digest: str = ""
    threads: int = 1
    warm: dict[str, Any] = field(default_factory=dict)  # the warm-start policy's JSON
    sensitivity: dict[str, Any] = field(default_factory=dict)  # measured once on the driver, read on the workers
    task: str | None = None  # a task's file.py:factory, re-imported on every node


@dataclass
class _Context:
    screen: Screen
    params: Any  # ParamSpace or TradeoffSpace
    distributions: dict[str, Any]
    evaluator: Any
    digest: str
    sensitivity: dict[str, Any]


_CONTEXTS: dict[str, _Context] = {}  # one workspace per worker process and job


def _digest(model: torch.nn.Module) -> str:
    h = hashlib.sha1()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def build_context(job: JobSpec) -> _Context:
    """The workspace, evaluator and screening of one job, seeded so every node builds the same teacher."""
    key = repr((job.model, job.data, job.task, job.weights, job.input_shape, sorted(job.options.items()), job.config,
                sorted(job.warm.get("decisions", {}).items())))
    if key in _CONTEXTS:
        return _CONTEXTS[key]
    torch.manual_seed(job.config.seed)  # a model file without --weights starts from the same random init everywhere
    prepared = setup.prepare(job.model, data=job.data, task=job.task, weights=job.weights, input_shape=job.input_shape,
                       options=job.options or None, seed=job.config.seed, kinds=job.config.kinds)
    ws, evaluator = prepared.ws, prepared.evaluator
    screen = Screen(ws.space, job.config.target, job.config.budget)
    measured: dict[str, Any] = dict(job.sensitivity)
    params = make_params(job.config.space, screen, evaluator.teacher, evaluator.calibration, tie=job.config.tie,
                         warm=Policy.from_json(job.warm) if job.warm else None, stored=job.sensitivity or None,
                         store=measured.update)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _CONTEXTS[key] = ctx = _Context(screen, params, distributions(params), evaluator, _digest(evaluator.teacher),
                                    measured)
    return ctx


# -- the trainable (runs on workers) -------------------------------------------------------------
def evaluate_trial(params: dict[str, Any], job: JobSpec) -> None:
    """One Tune trial: screen, then fine-tune in chunks, reporting after each; never raises for a bad candidate."""
    torch.set_num_threads(max(1, job.threads))
    node = ray.get_runtime_context().get_node_id()
    ctx = build_context(job)
    policy = ctx.params.to_policy({k: v for k, v in params.items() if k in ctx.distributions})
    costs = ctx.screen.costs(policy)
    base = {"latency_ms": costs["latency_ms"], "energy_mj": costs["energy_mj"], "size_bytes": costs["size_bytes"],
            "macs": costs.get("macs", 0), "params": costs.get("params", 0), "node": node, "pid": os.getpid()}
    if ctx.screen.violations(costs):
        tune.report({**base, "accuracy": 0.0, "status": "infeasible", "reason": "over budget"})
        return
    if job.teacher_digest and ctx.digest != job.teacher_digest:
        tune.report({**base, "accuracy": 0.0, "status": "failed",
                     "fail_reason": f"the model on node {node} differs from the driver's (weights digest "
                                    f"{ctx.digest} != {job.teacher_digest}); give every node the same --weights"})
        return
    try:
        for chunk, acc in _finetune_in_chunks(ctx.evaluator, policy, job):
            if not math.isfinite(acc):
                raise TrialFailed(f"non-finite accuracy after chunk {chunk}")
            tune.report({**base, "accuracy": acc, "status": "ok", "chunk": chunk})
    except Exception as exc:  # a candidate that cannot be built or trained fails alone
        reason = str(exc) if isinstance(exc, TrialFailed) else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        tune.report({**base, "accuracy": 0.0, "status": "failed", "fail_reason": reason[:300]})


def _finetune_in_chunks(evaluator: Any, policy: Policy, job: JobSpec):
    model, cctx = evaluator.build(policy)
    per_chunk = job.config.low_epochs / job.chunks
    for i in range(job.chunks):
        evaluator.finetune_chunk(model, cctx, per_chunk, evaluator.seed + i)
        yield i + 1, evaluator.score(model)


def _absolute(spec: str | None) -> str | None:
    """A ``file.py:factory`` or ``imagefolder:PATH`` spec with an absolute path; other specs as given."""
    if spec and spec.startswith("imagefolder:"):
        return f"imagefolder:{Path(spec.partition(':')[2]).resolve()}"
    if not spec or ".py:" not in spec:
        return spec
    path, _, name = spec.rpartition(":")
    return f"{Path(path).resolve()}:{name}"


def trial_dirname(trial: Any) -> str:
    """``trial_00003_<id>``: folders sort in the order the searcher proposed the trials."""
    return f"trial_{int(trial.experiment_tag.split('_')[0]):05d}_{trial.trial_id}"


def _order(result: Any) -> tuple[int, str]:
    name = Path(result.path).name if result.path else ""
    parts = name.split("_")
    return (int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else 1 << 30, name)


class ScreeningOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that tells Optuna screened candidates as pruned and broken ones as failed.

    Without this a screened or failed candidate's placeholder accuracy of 0 would be
    told as a real objective value and mislead the sampler.
    """

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        status = (result or {}).get("status")
        if status in ("infeasible", "failed"):
            return super().on_trial_complete(trial_id, None, error=status == "failed")
        return super().on_trial_complete(trial_id, result, error)


# -- the driver ----------------------------------------------------------------------------------
def _tuner(job: JobSpec, ctx: _Context, points: list[dict[str, Any]], *, name: str, storage: str, early_stop: bool,
           cpus: float, gpus: float, max_concurrent: int) -> tune.Tuner:
    resources = {"cpu": cpus, "gpu": gpus}
    trainable = tune.with_resources(tune.with_parameters(evaluate_trial, job=job), resources)
    experiment = f"{storage.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(experiment):
        return tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True)
    objectives = list(job.config.objectives)
    searcher = ScreeningOptunaSearch(space=dict(ctx.distributions), metric=objectives,
                                     mode=["max" if OBJECTIVES[o] == "maximize" else "min" for o in objectives],
                                     points_to_evaluate=points or None, sampler=make_sampler(job.config))
    scheduler = (ASHAScheduler(metric="accuracy", mode="max", time_attr="training_iteration", max_t=job.chunks,
                               grace_period=1, reduction_factor=2) if early_stop else FIFOScheduler())
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, max_concurrent=max_concurrent),
                                    scheduler=scheduler, num_samples=job.config.trials,
                                    max_concurrent_trials=max_concurrent, reuse_actors=True,
                                    trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=MAX_FAILURES)),
    )


def _to_study(study: optuna.Study, ctx: _Context, config: SearchConfig, grid: Any, chunks: int) -> dict[str, Any]:
    """Copy Tune's trials into ``study``; return the Ray-specific summary."""
    summary = {"screened": 0, "stopped_early": 0, "errored": 0, "nodes": {}}
    results = sorted(grid, key=_order)
    for r in results:
        m = dict(r.metrics or {})
        params = {k: v for k, v in (r.config or {}).items() if k in ctx.distributions}
        dists = {k: ctx.distributions[k] for k in params}
        attrs = {k: m[k] for k in ("latency_ms", "energy_mj", "size_bytes", "macs", "params", "node") if k in m}
        attrs["policy"] = dict(ctx.params.to_policy(params).decisions)
        attrs["ray_trial"] = Path(r.path).name if r.path else ""
        if "node" in m:
            summary["nodes"][m["node"]] = summary["nodes"].get(m["node"], 0) + 1
        status = m.get("status")
        values, state = None, TrialState.FAIL
        if r.error is not None and not (status == "ok" and m.get("chunk", 0) >= chunks):
            summary["errored"] += 1
            attrs["fail_reason"] = f"{type(r.error).__name__}: {str(r.error).strip().splitlines()[-1][:200]}"
        elif status == "failed":
            attrs["fail_reason"] = m.get("fail_reason", "failed")
        elif status == "infeasible":
            state, attrs["reason"] = TrialState.PRUNED, "over budget"
            summary["screened"] += 1
        elif status == "ok" and m.get("chunk", 0) < chunks:
            state = TrialState.PRUNED
            attrs["reason"] = f"stopped by ASHA after {m['chunk']} of {chunks} chunks (accuracy {m['accuracy']:.4f})"
            summary["stopped_early"] += 1
        elif status == "ok":
            state = TrialState.COMPLETE
            values = [m["accuracy"] if o == "accuracy" else m[o] for o in config.objectives]
            attrs["fidelity_epochs"] = config.low_epochs
        else:
            attrs["fail_reason"] = "no result reported"
        trial = optuna.trial.create_trial(state=state, values=values, params=params, distributions=dists,
                                          user_attrs=attrs)
        study.add_trial(trial)
    return summary


def run_ray_search(config: SearchConfig, *, model: str | None = None, data: str | None = None,
                   weights: str | os.PathLike | None = None, out: str | os.PathLike = "autocompress-out",
                   address: str | None = None, warm_start: str | os.PathLike | None = None,
                   input_shape: tuple[int, ...] | None = None, cpus_per_trial: float = 1.0,
                   gpus_per_trial: float = 0.0, max_concurrent: int = 2, storage_path: str | os.PathLike | None = None,
                   resume: bool = False, measure: bool = True, chunks: int = 3,
                   early_stop: bool = True, task: str | None = None, force: bool = False,
                   on_phase: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the search through Ray Tune and write ``out`` like :func:`autocompress.search.run.run_search`:
    ``out`` is locked for the sweep and remembers what it holds (``force`` starts over there); ``on_phase``
    hears the first-use calibration's stages (default: stderr)."""
    from autocompress.export.artifacts import check_out
    from autocompress.search.outdir import FolderLock, claim, entries, folder_claim, undo
    from autocompress.search.report import write_search_outputs

    if not measure:  # --no-measure: nothing is timed, the finalists neither
        config = replace(config, measure_finalists=False)
    # An uncalibrated ``local`` is calibrated here (about a minute): say so, a line per stage.
    setup.check_task_args(model, data, task, input_shape)
    check_target_and_budget(config, on_phase or (lambda text: print(text, file=sys.stderr, flush=True)))
    if cpus_per_trial <= 0 or gpus_per_trial < 0 or max_concurrent < 1 or chunks < 1:
        raise UserInputError(f"bad Ray resources: --cpus-per-trial {cpus_per_trial} (> 0), --gpus-per-trial "
                             f"{gpus_per_trial} (>= 0), --max-concurrent {max_concurrent} (>= 1)")
    if task is None:
        model, data = model_and_data(model, data)
    elif not isinstance(task, str):
        raise UserInputError("the ray backend re-imports the task on every node: give it as path/file.py:factory")
    shown, shown_data, shown_task = model, data, task
    model, task, data = _absolute(model), _absolute(task), _absolute(data)  # workers start in another folder
    warm = Policy.load(warm_start) if warm_start else None
    check_out(out)
    out = Path(out).resolve()
    before, started = entries(out), False
    try:
        with FolderLock(out):
            aside = claim(out, folder_claim(config, shown, shown_data, shown_task), force=force)
            if aside is not None:
                print(f"--force: the folder's previous results are in {aside}", file=sys.stderr)
            job = JobSpec(model=model, data=data, task=task, config=config,
                          weights=str(Path(weights).resolve()) if weights else None,
                          input_shape=tuple(input_shape) if input_shape else None,
                          options=setup.space_options(config, warm.options if warm else None), chunks=chunks,
                          threads=max(1, int(cpus_per_trial)), warm=warm.to_json() if warm else {})
            ctx = build_context(job)  # on the driver: the baseline, the finalists and the report
            if warm is not None:
                warm.validate(ctx.screen.space)
            job = JobSpec(**{**job.__dict__, "teacher_digest": ctx.digest, "sensitivity": ctx.sensitivity})
            name = study_name_for(ctx.screen.space.fingerprint, config)
            storage = str(storage_path or out / "ray-tune")
            if "://" not in storage:  # s3://, gs://... go to Ray's storage layer as given
                storage = str(Path(storage).resolve())
                Path(storage).mkdir(parents=True, exist_ok=True)
            experiment = f"{storage.rstrip('/')}/{name}"
            # Save the experiment state every second, so a killed driver loses at most that on restore.
            os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
            # With verbose=0 Tune prints no tables; the CLI reports.
            os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
            if resume and not tune.Tuner.can_restore(experiment):
                raise UserInputError(f"--resume: no interrupted sweep under {experiment}; run without --resume "
                                     "to start one")
            started = True
            with _ray_session.session(address, cpus_per_trial):
                # Ray counts a screened trial against --trials: the starting points are repaired into the budget.
                starts = ctx.params.start_points(ctx.screen, warm, seeds=config.seeds, repaired=True)
                points = [params for params, _ in starts][: config.trials]
                tuner = _tuner(job, ctx, points, name=name, storage=storage, early_stop=early_stop,
                               cpus=cpus_per_trial, gpus=gpus_per_trial, max_concurrent=max_concurrent)
                grid = tuner.fit()
            # The driver's study is a fresh in-memory copy of Tune's trials; Tune's folder is the durable record.
            study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), study_name=name,
                                        directions=[OBJECTIVES[o] for o in config.objectives])
            summary = _to_study(study, ctx, config, grid, chunks)
            if ctx.sensitivity:
                study.set_user_attr("sensitivity", ctx.sensitivity)
            base_acc = ctx.evaluator.baseline()
            result = conclude(study, ctx.params, ctx.screen, ctx.evaluator, config)
            ray_summary = {**summary, "experiment": experiment, "address": address or "local", "chunks": chunks,
                           "max_concurrent": max_concurrent, "cpus_per_trial": cpus_per_trial,
                           "gpus_per_trial": gpus_per_trial}
            data = shown_data if shown_task is None else task_label(shown_task)
            return write_search_outputs(result, ctx.evaluator, base_acc, out, study=study, model=shown, data=data,
                                        measure=measure, extra={"ray": ray_summary})
    except BaseException:
        if not started:  # refused before any trial: leave nothing behind
            undo(out, before)
        raise
