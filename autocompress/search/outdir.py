"""One search per output folder, and a folder that remembers which search it holds.

``--out`` gets a lock file held (``fcntl.flock``) for the whole search, so a
second process on the same folder is refused with one line that names the
running one; extra workers on a shared RDB study (``--storage postgresql://``)
are the deliberate exception. ``search.json`` records what the folder holds
(model, data or task, target, budget, objectives, search space); the same
command resumes, a different one is refused unless ``--force``, which moves the
old contents aside into ``previous-<time>/`` (never deletes them).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from autocompress.errors import EnvironmentProblem, UserInputError

LOCK = ".autocompress.lock"
MANIFEST = "search.json"
ASIDE_PREFIX = "previous-"


@dataclass(frozen=True)
class FolderClaim:
    """What a search in ``--out`` is: a different one may not reuse the folder's study and files."""

    model: str
    data: str
    target: str
    budget: str
    objectives: tuple[str, ...]
    space: str
    kinds: tuple[str, ...] = ()  # the decision kinds searched (empty: all)

    def to_json(self) -> dict[str, Any]:
        return {"format": "autocompress.search-folder/1", **asdict(self), "objectives": list(self.objectives),
                "kinds": list(self.kinds)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "FolderClaim":
        return cls(str(data["model"]), str(data["data"]), str(data["target"]), str(data["budget"]),
                   tuple(data["objectives"]), str(data["space"]), tuple(data.get("kinds", ())))

    def differences(self, other: "FolderClaim") -> list[str]:
        mine, theirs = asdict(self), asdict(other)
        return [f"{k} {theirs[k]!r} -> {mine[k]!r}" for k in mine if mine[k] != theirs[k]]


class FolderLock:
    """An exclusive, non-blocking lock on ``out`` for this process's lifetime in the ``with`` block."""

    def __init__(self, out: Path) -> None:
        self.path = out / LOCK
        self.fh: Any = None

    def __enter__(self) -> "FolderLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise UserInputError(f"--out {str(self.path.parent)!r} is in use by a running search ({holder}); wait "
                                 "for it, stop it, or give another --out") from None
        except OSError as exc:
            fh.close()
            raise EnvironmentProblem(f"cannot lock --out {str(self.path.parent)!r}: {exc.strerror or exc}") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        self.fh = fh
        return self

    def __exit__(self, *exc: Any) -> None:
        import fcntl

        if self.fh is not None:
            fcntl.flock(self.fh, fcntl.LOCK_UN)
            self.fh.close()
            self.fh = None


def _held(out: Path) -> tuple[FolderClaim | None, tuple[str, ...]]:
    """What ``out`` holds and which fields can be compared: its manifest (all of them), else an older
    result.json (model, data, target), else nothing."""
    manifest, result = out / MANIFEST, out / "result.json"
    try:
        if manifest.is_file():
            return FolderClaim.from_json(json.loads(manifest.read_text())), ()
        if result.is_file():
            r = json.loads(result.read_text())
            held = FolderClaim(str(r.get("model", "")), str(r.get("data", "")), str(r.get("target", "")), "", (), "")
            return held, ("budget", "objectives", "space", "kinds")
    except (ValueError, KeyError, TypeError):
        raise UserInputError(f"--out {str(out)!r} holds a damaged {MANIFEST}; add --force to move it aside and "
                             "start over") from None
    return None, ()


def _move_aside(out: Path) -> Path:
    aside = out / f"{ASIDE_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir()
    for entry in sorted(out.iterdir()):
        if entry.name == LOCK or entry.name.startswith(ASIDE_PREFIX) or entry == aside:
            continue
        shutil.move(str(entry), aside / entry.name)
    return aside


def claim(out: Path, wanted: FolderClaim, *, force: bool = False) -> Path | None:
    """Make ``out`` this search's folder; returns where old results went when ``force`` moved them aside.

    Call it with the folder's lock held. The same search resumes; another is refused (one line
    saying what differs) unless ``force``.
    """
    held, unknown = _held(out) if out.is_dir() else (None, ())
    differs = held is not None and any(getattr(held, f.name) != getattr(wanted, f.name)
                                       for f in fields(FolderClaim) if f.name not in unknown)
    aside = None
    if differs:
        if not force:
            what = "; ".join(d for d in wanted.differences(held) if d.split()[0] not in unknown)
            raise UserInputError(f"--out {str(out)!r} holds another search ({what}); rerun the same command to resume "
                                 "it, give another --out, or add --force to start over (old results are moved into "
                                 f"{ASIDE_PREFIX}<time>/ there)")
        aside = _move_aside(out)
    elif held is None and force and out.is_dir() and any(p.name != LOCK for p in out.iterdir()):
        aside = _move_aside(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(wanted.to_json(), indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)
    return aside


def folder_claim(config: Any, model: str | None, data: str | None, task: Any, module: Any = None) -> FolderClaim:
    """What a search (its SearchConfig and inputs) asks ``--out`` to hold, named before the model is loaded."""
    from autocompress.search.core import model_and_data
    from autocompress.search.setup import task_label

    if module is not None:
        model = f"python:{type(module).__name__}"
    if task is None:
        model, data = model_and_data(model, data)
    else:
        model, data = str(model), task_label(task)
    return FolderClaim(str(model), str(data), config.target, config.budget, tuple(config.objectives), config.space,
                       tuple(config.kinds))


def entries(out: Path) -> set[str] | None:
    """What ``out`` holds now (None: it does not exist), for ``undo`` after a refused search."""
    return {e.name for e in out.iterdir()} if out.is_dir() else None


def undo(out: Path, before: set[str] | None) -> None:
    """Remove what a search refused before its first trial added: the whole folder if it made it,
    else each entry that was not there before."""
    if before is None:
        shutil.rmtree(out, ignore_errors=True)
        return
    if not out.is_dir():
        return
    for entry in out.iterdir():
        if entry.name in before:
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
