"""The fault sweep's records, its runner for one command, and its cases (see ``fault_sweep.py``)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import pickle
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

EXE = Path(sys.executable).with_name("autocompress")
CLI = [str(EXE)] if EXE.exists() else [sys.executable, "-m", "autocompress.cli.main"]


@dataclass(frozen=True)
class Run:
    argv: tuple[str, ...]
    code: Optional[int]  # None: killed at the timeout; negative: ended by that signal
    stdout: str
    stderr: str
    seconds: float
    max_rss_mb: float
    fired: bool = False  # the run's trigger (a signal, a second command) happened while it ran
    fired_at: float = 0.0  # seconds into the run
    problem: str = ""  # what a multi-step case found wrong beyond the last command's own output
    info: str = ""


@dataclass(frozen=True)
class Case:
    name: str
    group: str
    expect: int
    argv: tuple[str, ...] = ()  # autocompress arguments; {t} is the case's folder, {f} the shared fixtures
    frag: str = ""  # the one-line error must contain this
    setup: Optional[Callable[["Ctx"], None]] = None
    check: Optional[Callable[["Ctx", Run], str]] = None  # '' when fine, else what went wrong
    driver: Optional[Callable[["Ctx"], Run]] = None  # multi-step cases run their own commands
    timeout: float = 60.0  # a refusal comes in seconds; a case that runs a search instead is stopped here
    quiet: bool = False  # a success must print nothing on stderr
    env: tuple[tuple[str, str], ...] = ()


class NotRunHere(Exception):
    """The machine lacks what the case needs (mount rights, time to send a signal); the reason is reported."""


@dataclass
class Ctx:
    tmp: Path
    fx: Path
    env: dict
    shared: dict = field(default_factory=dict)

    def path(self, text: str) -> str:
        return text.replace("{t}", str(self.tmp)).replace("{f}", str(self.fx))

    def run(self, argv, timeout: float = 60.0, env: Optional[dict] = None, prefix: tuple = (),
            when: Optional[Callable[[str], object]] = None, then: Optional[Callable[[int], object]] = None) -> Run:
        """autocompress ARGV (behind PREFIX), stdout and stderr into files; ``then(pid)`` once ``when(stdout)`` holds
        while it runs. wait4 gives this process's own peak memory."""
        argv = tuple(self.path(a) for a in argv)
        so_path = Path(tempfile.mkstemp(dir=self.tmp, prefix=".so")[1])
        se_path = Path(tempfile.mkstemp(dir=self.tmp, prefix=".se")[1])
        start, fired, fired_at = time.monotonic(), False, 0.0
        with open(so_path, "wb") as so, open(se_path, "wb") as se:
            proc = subprocess.Popen([*prefix, *CLI, *argv], stdout=so, stderr=se, stdin=subprocess.DEVNULL,
                                    cwd=self.tmp, env=env or self.env, start_new_session=True)
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    code = os.waitstatus_to_exitcode(status)
                    break
                if when and not fired and when(so_path.read_text(errors="replace")):
                    fired, fired_at = True, time.monotonic() - start
                    then(proc.pid)
                elif time.monotonic() - start > timeout:
                    os.killpg(proc.pid, signal.SIGKILL)
                    _, status, usage = os.wait4(proc.pid, 0)
                    code = None
                    break
                time.sleep(0.05)
            proc.returncode = -9 if code is None else code  # reaped above: Popen must not wait for it again
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # stray children (data loaders) of an interrupted run
        except (ProcessLookupError, PermissionError):
            pass
        out, err = so_path.read_text(errors="replace"), se_path.read_text(errors="replace")
        so_path.unlink(), se_path.unlink()
        return Run(argv, code, out, err, time.monotonic() - start, usage.ru_maxrss / 1024, fired, fired_at)


