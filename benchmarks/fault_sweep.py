"""Fault sweep: bad inputs, hostile environments and interruptions, run through the CLI as a user would.

Every case runs the ``autocompress`` console script in a fresh temporary folder with a timeout. It is
GOOD when the exit code is the intended one (0 ok, 2 bad input, 3 environment, 130 interrupted, 1 a
defect), an error is one line on stderr (no traceback, no ``internal error``), stdout carries nothing it
should not (an exporter's IR dump) and nothing is lost or left behind (an existing --out unchanged when
refused, no empty study.journal, no ``.partial-*`` staging). Mount points and read-only folders are real
mounts in a private mount namespace (``unshare``); a missing database driver is simulated by a package
that fails to import; a case this machine cannot run says "not run here" and why.

    .venv/bin/python benchmarks/fault_sweep.py                  # every case, about 15 minutes on 2 cores
    .venv/bin/python benchmarks/fault_sweep.py --only policy    # one group (repeatable)
    .venv/bin/python benchmarks/fault_sweep.py --list

The built-in digits-net's weights come from ``--cache`` (a cache folder holding trained ones) or are seeded,
untrained, into a private cache as the test suite does: no case depends on accuracy. This file holds the case
table, the judging and the report; ``fault_sweep_cases.py`` the records, the runner and the multi-step cases;
``fault_sweep_sources.py`` the model and data files the cases use.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fault_sweep_cases import (  # noqa: E402
    Case, Ctx, NotRunHere, Run, apply, both, copy_template, d_apply_signal, d_concurrent, d_fresh_cache,
    d_impossible_then_feasible, d_interrupt, d_prepare_sigint, d_redirected, d_resume, first_prune, image_folder,
    keep_file, lines_whole, listing_has, mounted, no_out, no_staging, normalised, pickle_bomb, piped, pol, profile,
    ro_bind, search, snapshot, soon_after_signal, state_file, tiny, tmpfs, unchanged, within, write)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
IR_DUMP = ("Torch IR graph", "graph(%", "Exported Graph", "GraphModule(")
SECRET = "s3cret-pw"

M = "{f}/models.py:"
PG = f"postgresql://user:{SECRET}@127.0.0.1:1/db"
SPACE_JSON = ("space", "--model", "builtin:digits-net", "--json")
WP = profile("--weights", "{t}/w.pt")
IMAGES = search("--data", "imagefolder:{t}/img")
RO = "ro,size=1m"


def r18(shape: str) -> tuple[str, ...]:
    return profile("--input-shape", shape, model="torchvision:resnet18")


def _only_lock(ctx: Ctx, run: Run) -> str:
    left = sorted(p.name for p in (ctx.tmp / "out").iterdir() if p.name != ".autocompress.lock")
    return f"a refused search left {left} in the folder" if left else ""


def _forced(ctx: Ctx, run: Run) -> str:
    aside = [p for p in (ctx.tmp / "out").iterdir() if p.name.startswith("previous-")]
    kept = len(aside) == 1 and snapshot(aside[0]) == ctx.shared["before"]
    return "" if kept else "the old results were not moved whole into previous-<time>/"


def _file_kept(ctx: Ctx, run: Run) -> str:
    return "" if (ctx.tmp / "out").read_text() == "keep me" else "the file given as --out was changed"


def _no_secret(ctx: Ctx, run: Run) -> str:
    return "the database password was printed" if SECRET in run.stdout + run.stderr else ""


def _no_payload(ctx: Ctx, run: Run) -> str:
    return "the pickle's payload ran" if (ctx.tmp / "PWNED").exists() else ""


def _sparse(ctx: Ctx) -> None:
    os.truncate(write(ctx, "p.json", ""), 100 << 20)


def _ro_out(ctx: Ctx) -> str:
    keep_file(ctx)
    return ro_bind(ctx.tmp / "out")


B, MO, W, P, T, D, O, OD, S, SG, PR, OU = ("budget", "model", "weights", "policy", "target", "data", "options",
                                          "outdir", "storage", "signals", "profile", "output")
CASES: tuple[Case, ...] = (
    *(Case(f"--budget {b!r} ({why})", B, 2, search(budget=b), frag, check=no_out) for b, why, frag in [
        ("5parsecs", "unknown unit", "unknown unit"), ("-5ms", "negative", "-5ms"), ("0ms", "zero", "positive"),
        ("infms", "infinite", "infms"), ("garbage", "no number", "garbage"),
        ("", "empty", "empty budget"), ("5ms,6ms", "one limit twice", "repeats"), ("1e400ms", "infinite", "too large"),
        ("0x", "zero relative", "positive")]),
    Case("neither --budget nor --max-drop", B, 2, search(budget=None), "--max-drop", check=no_out),
    Case("--budget and --max-drop together", B, 2, search("--max-drop", "1"), "not both", check=no_out),
    *(Case(f"--model {m.replace('{t}/', '').replace('{f}/', '')}", MO, 2, profile(model=m), frag) for m, frag in [
        ("builtin:nope", "unknown builtin model"), ("nosuch:x", "unknown source"), ("digits-net", "bad model spec"),
        ("{t}/missing.py:model", "missing.py"), (M + "nothing", "nothing"),
        (M + "not_a_module", "not a torch.nn.Module"), (M + "raises", "cannot build this model"),
        ("{f}/syntax.py:model", "syntax.py"), ("{f}/imports.py:model", "not_a_real_package"),
        ("torchvision:resnet", "did you mean"),
        (M + "reads_values", "torch.export")]),
    Case("--weights missing", W, 2, WP, "does not exist"),
    Case("--weights corrupt", W, 2, WP, "w.pt", setup=lambda c: write(c, "w.pt", os.urandom(4096))),
    Case("--weights empty file", W, 2, WP, "empty or truncated", setup=lambda c: write(c, "w.pt", b"")),
    Case("--weights of another architecture", W, 2, WP, "does not match",
         setup=state_file(lambda torch, s: {"conv.weight": torch.zeros(3, 3)})),
    Case("--weights with one tensor of another shape", W, 2, WP, "another shape",
         setup=state_file(lambda torch, s: {**s, "fc2.weight": torch.zeros(3, 3)})),
    Case("--weights holding a tensor", W, 2, WP, "not a state dict", setup=state_file(lambda torch, s: torch.zeros(3))),
    Case("--weights a pickle that runs code", W, 2, WP, "w.pt", setup=pickle_bomb, check=_no_payload),
    Case("apply --weights missing", W, 2, apply("--weights", "{t}/w.pt"), "does not exist", setup=pol(), check=no_out),
    Case("--policy missing", P, 2, apply(), "does not exist", check=no_out),
    *(Case(f"--policy {what}", P, 2, apply(), frag, setup=pol(raw=raw), check=no_out) for what, raw, frag in [
        ("corrupt JSON", "{ not json", "not valid JSON"), ("a JSON array", "[1, 2]", "expected a JSON object"),
        ("of another format", '{"format": "other/1"}', "format"),
        ("binary", bytes(range(256)) * 4, "p.json"),
        ("nested 100000 deep", "[" * 100000 + "]" * 100000, "nested too deeply"),
        ("decisions a list", '{"format": "autocompress.policy/1", "decisions": [1]}', "'decisions' must be")]),
    Case("--policy 100 MB", P, 2, apply(), "at most", setup=_sparse, check=both(no_out, within(30, 2048))),
    Case("--policy unknown decision", P, 2, apply(), "unknown decision", setup=pol({"prune:nope": 0.5}), check=no_out),
    Case("--policy a value that is no choice", P, 2, apply(), "is not one of",
         setup=pol(lambda s: {first_prune(s): 0.51}), check=no_out),
    Case("--policy a boolean value", P, 2, apply(), "is not one of", setup=pol(lambda s: {first_prune(s): True}),
         check=no_out),
    Case("--policy options of the wrong type", P, 2, apply(), "'options' must be", setup=pol(options=[1]), check=no_out),
    Case("--policy for another model", P, 2, apply(), "another architecture",
         setup=pol({}, fingerprint="0123456789abcdef", model="torchvision:resnet18"), check=no_out),
    Case("--policy 0.5000000001 (normalised)", P, 0, apply(), setup=pol(lambda s: {first_prune(s): 0.5000000001}),
         check=normalised),
    Case("search --warm-start corrupt", P, 2, search("--warm-start", "{t}/p.json"), "not valid JSON",
         setup=pol(raw="{"), check=no_out),
    Case("profile --target nosuch", T, 2, profile("--target", "nosuch"), "nosuch"),
    Case("search --target nosuch", T, 2, search(target="nosuch"), "nosuch", check=no_out),
    Case("calibrate --target mobile (cannot be measured here)", T, 2, ("calibrate", "--target", "mobile"),
         "--measure-cmd"),
    Case("uncalibrated local, first use refused", T, 3, profile("--target", "local"), "local",
         env=(("AUTOCOMPRESS_LOCAL_FIRST_USE", "refuse"),)),
    *(Case(f"--data {d.replace('{t}/', '')}", D, 2, search("--data", d), frag, check=no_out) for d, frag in [
        ("bogus", "bad data spec"), ("sklearn:iris", "iris"), ("imagefolder:{t}/missing", "does not exist"),
        ("{t}/missing.py:data", "does not exist")]),
    Case("--data returning a list", D, 2, tiny("--data", "{f}/tiny.py:bad_type"), "must return", check=no_out),
    Case("--data of another sample shape", D, 2, tiny("--data", "{f}/tiny.py:bad_shape"), "shape", check=no_out),
    Case("image folder with one class", D, 2, IMAGES, "at least two", setup=image_folder(1), check=no_out),
    Case("image folder with a corrupt image", D, 2, IMAGES, "broken.png", setup=image_folder(2, corrupt=True),
         timeout=180),
    Case("image folder with no class folder", D, 2, IMAGES, "class folder", setup=image_folder(0), check=no_out),
    Case("torchvision model without --data", D, 2, search("--model", "torchvision:resnet18"), "--data", check=no_out),
    Case("fresh cache: bad --data spec refused at once", D, 2, driver=d_fresh_cache("bogus"), frag="bad data spec"),
    Case("fresh cache: one-class image folder refused at once", D, 2, driver=d_fresh_cache("imagefolder:{t}/img"),
         frag="at least two", setup=image_folder(1)),
    *(Case(" ".join(a), O, 2, search(*a), frag, check=no_out) for a, frag in [
        (("--low-epochs", "-1"), "--low-epochs"), (("--full-epochs", "nan"), "--full-epochs"),
        (("--finalists", "0"), "--finalists"), (("--trials", "0"), "--trials"),
        (("--input-shape", "1,1,x,32"), "bad input shape"), (("--space", "grid"), "grid"),
        (("--tie", "prune"), "--space layers"), (("--sampler", "bogus"), "bogus"),
        (("--objectives", "accuracy,bogus"), "bogus"), (("--backend", "bogus"), "bogus"), (("--trials", "abc"), "--trials")]),
    Case("profile --batch 0", O, 2, profile("--batch", "0"), "--batch"),
    Case("--out is a file", OD, 2, search(), "is a file", setup=lambda c: write(c, "out", "keep me"), check=_file_kept),
    Case("two searches on one --out at once", OD, 2, driver=d_concurrent, frag="in use by a running search"),
    Case("--out holds another model's search", OD, 2, tiny(model="{f}/tiny2.py:model"), "holds another search",
         setup=copy_template, check=unchanged),
    Case("--out holds another target's search", OD, 2, tiny(target="x86-server"), "holds another search",
         setup=copy_template, check=unchanged),
    Case("--out holds another budget's search", OD, 2, tiny(budget="0.8x"), "holds another search",
         setup=copy_template, check=unchanged),
    Case("--force moves another search aside", OD, 0, tiny("--force", budget="0.8x"), setup=copy_template, check=_forced),
    Case("--out with a damaged search.json", OD, 2, tiny(), "damaged", check=unchanged, setup=lambda c: (
        copy_template(c), write(c, "out/search.json", "{"), c.shared.update(before=snapshot(c.tmp / "out")))),
    Case("impossible budget, new --out", OD, 2, tiny(budget="0.01x"), "cannot be met", check=no_out),
    Case("impossible budget, existing empty --out", OD, 2, tiny(budget="0.01x"), "cannot be met",
         setup=lambda c: (c.tmp / "out").mkdir(), check=_only_lock),
    Case("impossible budget then a feasible one, same --out", OD, 0, driver=d_impossible_then_feasible),
    Case("apply into a mount point", OD, 0, driver=mounted(lambda c: tmpfs(c.tmp / "out"), apply(), "{t}/out"),
         setup=pol(), check=listing_has("model.onnx", "policy.json", "result.json")),
    Case("search into a mount point", OD, 0, driver=mounted(lambda c: tmpfs(c.tmp / "out"), tiny(), "{t}/out"),
         check=listing_has("model.onnx", "result.json", "study.journal")),
    Case("apply into a read-only --out", OD, 3, driver=mounted(_ro_out, apply()), frag="not writable", setup=pol(),
         check=unchanged),
    Case("search into a read-only --out", OD, 3, driver=mounted(_ro_out, tiny()), frag="not writable",
         check=unchanged),
    Case("apply --out under a read-only folder", OD, 3, frag="not writable", setup=pol(),
         driver=mounted(lambda c: tmpfs(c.tmp / "ro", RO), apply(out="{t}/ro/new"))),
    Case("refused apply keeps earlier results", OD, 2, apply(), "unknown decision",
         setup=lambda c: (pol({"prune:nope": 0.5})(c), keep_file(c)), check=unchanged),
    Case("--storage sqlite in a missing folder", S, 3, search("--storage", "sqlite:///{t}/missing/study.db"),
         "cannot open --storage", check=no_out),
    Case("--storage sqlite in a read-only folder", S, 3, frag="cannot open --storage", check=no_out,
         driver=mounted(lambda c: tmpfs(c.tmp / "ro", RO), search("--storage", "sqlite:///{t}/ro/study.db"))),
    Case("--storage postgresql without its driver", S, 3, search("--storage", PG), "psycopg2-binary",
         check=both(no_out, _no_secret), env=(("PYTHONPATH", "{f}/nodriver"),)),
    Case("--storage postgresql unreachable", S, 3, search("--storage", PG), "cannot open --storage",
         check=both(no_out, _no_secret)),
    Case("--storage of an unknown scheme", S, 2, search("--storage", "foo://bar"), "foo://", check=no_out),
    Case("SIGINT during a search", SG, 130, driver=d_interrupt(signal.SIGINT, "int"), frag="interrupted",
         check=soon_after_signal),
    Case("resume after SIGINT", SG, 0, driver=d_resume(signal.SIGINT, "int")),
    Case("resume after SIGKILL", SG, 0, driver=d_resume(signal.SIGKILL, "kill")),
    Case("resume after SIGKILL mid-write (the journal's lock left)", SG, 0, quiet=True,
         driver=d_resume(signal.SIGKILL, "kill", stale_lock=True)),
    Case("SIGINT while a search prepares", SG, 130, driver=d_prepare_sigint, frag="interrupted",
         check=both(no_out, soon_after_signal)),
    Case("SIGINT during apply's writing", SG, 130, driver=d_apply_signal(signal.SIGINT), frag="interrupted",
         check=both(no_out, no_staging, soon_after_signal)),
    Case("SIGKILL during apply's writing, then again", SG, 0, driver=d_apply_signal(signal.SIGKILL), check=no_staging),
    Case("resnet18 at 4096x4096", PR, 0, r18("1,3,4096,4096"), check=within(60, 2048)),
    Case("resnet18 at 32768x32768", PR, 0, r18("1,3,32768,32768"), check=within(60, 2048)),
    Case("an input over 2^40 elements", PR, 2, r18("1,3,1048576,1048576"), "elements per sample",
         check=within(60, 2048)),
    Case("a huge input of the wrong channels", PR, 2, r18("1,1,4096,4096"), "conv1", check=within(60, 2048)),
    Case("custom autograd Function: profile", PR, 0, profile(model=M + "quantised"), quiet=True),
    Case("custom autograd Function: apply with pruning", PR, 0, apply(model=M + "quantised"), quiet=True,
         setup=pol({"prune:conv": 0.5}, fingerprint="")),
    Case("ONNX export fails (rfft)", OU, 1, apply(model=M + "spectrum"), "ONNX export failed",
         setup=pol({}, fingerprint=""), check=no_out),
    Case("stdout redirected to a file: trials logged as they finish", OU, 0, driver=d_redirected,
         check=lines_whole("latency ms (pred.)", "local ms (ORT)", "feasible:")),
    Case("piped profile table", OU, 0, driver=piped("cat", profile()),
         check=lines_whole("109,511,936", "inception2.branch4.1.0", "peak activations")),
    Case("piped profile table with COLUMNS=80", OU, 0, driver=piped("cat", profile(), env=(("COLUMNS", "80"),)),
         check=lines_whole("109,511,936", "inception2.branch4.1.0", "peak activations")),
    Case("a table piped into a reader that has gone", OU, 0, driver=piped("true", profile()), quiet=True),
    Case("JSON piped into a reader that has gone", OU, 0, driver=piped("true", SPACE_JSON), quiet=True),
)


# -- fixtures ----------------------------------------------------------------------------------------
def fixtures(folder: Path, cache: Path, seeded: bool) -> dict:
    """The model and data files, a cache with digits-net weights, and digits-net's space."""
    import torch

    from autocompress.api import open_model
    from fault_sweep_sources import IMPORTS, MODELS, NO_DRIVER, SYNTAX, TINY, digits_weights, seed_digits

    for name, text in (("tiny.py", TINY), ("tiny2.py", TINY), ("models.py", MODELS), ("syntax.py", SYNTAX),
                       ("imports.py", IMPORTS), ("nodriver/psycopg2/__init__.py", NO_DRIVER)):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    weights = digits_weights(cache)
    if not weights.exists():
        if not seeded:
            sys.exit(f"--cache {cache} holds no trained digits-net ({weights.name}); run one search with it first")
        seed_digits(cache)
    shutil.copy(weights, folder / "digits.pt")
    space = open_model("builtin:digits-net").space
    return {"space": {**space.to_json(), "fingerprint": space.fingerprint}, "torch": torch.__version__}


