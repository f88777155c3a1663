"""The search: Optuna ask/tell over the space, analytic screening, two fidelities.

1. Every asked candidate is costed analytically first (milliseconds); one
   that breaks the budget is repaired (pruned further) and re-enqueued, or
   recorded as pruned: no training is spent on infeasible candidates.
2. Feasible candidates are fine-tuned briefly (``low_epochs``) with
   distillation and scored on a selection split (low fidelity).
3. The best ``finalists`` are fine-tuned again at ``full_epochs`` (successive
   halving with two rungs); the most accurate one is the result.

The study lives in Optuna storage (by default a journal file in the output
folder), so an interrupted search resumes with the same command; finalists'
scores are stored on their trials too.
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from autocompress.errors import InfeasibleBudgetError, TrialFailed, UserInputError
from autocompress.search import workers
from autocompress.search.space_params import ParamSpace, cost_fn, extreme_policies, repair, starting_points
from autocompress.space.policy import Policy

OBJECTIVES = {"accuracy": "maximize", "latency_ms": "minimize", "energy_mj": "minimize", "size_bytes": "minimize"}


@dataclass(frozen=True)
class SearchConfig:
    target: str = "mobile"
    budget: str = "5ms"
    trials: int = 32
    sampler: str = "tpe"
    seed: int = 0
    low_epochs: float = 0.5
    full_epochs: float = 4.0
    finalists: int = 3
    # Accuracy alone under the budget by default: the product's question. Adding cost objectives
    # makes the study multi-objective (a Pareto front), which pulls candidates below the budget.
    objectives: tuple[str, ...] = ("accuracy",)
    tie: tuple[str, ...] = ()
    seeds: bool = True  # enqueue uniform starting points in a fresh study

    def __post_init__(self) -> None:
        if self.sampler not in ("tpe", "nsga2", "random"):
            raise UserInputError(f"unknown sampler {self.sampler!r}; valid: nsga2, random, tpe")
        bad = [o for o in self.objectives if o not in OBJECTIVES]
        if bad or "accuracy" not in self.objectives:
            raise UserInputError(f"objectives must include accuracy and come from {', '.join(OBJECTIVES)}; got {bad}")
        if self.trials < 1:
            raise UserInputError(f"--trials must be at least 1, got {self.trials}")


@dataclass
class TrialEvent:
    """What a progress display needs after each evaluated or screened candidate."""

    number: int
    state: str
    done: int
    total: int
    best_accuracy: float | None
    phase: str
    message: str = ""


@dataclass
class SearchResult:
    study: optuna.Study
    best_policy: Policy
    best_model: Any
    best: dict[str, Any]
    baseline: dict[str, Any]
    budget: Any
    lowest: dict[str, float]
    counts: dict[str, int] = field(default_factory=dict)


def study_name_for(space_fp: str, config: SearchConfig) -> str:
    key = f"{config.target}|{config.budget}|{config.objectives}|{config.tie}"
    return f"autocompress-{space_fp}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def make_storage(storage: str | None, out: Path) -> Any:
    if storage:
        if storage.startswith(("sqlite:", "postgresql", "mysql")):
            return workers.rdb_storage(storage)
        if storage.endswith(".journal") or storage.endswith(".log"):
            return _journal(Path(storage))
        raise UserInputError(f"bad --storage {storage!r}: give sqlite:///FILE, postgresql://..., or FILE.journal")
    out.mkdir(parents=True, exist_ok=True)
    return _journal(out / "study.journal")


def _journal(path: Path) -> Any:
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def _sampler(config: SearchConfig) -> optuna.samplers.BaseSampler:
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


class Search:
    """One search over a workspace; ``run`` drives Optuna through ask/tell."""

    def __init__(self, ws: Any, evaluator: Any, config: SearchConfig, *, storage: Any, study_name: str | None = None,
                 warm_start: Policy | None = None, callback: Callable[[TrialEvent], None] | None = None,
                 worker: str | None = None) -> None:
        from autocompress.hwmodels import parse_budget

        self.ws, self.evaluator, self.config, self.callback = ws, evaluator, config, callback or (lambda e: None)
        self.space = ws.space
        self.params = ParamSpace(self.space, config.tie)
        self.distributions = {k: CategoricalDistribution(v) for k, v in self.params.params().items()}
        self.costs = cost_fn(self.space, config.target)
        self.baseline_costs = self.costs(Policy.identity(self.space))
        self.budget = parse_budget(config.budget).resolved(self.baseline_costs["latency_ms"])
        self.lowest = self._lowest_reachable()
        self._check_reachable()
        directions = [OBJECTIVES[o] for o in config.objectives]
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.study = optuna.create_study(storage=storage, study_name=study_name or study_name_for(self.space.fingerprint, config),
                                         directions=directions, sampler=_sampler(config), load_if_exists=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.study.set_metric_names(list(config.objectives))
        self.warm_start = warm_start
        # Who owns a RUNNING trial: a restarted worker (same host, same output folder) knows its dead
        # predecessor's trials by this name and fails them at once instead of waiting for heartbeats.
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}"

    # -- several workers on one RDB study (see workers.py) ------------------------------------------
    def _rdb(self) -> Any:
        return workers.rdb_backend(self.study)

    def _fresh_trials(self) -> list[optuna.trial.FrozenTrial]:
        return workers.fresh_trials(self.study)

    def _claim(self, trial: optuna.Trial) -> bool:
        """Take one of the ``trials`` slots for this candidate; False when other workers took the last ones."""
        if self._rdb() is None:
            return True
        with workers.study_lock(self.study):
            if workers.taken(self._fresh_trials()) >= self.config.trials:
                return False
            trial.set_user_attr("claimed", True)
            return True

    # -- budget -------------------------------------------------------------------------------
    def violations(self, c: dict[str, Any]) -> dict[str, float]:
        return self.budget.violations(latency_ms=c["latency_ms"], energy_mj=c["energy_mj"], size_bytes=c["size_bytes"])

    def margins(self, c: dict[str, Any]) -> dict[str, float]:
        """Relative slack per budget limit: <= 0 where the limit is met (Optuna's constraint convention)."""
        limits = {"latency_ms": self.budget.latency_ms, "energy_mj": self.budget.energy_mj,
                  "size_bytes": self.budget.size_bytes}
        return {k: c[k] / v - 1.0 for k, v in limits.items() if v}

    def feasible(self, policy: Policy) -> bool:
        return not self.violations(self.costs(policy))

    def _lowest_reachable(self) -> dict[str, float]:
        costs = [self.costs(p) for p in extreme_policies(self.space)] + [self.baseline_costs]
        return {k: min(c[k] for c in costs) for k in ("latency_ms", "energy_mj", "size_bytes")}

    def _check_reachable(self) -> None:
        low = self.lowest
        bad = self.budget.violations(latency_ms=low["latency_ms"], energy_mj=low["energy_mj"], size_bytes=low["size_bytes"])
        if bad:
            what = {"latency_ms": f"latency {low['latency_ms']:.3g} ms", "energy_mj": f"energy {low['energy_mj']:.3g} mJ",
                    "size_bytes": f"size {low['size_bytes'] / 1e6:.3g} MB"}
            reach = ", ".join(what[k] for k in bad)
            raise InfeasibleBudgetError(
                f"budget {self.config.budget!r} cannot be met on {self.config.target}: the lowest the search space "
                f"reaches is {reach}; relax the budget or choose another target")

    # -- the loop -----------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        trials = self._fresh_trials()
        return {"complete": sum(t.state == TrialState.COMPLETE for t in trials),
                "failed": sum(t.state == TrialState.FAIL for t in trials),
                "pruned": sum(t.state == TrialState.PRUNED for t in trials)}

    def _evaluated(self) -> int:
        c = self.counts()
        return c["complete"] + c["failed"]

    def _recover_stale(self) -> None:
        """Trials left RUNNING by a killed process are marked failed, so the count stays honest.

        A journal file belongs to one process, so every RUNNING trial in it is stale. An RDB study may
        be shared by live workers: there only trials whose heartbeats stopped are failed."""
        rdb = self._rdb() is not None
        if rdb:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(self.study)
        running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        # A worker killed between asking for a trial and claiming a slot left no heartbeat to go stale:
        # such a trial is stale once it is older than the heartbeat grace period.
        dead = ({t.number for t in workers.unclaimed_stale(running, self.worker, workers.grace_seconds(self.study))}
                if rdb else set())
        for t in running:
            if not rdb or t.user_attrs.get("owner") == self.worker or t.number in dead:
                try:
                    if rdb and not t.user_attrs.get("claimed"):
                        # Killed before it took one of the ``trials`` slots: it was never fine-tuned, so
                        # it is not counted (as FAIL it would push the study past its total).
                        self.study._storage.set_trial_user_attr(t._trial_id, "reason", "interrupted before fine-tuning")
                        self.study.tell(t.number, state=TrialState.PRUNED)
                    else:
                        self.study._storage.set_trial_user_attr(t._trial_id, "fail_reason", "interrupted")
                        self.study.tell(t.number, state=TrialState.FAIL)
                except Exception:
                    pass

    def _enqueue_starts(self) -> None:
        with workers.study_lock(self.study):  # two workers starting together enqueue the seeds once
            if self._fresh_trials():
                return
            starts = [(self.warm_start, "warm-start")] if self.warm_start else []
            if self.config.seeds:
                starts += [(p, "uniform") for p in starting_points(self.space, self.feasible)]
            seen: list[dict] = []
            for p, origin in starts:
                params = self.params.to_params(p)
                if params not in seen:
                    seen.append(params)
                    self.study.enqueue_trial(params, user_attrs={"origin": origin})

    def _known(self, params: dict) -> bool:
        """Whether a trial with these parameters is already evaluated, running or queued."""
        return any(t.params == params for t in self.study.get_trials(deepcopy=False)
                   if t.state != TrialState.PRUNED and t.params)

    def best_accuracy(self) -> float | None:
        accs = [t.values[0] for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        return max(accs) if accs else None

    def run(self) -> None:
        self._recover_stale()
        self._enqueue_starts()
        total = self.config.trials
        asks = 0
        while self._evaluated() < total and asks < 50 * total:
            if self._rdb() is not None and self._evaluated() + workers.in_flight(self._fresh_trials(), self.worker) >= total:
                time.sleep(1.0)  # other workers are fine-tuning the last slots; wait for their results
                self._recover_stale()
                continue
            asks += 1
            with warnings.catch_warnings():  # heartbeats are sent by workers.heartbeat below, not by ``optimize``
                warnings.filterwarnings("ignore", message="Heartbeat of storage")
                trial = self.study.ask(self.distributions)
            trial.set_user_attr("owner", self.worker)
            policy = self.params.to_policy(trial.params)
            costs = self.costs(policy)
            if self.violations(costs):
                fixed = repair(self.space, policy, self.feasible)
                trial.set_user_attr("reason", "over budget" + (": repaired into a later trial" if fixed else ""))
                for k, v in costs.items():
                    trial.set_user_attr(k, v)
                self.study.tell(trial, state=TrialState.PRUNED)
                if fixed is not None and not self._known(self.params.to_params(fixed)):
                    self.study.enqueue_trial(self.params.to_params(fixed), user_attrs={"origin": f"repair of {trial.number}"})
                self.callback(TrialEvent(trial.number, "pruned", self._evaluated(), total, self.best_accuracy(), "screen"))
                continue
            if not self._claim(trial):
                trial.set_user_attr("reason", f"not fine-tuned: other workers took the last of the {total} trials")
                self.study.tell(trial, state=TrialState.PRUNED)
                continue
            with workers.heartbeat(self.study, trial):
                self._evaluate(trial, policy, costs)
        self._recover_stale()
        self._finalise()

    def _evaluate(self, trial: optuna.Trial, policy: Policy, costs: dict[str, Any]) -> None:
        for k, v in costs.items():
            trial.set_user_attr(k, v)
        for key, margin in self.margins(costs).items():
            trial.set_constraint(key, margin)
        started = time.time()
        try:
            scored = self.evaluator(policy, self.config.low_epochs)
        except TrialFailed as exc:
            self._fail(trial, str(exc))
            return
        except Exception as exc:  # a candidate that cannot be built or trained fails alone
            self._fail(trial, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            return
        trial.set_user_attr("seconds", round(time.time() - started, 2))
        trial.set_user_attr("fidelity_epochs", self.config.low_epochs)
        trial.set_user_attr("policy", dict(policy.decisions))
        if scored.notes:
            trial.set_user_attr("notes", scored.notes[:20])
        values = [scored.accuracy if o == "accuracy" else costs[o] for o in self.config.objectives]
        if not all(math.isfinite(v) for v in values):
            self._fail(trial, "non-finite objective")
            return
        self.study.tell(trial, values)
        self.callback(TrialEvent(trial.number, "complete", self._evaluated(), self.config.trials, self.best_accuracy(),
                                 "search", f"acc {scored.accuracy:.4f}, {costs['latency_ms']:.2f} ms"))

    def _fail(self, trial: optuna.Trial, reason: str) -> None:
        trial.set_user_attr("fail_reason", reason[:300])
        self.study.tell(trial, state=TrialState.FAIL)
        self.callback(TrialEvent(trial.number, "failed", self._evaluated(), self.config.trials, self.best_accuracy(),
                                 "search", reason[:120]))

    # -- second rung ----------------------------------------------------------------------------
    def _finalise(self) -> None:
        done = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        if not done:
            raise TrialFailed("no candidate could be evaluated; see the failed trials' reasons in trials.csv")
        ranked = sorted(done, key=lambda t: (-t.values[0], t.user_attrs.get("latency_ms", 0.0)))
        distinct: list = []
        for t in ranked:  # the same policy twice would spend two full fine-tunes on one candidate
            if all(t.params != f.params for f in distinct):
                distinct.append(t)
        self.finalists = distinct[: max(1, self.config.finalists)]
        self.best_model = None
        self.best_trial = None
        best_acc = -1.0
        for t in self.finalists:
            policy = self.params.to_policy(t.params)
            scored = self.evaluator(policy, self.config.full_epochs)
            self.study.set_user_attr(f"full:{t.number}", scored.accuracy)
            self.callback(TrialEvent(t.number, "final", self.config.trials, self.config.trials, self.best_accuracy(),
                                     "finalists", f"trial {t.number}: acc {scored.accuracy:.4f} after {self.config.full_epochs} epochs"))
            key = (scored.accuracy, -t.user_attrs.get("latency_ms", 0.0))
            if self.best_trial is None or key > best_key:
                best_key, best_acc = key, scored.accuracy
                self.best_trial, self.best_model, self.best_scored = t, scored.model, scored
        self.best_policy = self.params.to_policy(self.best_trial.params)