# -- command lines -----------------------------------------------------------------------------------
def search(*extra: str, budget: Optional[str] = "5ms", target: str = "mobile") -> tuple[str, ...]:
    limit = ("--budget", budget) if budget is not None else ()
    return ("search", "--target", target, *limit, "--trials", "2", "--low-epochs", "0.1", "--full-epochs", "0.1",
            "--finalists", "1", "--no-measure", "--out", "{t}/out", *extra)


def tiny(*extra: str, budget: str = "0.9x", out: str = "{t}/out", trials: int = 2, epochs: str = "0.2",
         model: str = "{f}/tiny.py:model", target: str = "mobile") -> tuple:
    return ("search", "--model", model, "--data", "{f}/tiny.py:data", "--target", target, "--budget",
            budget, "--trials", str(trials), "--low-epochs", epochs, "--full-epochs", "0.2", "--finalists", "1",
            "--no-measure", "--out", out, *extra)


def apply(*extra: str, policy: str = "{t}/p.json", model: str = "builtin:digits-net", out: str = "{t}/out") -> tuple:
    return ("apply", "--model", model, "--policy", policy, "--out", out, "--no-measure", *extra)


def profile(*extra: str, model: str = "builtin:digits-net") -> tuple[str, ...]:
    return ("profile", "--model", model, *extra)


# -- setups and checks -------------------------------------------------------------------------------
def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".autocompress.lock"}


def write(ctx: Ctx, name: str, content) -> Path:
    path = ctx.tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return path


def pol(decisions=None, raw=None, fingerprint: Optional[str] = None, **extra) -> Callable[[Ctx], None]:
    """Writes {t}/p.json: RAW (text, bytes or a function of ctx), or a digits-net policy (DECISIONS: a dict or
    a function of the space)."""
    def setup(ctx: Ctx) -> None:
        if raw is not None:
            write(ctx, "p.json", raw(ctx) if callable(raw) else raw)
            return
        space = ctx.shared["space"]
        d = decisions(space) if callable(decisions) else (decisions or {})
        write(ctx, "p.json", json.dumps({"format": "autocompress.policy/1", "model": space["model"], "fingerprint":
                                         space["fingerprint"] if fingerprint is None else fingerprint,
                                         "decisions": d, **extra}))
    return setup


def first_prune(space: dict) -> str:
    return next(d["id"] for d in space["decisions"] if d["kind"] == "prune")


def int8_and_prune(space: dict) -> dict:
    return {**{d["id"]: 8 for d in space["decisions"] if d["kind"] in ("wbits", "abits")}, first_prune(space): 0.5}


def no_out(ctx: Ctx, run: Run) -> str:
    return "a refused run left --out behind" if (ctx.tmp / "out").exists() else ""


def unchanged(ctx: Ctx, run: Run) -> str:
    return "" if snapshot(ctx.tmp / "out") == ctx.shared["before"] else "the existing --out was changed"


def no_staging(ctx: Ctx, run: Run) -> str:
    left = [str(p.relative_to(ctx.tmp)) for p in ctx.tmp.rglob(".partial-*")]
    return f"staging left behind: {left}" if left else ""


def both(*checks: Callable[[Ctx, Run], str]) -> Callable[[Ctx, Run], str]:
    return lambda ctx, run: "; ".join(p for p in (c(ctx, run) for c in checks) if p)


def keep_file(ctx: Ctx) -> None:
    write(ctx, "out/keep.txt", "earlier results")
    ctx.shared["before"] = snapshot(ctx.tmp / "out")


def template(ctx: Ctx) -> Path:
    """A finished tiny search, built once per sweep."""
    folder = ctx.fx / "template"
    if not (folder / "result.json").exists():
        run = Ctx(ctx.fx, ctx.fx, ctx.env).run(tiny(out=str(folder)), timeout=300)
        if run.code != 0:
            raise RuntimeError(f"the template search failed: {run.stderr[-500:]}")
    return folder