# -- judging and reporting ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    case: str
    group: str
    expected: int
    got: Optional[int]
    good: Optional[bool]  # None: not run here
    note: str
    command: str
    stderr: str
    seconds: float


def judge(case: Case, ctx: Ctx, run: Run) -> list[str]:
    problems = []
    if run.code is None:
        problems.append(f"no exit within {run.seconds:.0f} s")
    elif run.code != case.expect:
        problems.append(f"exit {run.code}, expected {case.expect}")
    lines = [l for l in run.stderr.splitlines() if l.strip()]
    if "Traceback" in run.stdout + run.stderr or "internal error" in run.stderr:
        problems.append("a traceback or an internal error")
    if any(marker in run.stdout for marker in IR_DUMP):
        problems.append("an exporter's dump on stdout")
    if case.expect != 0 and run.code is not None and run.code >= 0:
        if len(lines) != 1:
            problems.append(f"{len(lines)} lines on stderr")
        elif case.frag and case.frag.lower() not in lines[0].lower():
            problems.append(f"the error does not say {case.frag!r}")
    if case.expect == 0 and case.quiet and lines:
        problems.append(f"{len(lines)} lines on stderr ({lines[0][:100]})")
    problems += [p for p in (run.problem, case.check(ctx, run) if case.check else "") if p]
    return problems


