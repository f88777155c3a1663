"""The Optuna driver: ask/tell over the space on one machine, or on one RDB study shared by several workers.

1. Every asked candidate is costed analytically first (milliseconds); one
   that breaks the budget is repaired (pruned further) and re-enqueued, or
   recorded as pruned: no training is spent on infeasible candidates.
2. Feasible candidates are fine-tuned briefly (``low_epochs``) with
   distillation and scored on a selection split (low fidelity).
3. The finalists rung of :mod:`autocompress.search.core` runs over the
   completed trials.

The study lives in Optuna storage (by default a journal file in the output
folder), so an interrupted search resumes with the same command; finalists'
scores are stored on the study too (``full:<trial number>``).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from autocompress.errors import TrialFailed, UserInputError
from autocompress.search import _optuna_storage, workers
from autocompress.search.core import (OBJECTIVES, Candidate, SearchConfig, SearchResult, TrialEvent, metric_label,
                                      study_name_for)
from autocompress.search.finalists import finalise
from autocompress.search.screen import Screen
from autocompress.search.space_params import ParamSpace
from autocompress.search.tradeoff import TradeoffSpace, make_params
from autocompress.space.policy import Policy

SENSITIVITY_ATTR = "sensitivity"


def make_storage(storage: str | None, out: Path) -> Any:
    if storage:
        if storage.startswith(("sqlite:", "postgresql", "mysql")):
            return workers.rdb_storage(storage)
        if storage.endswith(".journal") or storage.endswith(".log"):
            return _journal(Path(storage))
        raise UserInputError(f"bad --storage {storage!r}: give sqlite:///FILE, postgresql://..., or FILE.journal")
    out.mkdir(parents=True, exist_ok=True)
    return _journal(out / "study.journal", owned=True)


def _journal(path: Path, owned: bool = False) -> Any:
    """A journal file study. ``owned``: the journal in ``--out``, whose folder lock this process holds, so a
    journal lock link found there was left by a process killed mid-write: removed at once, where Optuna
    would wait out its 30 s grace period with a warning every 10 s."""
    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

    lock = Path(str(path) + ".lock")  # the link JournalFileSymlinkLock makes beside the journal
    if owned and lock.is_symlink():
        lock.unlink(missing_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileSymlinkLock(str(path))))


def make_sampler(config: SearchConfig) -> optuna.samplers.BaseSampler:
    """Samplers read the budget margins that ``Trial.set_constraint`` stores on each trial."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if config.sampler == "nsga2":
            pop = max(6, min(50, config.trials // 3))
            return optuna.samplers.NSGAIISampler(population_size=pop, seed=config.seed)
        if config.sampler == "random":
            return optuna.samplers.RandomSampler(seed=config.seed)
        return optuna.samplers.TPESampler(seed=config.seed, multivariate=True,
                                          n_startup_trials=max(4, config.trials // 4))


def distributions(params: ParamSpace) -> dict[str, CategoricalDistribution]:
    return {k: CategoricalDistribution(v) for k, v in params.params().items()}


def counts(study: optuna.Study) -> dict[str, int]:
    trials = workers.fresh_trials(study)
    out = {"complete": sum(t.state == TrialState.COMPLETE for t in trials),
           "failed": sum(t.state == TrialState.FAIL for t in trials),
           "pruned": sum(t.state == TrialState.PRUNED for t in trials)}
    stopped = sum(t.state == TrialState.PRUNED and "stopped_at_chunk" in t.user_attrs for t in trials)
    if stopped:
        out["early_stopped"] = stopped  # fine-tuned in part, then stopped by successive halving
    duplicates = sum(t.state == TrialState.PRUNED and "duplicate_of" in t.user_attrs for t in trials)
    if duplicates:
        out["duplicates"] = duplicates  # pruned without a fine-tune: their policy was evaluated already
    return out


def candidates(study: optuna.Study, params: ParamSpace) -> list[Candidate]:
    """The study's completed trials as records, in trial order (the first objective value is the accuracy)."""
    return [Candidate(t.number, tuple(sorted(t.params.items())), params.to_policy(t.params), t.values[0],
                      t.user_attrs.get("latency_ms", 0.0), t.user_attrs.get("origin", "sampler"))
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]


def conclude(study: optuna.Study, params: ParamSpace, screen: Screen, evaluator: Any, config: SearchConfig, *,
             callback: Callable[[TrialEvent], None] = lambda e: None) -> SearchResult:
    """The finalists rung over the study's completed trials; each finalist's full-fidelity score goes on the study."""
    return finalise(candidates(study, params), evaluator, screen, config, study_name=study.study_name,
                    counts=lambda: counts(study), callback=callback,
                    on_final=lambda f: study.set_user_attr(f"full:{f.number}", f.accuracy_full),
                    tighten=tightener(params, screen))


def tightener(params: Any, screen: Screen) -> Callable[[Candidate, float], Policy | None]:
    """How a measured repair tightens a candidate: the allocation again under the smaller latency limit
    (trade-off space), or the greedy repair of its policy against it (per-decision space)."""
    if isinstance(params, TradeoffSpace):  # the greedy repair where no allocation meets the limit
        return lambda c, scale: params.tightened(dict(c.params), scale) or screen.repair(c.policy, latency_scale=scale)
    return lambda c, scale: screen.repair(c.policy, latency_scale=scale)


class OptunaDriver:
    """One search over a workspace; ``run`` drives Optuna through ask/tell and returns the result."""

    def __init__(self, ws: Any, evaluator: Any, config: SearchConfig, *, storage: Any, study_name: str | None = None,
                 warm_start: Policy | None = None, callback: Callable[[TrialEvent], None] | None = None,
                 worker: str | None = None) -> None:
        self.ws, self.evaluator, self.config, self.callback = ws, evaluator, config, callback or (lambda e: None)
        self.space = ws.space
        self.screen = Screen(self.space, config.target, config.budget)
        directions = [OBJECTIVES[o] for o in config.objectives]
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        pruner = (optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3) if config.chunks > 1
                  else optuna.pruners.NopPruner())
        self.study = optuna.create_study(storage=storage, study_name=study_name or study_name_for(self.space.fingerprint, config),
                                         directions=directions, sampler=make_sampler(config), pruner=pruner,
                                         load_if_exists=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.study.set_metric_names(list(config.objectives))
        self.warm_start = warm_start
        self.rerun: list[int] = []  # interrupted trials re-enqueued on resume
        # The sensitivity table lives on the study: a resumed search or another worker reads it back.
        self.params = make_params(config.space, self.screen, evaluator.teacher, evaluator.calibration, tie=config.tie,
                                  warm=warm_start, stored=self.study.user_attrs.get(SENSITIVITY_ATTR),
                                  store=lambda data: self.study.set_user_attr(SENSITIVITY_ATTR, data))
        self.distributions = distributions(self.params)
        # Who owns a RUNNING trial: a restarted worker (same host, same output folder) knows its dead
        # predecessor's trials by this name and fails them at once instead of waiting for heartbeats.
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}"

    # -- several workers on one RDB study (see workers.py) ------------------------------------------
    def _shared(self) -> bool:
        return workers.rdb_backend(self.study) is not None

    def _claim(self, trial: optuna.Trial) -> bool:
        """Take one of the ``trials`` slots for this candidate; False when other workers took the last ones."""
        if not self._shared():
            return True
        with workers.study_lock(self.study):
            if workers.taken(workers.fresh_trials(self.study)) >= self.config.trials:
                return False
            trial.set_user_attr("claimed", True)
            return True

    # -- the loop -----------------------------------------------------------------------------
    def _evaluated(self) -> int:
        c = counts(self.study)
        return c["complete"] + c["failed"] + c.get("early_stopped", 0)

    def _recover_stale(self) -> None:
        """Trials left RUNNING by a killed process are pruned (not counted) and their candidates run again.

        A journal file belongs to one process, so every RUNNING trial in it is stale. An RDB study may
        be shared by live workers: there only trials whose heartbeats stopped, or that never claimed a
        slot and are older than the grace period, are stale; one worker at a time recovers them."""
        rdb = self._shared()
        with workers.study_lock(self.study) if rdb else contextlib.nullcontext():
            running = (_optuna_storage.stale_running(self.study) if rdb
                       else self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
            if rdb:
                # A worker killed between asking for a trial and claiming a slot left no heartbeat to go
                # stale: such a trial is stale once it is older than the heartbeat grace period.
                live = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                known = {t.number for t in running}
                running += [t for t in workers.unclaimed_stale(live, self.worker, workers.grace_seconds(self.study))
                            if t.number not in known]
                running += [t for t in live if t.user_attrs.get("owner") == self.worker and t.number not in known]
            for t in running:
                self._recover(t, rdb)

    def _recover(self, t: optuna.trial.FrozenTrial, rdb: bool) -> None:
        """Finish one interrupted trial: pruned with the reason; a drawn candidate is enqueued again."""
        reason = workers.interruption(t.user_attrs, rdb)
        again = reason == workers.RUN_AGAIN
        try:
            _optuna_storage.set_trial_user_attr(self.study, t, "reason", reason)
            self.study.tell(t.number, state=TrialState.PRUNED)
        except Exception:  # another worker finished it first
            return
        if again:
            self.study.enqueue_trial(dict(t.params), user_attrs={"origin": f"re-run of {t.number}"})
            self.rerun.append(t.number)
            self.callback(TrialEvent(t.number, "rerun", self._evaluated(), self.config.trials, self.best_accuracy(),
                                     "resume", f"trial {t.number} was interrupted; its candidate runs again"))

    def _enqueue_starts(self) -> None:
        with workers.study_lock(self.study):  # two workers starting together enqueue the seeds once
            if workers.fresh_trials(self.study):
                return
            for params, origin in self.params.start_points(self.screen, self.warm_start, seeds=self.config.seeds):
                self.study.enqueue_trial(params, user_attrs={"origin": origin})

    def _known(self, params: dict) -> bool:
        """Whether a trial with these parameters is already evaluated, running or queued."""
        return any(t.params == params for t in self.study.get_trials(deepcopy=False)
                   if t.state != TrialState.PRUNED and t.params)

    def best_accuracy(self) -> float | None:
        accs = [t.values[0] for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        return max(accs) if accs else None

    def run(self) -> SearchResult:
        self._recover_stale()
        self._enqueue_starts()
        total = self.config.trials
        asks = 0
        self.duplicates = 0
        # A sampler that keeps proposing evaluated policies has exhausted what the space offers.
        while self._evaluated() < total and asks < 50 * total and self.duplicates < 3 * total:
            if self._shared() and self._evaluated() + workers.in_flight(workers.fresh_trials(self.study), self.worker) >= total:
                time.sleep(1.0)  # other workers are fine-tuning the last slots; wait for their results
                self._recover_stale()
                continue
            asks += 1
            with warnings.catch_warnings():  # heartbeats are sent by workers.heartbeat below, not by ``optimize``
                warnings.filterwarnings("ignore", message="Heartbeat of storage")
                trial = self.study.ask(self.distributions)
            trial.set_user_attr("owner", self.worker)
            policy = self.params.to_policy(trial.params)
            costs = self.screen.costs(policy)
            if self._tell_duplicate(trial, policy, costs):
                continue
            if self.screen.violations(costs):
                self._screen_out(trial, policy, costs)
                continue
            if not self._claim(trial):
                trial.set_user_attr("reason", f"not fine-tuned: other workers took the last of the {total} trials")
                self.study.tell(trial, state=TrialState.PRUNED)
                continue
            with workers.heartbeat(self.study, trial):
                self._evaluate(trial, policy, costs)
        self._recover_stale()
        return conclude(self.study, self.params, self.screen, self.evaluator, self.config, callback=self.callback)

    def _tell_duplicate(self, trial: optuna.Trial, policy: Policy, costs: dict[str, Any]) -> bool:
        """Parameters that give a policy already evaluated or being evaluated (allocations at different
        weights often agree) are pruned without a fine-tune and do not count against the total; pruned,
        they steer the sampler away from what it has seen."""
        same = next((t for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING,
                                                                                  TrialState.FAIL))
                     if t.number != trial.number and t.user_attrs.get("policy") == dict(policy.decisions)), None)
        if same is None:
            return False
        trial.set_user_attr("duplicate_of", same.number)
        trial.set_user_attr("reason", f"same policy as trial {same.number}")
        for k, v in costs.items():
            trial.set_user_attr(k, v)
        trial.set_user_attr("policy", dict(policy.decisions))
        self.study.tell(trial, state=TrialState.PRUNED)
        self.duplicates += 1
        return True

    def _screen_out(self, trial: optuna.Trial, policy: Policy, costs: dict[str, Any]) -> None:
        """Record an over-budget candidate as pruned; enqueue its repair unless that is already known."""
        fixed = self.screen.repair(policy)
        trial.set_user_attr("reason", "over budget" + (": repaired into a later trial" if fixed else ""))
        for k, v in costs.items():
            trial.set_user_attr(k, v)
        self.study.tell(trial, state=TrialState.PRUNED)
        if fixed is not None and not self._known(self.params.to_params(fixed)):
            self.study.enqueue_trial(self.params.to_params(fixed), user_attrs={"origin": f"repair of {trial.number}"})
        self.callback(TrialEvent(trial.number, "pruned", self._evaluated(), self.config.trials, self.best_accuracy(),
                                 "screen"))

    def _evaluate(self, trial: optuna.Trial, policy: Policy, costs: dict[str, Any]) -> None:
        trial.set_user_attr("policy", dict(policy.decisions))  # failed trials name their policy too
        for k, v in costs.items():
            trial.set_user_attr(k, v)
        for key, margin in self.screen.margins(costs).items():
            trial.set_constraint(key, margin)
        started = time.time()
        try:
            scored = self._fine_tune(trial, policy) if self.config.chunks > 1 else \
                self.evaluator(policy, self.config.low_epochs)
            if scored is None:
                return
        except TrialFailed as exc:
            self._fail(trial, str(exc))
            return
        except Exception as exc:  # a candidate that cannot be built or trained fails alone
            self._fail(trial, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            return
        trial.set_user_attr("seconds", round(time.time() - started, 2))
        trial.set_user_attr("fidelity_epochs", self.config.low_epochs)
        if scored.notes:
            trial.set_user_attr("notes", scored.notes[:20])
        values = [scored.accuracy if o == "accuracy" else costs[o] for o in self.config.objectives]
        if not all(math.isfinite(v) for v in values):
            self._fail(trial, "non-finite objective")
            return
        self.study.tell(trial, values)
        self.callback(TrialEvent(trial.number, "complete", self._evaluated(), self.config.trials, self.best_accuracy(),
                                 "search", f"{metric_label(self.evaluator)} {scored.accuracy:.4f}, "
                                                   f"{costs['latency_ms']:.2f} ms"))

    def _fine_tune(self, trial: optuna.Trial, policy: Policy) -> Any:
        """The low-fidelity fine-tune in ``chunks`` slices, reporting the selection score after each;
        returns the scored candidate, or None when successive halving stopped it (told as pruned)."""
        from autocompress.search.evaluate import Scored

        model, ctx = self.evaluator.build(policy)
        chunks = self.config.chunks
        score = float("nan")
        for i in range(chunks):
            self.evaluator.finetune_chunk(model, ctx, self.config.low_epochs / chunks, self.evaluator.seed + i)
            score = self.evaluator.score(model)
            trial.report(score, i + 1)
            if i + 1 < chunks and trial.should_prune():
                trial.set_user_attr("stopped_at_chunk", i + 1)
                trial.set_user_attr("reason", f"stopped after {i + 1} of {chunks} chunks: {score:.4f} is behind "
                                              "the other candidates at that point (successive halving)")
                self.study.tell(trial, state=TrialState.PRUNED)
                self.callback(TrialEvent(trial.number, "stopped", self._evaluated(), self.config.trials,
                                         self.best_accuracy(), "search", f"stopped after chunk {i + 1}"))
                return None
        return Scored(model.eval(), score, sorted(ctx.boosted), list(ctx.notes))

    def _fail(self, trial: optuna.Trial, reason: str) -> None:
        trial.set_user_attr("fail_reason", reason[:300])
        self.study.tell(trial, state=TrialState.FAIL)
        self.callback(TrialEvent(trial.number, "failed", self._evaluated(), self.config.trials, self.best_accuracy(),
                                 "search", reason[:120]))