def copy_template(ctx: Ctx) -> None:
    shutil.copytree(template(ctx), ctx.tmp / "out")
    ctx.shared["before"] = snapshot(ctx.tmp / "out")


def lines_whole(*tokens: str) -> Callable[[Ctx, Run], str]:
    """Tables at full width: no ellipsis, each token whole on one line."""
    def check(ctx: Ctx, run: Run) -> str:
        if "…" in run.stdout:
            return "a table was cut (…)"
        missing = [t for t in tokens if not any(t in line for line in run.stdout.splitlines())]
        return f"not whole on one line: {missing}" if missing else ""
    return check


def within(seconds: float, rss_mb: float) -> Callable[[Ctx, Run], str]:
    def check(ctx: Ctx, run: Run) -> str:
        if run.seconds <= seconds and run.max_rss_mb <= rss_mb:
            return ""
        return f"took {run.seconds:.0f} s and {run.max_rss_mb:.0f} MB (limit {seconds:.0f} s, {rss_mb:.0f} MB)"
    return check


def normalised(ctx: Ctx, run: Run) -> str:
    path = ctx.tmp / "out" / "policy.json"
    value = json.loads(path.read_text())["decisions"].get(first_prune(ctx.shared["space"])) if path.exists() else None
    return "" if value == 0.5 and "0.5000000001" not in path.read_text() else f"policy.json holds {value!r}, not 0.5"


def pickle_bomb(ctx: Ctx) -> None:
    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {shlex.quote(str(ctx.tmp / 'PWNED'))}",)
    write(ctx, "w.pt", pickle.dumps(Payload()))


def state_file(make: Callable) -> Callable[[Ctx], None]:
    """Writes {t}/w.pt from the digits-net state dict (MAKE(torch, state) returns what to save)."""
    def setup(ctx: Ctx) -> None:
        import torch

        torch.save(make(torch, torch.load(ctx.fx / "digits.pt", weights_only=True)), ctx.tmp / "w.pt")
    return setup


def image_folder(classes: int, corrupt: bool = False) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        from PIL import Image

        for c in range(classes):
            (ctx.tmp / "img" / f"class{c}").mkdir(parents=True)
            for i in range(6):
                Image.new("L", (8, 8), color=40 * c + i).save(ctx.tmp / "img" / f"class{c}" / f"{i}.png")
        (ctx.tmp / "img").mkdir(exist_ok=True)
        if corrupt:
            write(ctx, "img/class0/broken.png", b"not an image")
    return setup


# -- mounts: a private mount namespace, so nothing outlives the case ---------------------------------
def namespace(ctx: Ctx, mounts: str, argv, listing: str = "", **kw) -> Run:
    if not shutil.which("unshare"):
        raise NotRunHere("no unshare(1) for a private mount namespace")
    keep = f"ls -A {shlex.quote(ctx.path(listing))} > {shlex.quote(str(ctx.tmp / 'listing.txt'))}; " if listing else ""
    script = f'{mounts} || exit 97; "$@"; rc=$?; {keep}exit $rc'
    prefix = ("unshare", "-m", *(() if os.geteuid() == 0 else ("-r",)), "sh", "-c", script, "sh")
    run = ctx.run(argv, prefix=prefix, **kw)
    if run.code == 97 or "unshare failed" in run.stderr:
        raise NotRunHere("cannot mount here (needs root or unprivileged user namespaces)")
    return run


def ro_bind(folder: Path) -> str:
    q = shlex.quote(str(folder))
    return f"mount --bind {q} {q} && mount -o remount,ro,bind {q}"


def tmpfs(folder: Path, options: str = "size=256m") -> str:
    folder.mkdir(parents=True, exist_ok=True)
    return f"mount -t tmpfs -o {options} tmpfs {shlex.quote(str(folder))}"


def mounted(mounts: Callable[[Ctx], str], argv, listing: str = "") -> Callable[[Ctx], Run]:
    return lambda ctx: namespace(ctx, mounts(ctx), argv, listing)


