"""Optuna storage internals the search needs, in one place: each function names the public API it stands in for."""

from __future__ import annotations

from typing import Any

import optuna


def rdb_backend(study: optuna.Study) -> optuna.storages.RDBStorage | None:
    """The study's RDB storage (behind Optuna's cache wrapper), or None for journal and in-memory storage."""
    # Study has no public accessor for its storage, and the cached wrapper none for its backend.
    backend = getattr(study._storage, "_backend", study._storage)
    return backend if isinstance(backend, optuna.storages.RDBStorage) else None


def uncached_trials(study: optuna.Study, rdb: optuna.storages.RDBStorage) -> list[optuna.trial.FrozenTrial]:
    """Every trial as the database holds it now, other processes' attributes included."""
    # Study has no public study id and no read that bypasses the per-process trial cache.
    return rdb.get_all_trials(study._study_id, deepcopy=False)


def set_trial_user_attr(study: optuna.Study, trial: optuna.trial.FrozenTrial, key: str, value: Any) -> None:
    """Set a user attribute on a RUNNING trial this process holds only as a FrozenTrial (a dead worker's)."""
    # FrozenTrial has no public trial id, and Study no public set-attribute-by-number.
    study._storage.set_trial_user_attr(trial._trial_id, key, value)


def heartbeat_interval(study: optuna.Study) -> int | None:
    """Seconds between heartbeats the study's storage expects; None where it keeps no heartbeats."""
    # Study has no public accessor for its storage's heartbeat settings.
    storage = study._storage
    return storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None


def record_heartbeat(study: optuna.Study, trial: optuna.Trial) -> None:
    """Record that an ask/tell trial is alive."""
    # Optuna records heartbeats only inside Study.optimize; there is no public call for ask/tell trials.
    study._storage.record_heartbeat(trial._trial_id)


def stale_running(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """RUNNING trials whose heartbeats stopped (their worker died), as the database holds them now."""
    # Optuna names stale trials only inside fail_stale_trials, which fails them; a stopped trial is to be run again.
    storage = study._storage
    rdb = rdb_backend(study)
    if rdb is None or not hasattr(storage, "_get_stale_trial_ids") or storage.get_heartbeat_interval() is None:
        return []
    stale = set(storage._get_stale_trial_ids(study._study_id))
    return [t for t in uncached_trials(study, rdb)
            if t._trial_id in stale and t.state == optuna.trial.TrialState.RUNNING]