def run_case(case: Case, fx: Path, env: dict, shared: dict) -> Outcome:
    tmp = Path(tempfile.mkdtemp(prefix="fs-", dir=fx.parent))
    ctx = Ctx(tmp, fx, {**env, **{k: v.replace("{f}", str(fx)) for k, v in case.env}}, shared)
    command = ""
    try:
        if case.setup:
            case.setup(ctx)
        run = case.driver(ctx) if case.driver else ctx.run(case.argv, timeout=case.timeout)
        command = "autocompress " + " ".join(a if a and " " not in a else repr(a) for a in run.argv)
        problems = judge(case, ctx, run)
        first = "\n".join(l for l in run.stderr.splitlines()[:3])
        note = "; ".join(problems + [run.info]) if problems and run.info else (
            "; ".join(problems) or run.info or (first.splitlines()[0][:160] if first else ""))
        return Outcome(case.name, case.group, case.expect, run.code, not problems, note, command, first[:600],
                       round(run.seconds, 1))
    except NotRunHere as exc:
        return Outcome(case.name, case.group, case.expect, None, None, f"not run here: {exc}", command, "", 0.0)
    except Exception as exc:  # a setup that failed (the template search): counted, never hidden
        return Outcome(case.name, case.group, case.expect, None, False, f"could not run: {type(exc).__name__}: {exc}",
                       command, "", 0.0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", default=[], choices=list(dict.fromkeys(c.group for c in CASES)),
                    help="run only this group (repeatable)")
    ap.add_argument("--case", action="append", default=[], help="run only cases whose name contains this")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--cache", type=Path, help="an autocompress cache with trained digits-net weights (default: seeded)")
    ap.add_argument("--json", type=Path, help="default: benchmarks/results/fault_sweep.json (a full sweep)")
    args = ap.parse_args()
    cases = [c for c in CASES if (not args.only or c.group in args.only)
             and (not args.case or any(s in c.name for s in args.case))]
    if args.list:
        for c in cases:
            print(f"{c.group:9} {c.expect:>3}  {c.name}")
        print(f"{len(cases)} cases in {len({c.group for c in cases})} groups")
        return
    work = Path(tempfile.mkdtemp(prefix="fault-sweep-"))
    cache = args.cache or work / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTOCOMPRESS_", "PYTHONUNBUFFERED", "COLUMNS"))}
    env.update(AUTOCOMPRESS_CACHE=str(cache), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    os.environ["AUTOCOMPRESS_CACHE"] = str(cache)
    started = time.monotonic()
    shared = fixtures(work / "fx", cache, seeded=args.cache is None)
    outcomes = []
    print(f"{'group':9} {'case':58} {'exp':>4} {'got':>4}  {'':4}  note")
    try:
        for case in cases:
            o = run_case(case, work / "fx", env, shared)
            outcomes.append(o)
            verdict = {True: "GOOD", False: "BAD", None: "n/a"}[o.good]
            print(f"{o.group:9} {o.case[:58]:58} {o.expected:>4} {str(o.got):>4}  {verdict:4}  {o.note[:150]}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    totals = {"cases": len(outcomes), "good": sum(o.good is True for o in outcomes),
              "bad": sum(o.good is False for o in outcomes), "not_run": sum(o.good is None for o in outcomes)}
    by_group = {g: {"good": sum(o.good is True for o in outcomes if o.group == g),
                    "bad": sum(o.good is False for o in outcomes if o.group == g),
                    "not_run": sum(o.good is None for o in outcomes if o.group == g)}
                for g in dict.fromkeys(o.group for o in outcomes)}
    print(f"\n{totals['cases']} cases: {totals['good']} GOOD, {totals['bad']} BAD, {totals['not_run']} not run here "
          f"({time.monotonic() - started:.0f} s)")
    partial = bool(args.only or args.case)
    path = args.json or RESULTS / ("fault_sweep_partial.json" if partial else "fault_sweep.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seconds": round(time.monotonic() - started),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": shared["torch"], "root": os.geteuid() == 0},
        "weights": "trained, from --cache" if args.cache else "seeded untrained digits-net (accuracy plays no part)",
        "only": args.only + args.case, "totals": totals, "by_group": by_group,
        "cases": [asdict(o) for o in outcomes]}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