def listing_has(*names: str) -> Callable[[Ctx, Run], str]:
    def check(ctx: Ctx, run: Run) -> str:
        seen = (ctx.tmp / "listing.txt").read_text().split() if (ctx.tmp / "listing.txt").exists() else []
        if [n for n in names if n not in seen] or [n for n in seen if n.startswith(".partial-")]:
            return f"the mount point holds {seen}; expected {list(names)} and no staging"
        return no_staging(ctx, run)
    return check


# -- multi-step drivers ------------------------------------------------------------------------------
def trial_done(out: str) -> bool:
    return bool(re.search(r"^trial \d+ complete", out, re.M))


def d_concurrent(ctx: Ctx) -> Run:
    second: list[Run] = []
    argv = tiny(trials=3, epochs="40")
    first = ctx.run(argv, timeout=300, when=lambda out: "phase: searching" in out,
                    then=lambda pid: second.append(ctx.run(argv)))
    if not second:
        raise NotRunHere("the first search ended before the second could start")
    problem = "" if first.code == 0 else f"the first search exited {first.code}: {last_line(first.stderr)}"
    return replace(second[0], problem=problem)


def last_line(text: str) -> str:
    lines = [l for l in text.splitlines() if l.strip()]
    return lines[-1][:200] if lines else ""


def soon_after_signal(ctx: Ctx, run: Run) -> str:
    """An interrupted command stops within seconds (the signal is sent a second or so after ``fired_at``)."""
    late = run.seconds - run.fired_at
    return f"still running {late:.0f} s after the signal" if run.code is None or late > 30 else ""


def d_interrupt(sig: int, key: str) -> Callable[[Ctx], Run]:
    """A tiny search stopped by SIG a second after its first trial completed (mid-way through the next)."""
    def driver(ctx: Ctx) -> Run:
        run = ctx.run(tiny(trials=3, epochs="40"), timeout=240, when=trial_done,
                      then=lambda pid: (time.sleep(1.0), os.killpg(pid, sig)))
        if not run.fired:
            raise NotRunHere("the search finished before it could be interrupted")
        if (ctx.tmp / "out").exists():  # the resume case starts from a copy
            shutil.copytree(ctx.tmp / "out", ctx.fx / f"interrupted-{key}", dirs_exist_ok=True)
        ctx.shared[key] = (ctx.fx / f"interrupted-{key}", run.stdout)
        journal = ctx.tmp / "out" / "study.journal"
        kept = journal.exists() and journal.stat().st_size > 0 and not (ctx.tmp / "out" / "result.json").exists()
        return run if kept else replace(run, problem="no study.journal with the completed trials")
    return driver


