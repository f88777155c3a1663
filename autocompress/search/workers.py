"""Several search processes on one Optuna study in an RDB (Optuna's distributed mode).

Each worker asks and tells on the shared storage. What Optuna leaves to the
caller lives here: a PostgreSQL advisory lock around the few check-then-act
steps (enqueueing the seeds once, taking one of the ``trials`` slots), reads
that bypass the per-process trial cache, and heartbeats for ask/tell trials
(Optuna records them only inside ``Study.optimize``). Optuna's storage
internals these need are in ``_optuna_storage``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import random
import threading
import time
from typing import Any, Iterator, Mapping

import optuna

from autocompress.errors import EnvironmentProblem, UserInputError
from autocompress.search import _optuna_storage


GRACE_BEATS = 3  # heartbeats a trial may miss before it is stale


def heartbeat_seconds() -> int:
    """Seconds between heartbeats on RDB storage (``AUTOCOMPRESS_HEARTBEAT_S``, default 60); stale after three."""
    raw = os.environ.get("AUTOCOMPRESS_HEARTBEAT_S", "60")
    try:
        value = int(raw)
    except ValueError:
        raise UserInputError(f"AUTOCOMPRESS_HEARTBEAT_S must be a whole number of seconds, got {raw!r}") from None
    if value < 1:
        raise UserInputError(f"AUTOCOMPRESS_HEARTBEAT_S must be at least 1, got {value}")
    return value


def pg_driver(url: str) -> str:
    """SQLAlchemy 2.1 reads ``postgresql://`` as psycopg 3; use psycopg2 where only that is installed."""
    if url.startswith("postgresql://") and not importlib.util.find_spec("psycopg") and importlib.util.find_spec("psycopg2"):
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def rdb_storage(url: str) -> optuna.storages.RDBStorage:
    """RDB storage with heartbeats; tolerant of workers that create the schema of a fresh database together."""
    import warnings

    beat = heartbeat_seconds()
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(pg_driver(url), heartbeat_interval=beat,
                                                  grace_period=GRACE_BEATS * beat)
        except ImportError as exc:  # the database's driver
            raise EnvironmentProblem(f"--storage {_safe(url)!r} needs its database driver ({exc.name or exc}); install "
                                     "it (pip install psycopg2-binary for PostgreSQL)") from None
        except Exception as exc:  # sqlalchemy IntegrityError/ProgrammingError from the concurrent CREATE TABLEs
            if "already exists" in str(exc) or "duplicate key" in str(exc):
                if attempt < 4:
                    time.sleep(0.5 + random.random())
                    continue
            if "Can't load plugin" in str(exc):  # SQLAlchemy's word for a dialect whose driver is missing
                raise EnvironmentProblem(f"--storage {_safe(url)!r}: no driver for this database is installed "
                                         "(pip install psycopg2-binary for PostgreSQL)") from None
            first = str(getattr(exc, "orig", None) or exc).strip().splitlines()
            raise EnvironmentProblem(f"cannot open --storage {_safe(url)!r}: {first[0] if first else type(exc).__name__}; "
                                     "check that the database (or the sqlite file's folder) exists and is writable") from None
    raise AssertionError("unreachable")


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    import re

    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def rdb_backend(study: optuna.Study) -> optuna.storages.RDBStorage | None:
    return _optuna_storage.rdb_backend(study)


def fresh_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Every trial as the database holds it now, other workers' attributes included."""
    rdb = rdb_backend(study)
    if rdb is None:
        return study.get_trials(deepcopy=False)
    return _optuna_storage.uncached_trials(study, rdb)


@contextlib.contextmanager
def study_lock(study: optuna.Study) -> Iterator[None]:
    """Serialise a check-then-act step between processes sharing a PostgreSQL study.

    A session-level advisory lock: PostgreSQL releases it if the holder dies.
    Other storages have one process per study, so nothing needs locking.
    """
    rdb = rdb_backend(study)
    if rdb is None or rdb.engine.dialect.name != "postgresql":
        yield
        return
    from sqlalchemy import text

    key = int(hashlib.sha1(study.study_name.encode()).hexdigest()[:15], 16)
    with rdb.engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})


def grace_seconds(study: optuna.Study) -> int:
    """How long a heartbeat may be missing before its trial counts as stale."""
    return GRACE_BEATS * (_optuna_storage.heartbeat_interval(study) or heartbeat_seconds())


@contextlib.contextmanager
def heartbeat(study: optuna.Study, trial: optuna.Trial) -> Iterator[None]:
    """Record the trial's heartbeat every interval while the block runs, so others see it is alive."""
    interval = _optuna_storage.heartbeat_interval(study)
    if not interval:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            with contextlib.suppress(Exception):  # a missed beat only risks a late stale check
                _optuna_storage.record_heartbeat(study, trial)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, daemon=True, name=f"heartbeat-{trial.number}")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def in_flight(trials: list[Any], owner: str) -> int:
    """Trials other workers have claimed for fine-tuning and not yet told."""
    return sum(t.state == optuna.trial.TrialState.RUNNING and bool(t.user_attrs.get("claimed"))
               and t.user_attrs.get("owner") != owner for t in trials)


def unclaimed_stale(trials: list[Any], owner: str, grace_s: float) -> list[Any]:
    """Running trials of other workers that never claimed a slot (so never sent a heartbeat) and
    started more than ``grace_s`` (see ``grace_seconds``) ago: their worker died between asking and claiming."""
    import datetime

    now = datetime.datetime.now()
    return [t for t in trials if t.state == optuna.trial.TrialState.RUNNING and not t.user_attrs.get("claimed")
            and t.user_attrs.get("owner") != owner and t.datetime_start is not None
            and (now - t.datetime_start).total_seconds() > grace_s]


def taken(trials: list[Any]) -> int:
    """Slots of the ``trials`` total used so far: evaluated, or claimed and being fine-tuned."""
    state = optuna.trial.TrialState
    return sum(t.state in (state.COMPLETE, state.FAIL) or (t.state == state.RUNNING and bool(t.user_attrs.get("claimed")))
               for t in trials)


RUN_AGAIN = "interrupted; run again"


def interruption(attrs: Mapping[str, Any], shared: bool) -> str:
    """Why an interrupted trial (its user attributes) is pruned on resume; ``RUN_AGAIN`` when its candidate
    is enqueued again (its parameters are all drawn: it claimed a slot or wrote its policy)."""
    if shared and not attrs.get("claimed"):
        return "interrupted before fine-tuning"  # killed before it took one of the ``trials`` slots
    if "policy" not in attrs and not attrs.get("claimed"):
        return "interrupted before a candidate"  # killed while its parameters were written
    return RUN_AGAIN
