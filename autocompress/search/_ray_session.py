"""Joining a Ray cluster or starting a private local instance: the one place that reaches into Ray's internals.

Each reach-in names the public API Ray lacks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import ray

from autocompress.errors import UserInputError

AUTH_VARIABLES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


@contextlib.contextmanager
def session(address: str | None, cpus: float) -> Iterator[None]:
    """Ray connected for the block: ``address`` joined, or a private local instance started and removed after."""
    started, temp, saved = connect(address, cpus)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
        restore_env(saved)
        if temp:
            shutil.rmtree(temp, ignore_errors=True)


def connect(address: str | None, cpus: float) -> tuple[bool, str | None, dict[str, str | None]]:
    """Join ``address`` or start a private local instance.

    Returns (started here, its temp folder, environment variables to restore afterwards).
    """
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
    if ray.is_initialized():
        return False, None, {}
    saved: dict[str, str | None] = {}
    if not address:
        # Ray swaps 127.0.0.1 for the machine's outward address unless told this is a one-machine
        # cluster; keep every connection of a private local instance on 127.0.0.1.
        # ray.init has no public option for this in the driver process (only the environment variable for the rest).
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
        saved["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # for the processes ray.init starts
        # Ray starts workers at niceness 15 to keep its daemons responsive; on a private instance the trials
        # are the job, and at 15 any other busy process on the machine starves them (10x slower under load).
        saved["RAY_worker_niceness"] = os.environ.get("RAY_worker_niceness")
        os.environ.setdefault("RAY_worker_niceness", "0")
    if address:
        try:
            ray.init(address=address, **quiet)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise UserInputError(f"cannot join the Ray cluster at {address!r}: {str(exc).splitlines()[0]}; "
                                 "start it with `ray start --head` and check the address and RAY_AUTH_TOKEN_PATH") from exc
        return True, None, saved
    # Unix socket paths must stay short, so the session folder goes to a private folder in the
    # system temp dir rather than under --out; never the shared default /tmp/ray.
    temp = tempfile.mkdtemp(prefix="acray-")
    if not any(k in os.environ for k in AUTH_VARIABLES):
        # A private token for this instance, instead of Ray writing one to the shared ~/.ray.
        token = Path(temp) / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        for k, v in (("RAY_AUTH_MODE", "token"), ("RAY_AUTH_TOKEN_PATH", str(token))):
            saved[k] = os.environ.get(k)
            os.environ[k] = v
        reload_auth()
    ray.init(num_cpus=max(int(cpus), os.cpu_count() or 1), include_dashboard=False, _temp_dir=temp,
             object_store_memory=200 * 1024 * 1024, **quiet)
    return True, temp, saved


def reload_auth() -> None:
    """Ray reads its authentication settings once per process; make it read them again."""
    # Ray has no public call to re-read RAY_AUTH_* after its first read in a process.
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def restore_env(saved: dict[str, str | None]) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    if saved:
        reload_auth()