def d_resume(sig: int, key: str, stale_lock: bool = False) -> Callable[[Ctx], Run]:
    """The same command after an interruption: trials completed before are kept, the interrupted one runs again.
    STALE_LOCK: the kill came while the journal was being written, leaving Optuna's lock link behind."""
    def driver(ctx: Ctx) -> Run:
        if key not in ctx.shared or not ctx.shared[key][0].exists():
            d_interrupt(sig, key)(ctx)
        folder, log = ctx.shared[key]
        if not (ctx.tmp / "out").exists():
            shutil.copytree(folder, ctx.tmp / "out")
        if stale_lock:  # what JournalFileSymlinkLock.acquire leaves when its process dies before release
            os.symlink(ctx.tmp / "out" / "study.journal", ctx.tmp / "out" / "study.journal.lock")
        run = ctx.run(tiny(trials=3, epochs="40"), timeout=120)
        out = ctx.tmp / "out"
        if run.code != 0 or not (out / "trials.csv").exists():
            return run
        before = {int(n): a for n, a in re.findall(r"^trial (\d+) complete \(\d+/\d+\): acc ([\d.]+)", log, re.M)}
        with open(out / "trials.csv") as fh:
            rows = {int(r["number"]): r for r in csv.DictReader(fh)}
        lost = [n for n, a in before.items() if n not in rows or rows[n]["state"] != "COMPLETE"
                or f"{float(rows[n]['accuracy_select']):.4f}" != a]
        done = json.loads((out / "result.json").read_text())["trials"]
        # A trial killed before its candidate was written is pruned, not run again (its parameters may be half there).
        stopped = [n for n, r in rows.items() if r["reason"] == "interrupted; run again" or r["state"] == "FAIL"]
        reruns = [r["origin"] for r in rows.values() if r["origin"].startswith("re-run of")]
        problems = [f"completed before, lost or changed: {lost}"] if lost else []
        problems += [f"{done['complete']} of 3 trials complete ({done})"] if done["complete"] != 3 else []
        problems += [f"interrupted trial(s) {stopped} not run again"] if len(reruns) < len(stopped) else []
        reasons = sorted({r["reason"] for r in rows.values() if r["reason"].startswith("interrupted")})
        noise = f"; {len(run.stderr.splitlines())} lines on stderr" if run.stderr.strip() else ""
        return replace(run, problem="; ".join(problems), info=f"kept {sorted(before)}, {reruns or 'no re-run'}, "
                                                              f"pruned as {reasons}, {run.seconds:.0f} s{noise}")
    return driver


def d_apply_signal(sig: int) -> Callable[[Ctx], Run]:
    """apply stopped by SIG while its staging folder exists; after SIGKILL the same command runs again."""
    def driver(ctx: Ctx) -> Run:
        pol(int8_and_prune)(ctx)
        argv = ("apply", "--model", "builtin:digits-net", "--policy", "{t}/p.json", "--out", "{t}/out")
        run = ctx.run(argv, timeout=240, when=lambda _: any((ctx.tmp / "out").glob(".partial-*")),
                      then=lambda pid: (time.sleep(0.3), os.killpg(pid, sig)))
        if not run.fired:
            raise NotRunHere("apply finished before its staging folder was seen")
        return run if sig == signal.SIGINT else ctx.run(argv, timeout=240)
    return driver


def d_prepare_sigint(ctx: Ctx) -> Run:
    run = ctx.run(search(), timeout=240, when=lambda out: "phase: scoring" in out,
                  then=lambda pid: (time.sleep(1), os.killpg(pid, signal.SIGINT)))
    if not run.fired:
        raise NotRunHere("the search passed its preparation before the signal")
    return run


def d_impossible_then_feasible(ctx: Ctx) -> Run:
    (ctx.tmp / "out").mkdir()
    refused = ctx.run(tiny(budget="0.01x"))
    bad = "" if refused.code == 2 else f"the impossible budget exited {refused.code}"
    return replace(ctx.run(tiny()), problem=bad)


def d_redirected(ctx: Ctx) -> Run:
    run = ctx.run(tiny(trials=3, epochs="1"), timeout=240, when=trial_done, then=lambda pid: None)
    return run if run.fired or run.code != 0 else replace(run, problem="no trial line reached stdout before the exit")


def d_fresh_cache(data: str) -> Callable[[Ctx], Run]:
    """A new user's first search (nothing cached: digits-net is trained first, for minutes) with a bad --data."""
    return lambda ctx: ctx.run(search("--data", data), env={**ctx.env, "AUTOCOMPRESS_CACHE": str(ctx.tmp / "cache")})


def piped(command: str, argv, env: tuple = ()) -> Callable[[Ctx], Run]:
    """ARGV's stdout into a pipe read by COMMAND (``true``: gone long before autocompress, seconds in, writes);
    the exit code is autocompress's."""
    return lambda ctx: ctx.run(argv, env={**ctx.env, **dict(env)},
                               prefix=("bash", "-c", f'"$@" | {command}; exit ${{PIPESTATUS[0]}}', "bash"))
