"""``search``: from a model spec and a budget to the output folder, with the Optuna driver."""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable

from torch import nn

from autocompress.errors import UserInputError
from autocompress.evaluators.task import Task
from autocompress.search.core import SearchConfig, TrialEvent, check_target_and_budget
from autocompress.space.policy import Policy


def run_search(config: SearchConfig, *, model: str | None = None, data: str | None = None,
               weights: str | os.PathLike | None = None, out: str | os.PathLike = "autocompress-out",
               storage: str | None = None, study_name: str | None = None, warm_start: str | os.PathLike | None = None,
               input_shape: tuple[int, ...] | None = None, leaf: tuple[str, ...] = (), measure: bool = True,
               callback: Callable[[TrialEvent], None] | None = None,
               on_phase: Callable[[str], None] | None = None, task: str | Task | None = None,
               module: nn.Module | None = None, keep: list[Any] | None = None, force: bool = False) -> dict[str, Any]:
    """Run a search and write ``out``; return the result.json content.

    ``task`` (a Task or its ``file.py:factory`` spec) replaces ``data`` with the
    user's metric and batches; ``module`` is an in-memory model (with a task).
    ``keep`` receives the SearchResult (for the Python API). ``out`` is locked for the search and
    remembers what it holds; ``force`` starts over in a folder that holds another search.
    """
    from autocompress.export.artifacts import check_out
    from autocompress.search.optuna_driver import OptunaDriver, make_storage
    from autocompress.search.report import write_search_outputs
    from autocompress.search.outdir import FolderLock, claim, entries, folder_claim, undo
    from autocompress.search.setup import check_task_args, prepare, space_options

    phase = on_phase or (lambda s: None)
    if not measure:  # --no-measure: nothing is timed, the finalists neither
        config = replace(config, measure_finalists=False)
    check_out(out)
    check_task_args(module if module is not None else model, data, task, input_shape)
    # Bad budget strings and a bad --out fail before any work; an uncalibrated `local` is calibrated here.
    check_target_and_budget(config, phase)
    warm = Policy.load(warm_start) if warm_start else None
    out = Path(out)
    before = entries(out)
    shared = bool(storage) and storage.startswith(("postgresql", "mysql", "sqlite:"))  # extra workers welcome
    searching = False
    try:
        with contextlib.nullcontext() if shared else FolderLock(out):
            aside = claim(out, folder_claim(config, model, data, task, module), force=force)
            if aside is not None:
                phase(f"--force: the folder's previous results are in {aside}")
            phase("preparing the model (a built-in model is trained once and cached)")
            prepared = prepare(module if module is not None else model, data=data, task=task, weights=weights,
                               input_shape=input_shape, leaf=leaf, seed=config.seed, kinds=config.kinds,
                               options=space_options(config, warm.options if warm else None))
            ws, evaluator, model, data = prepared.ws, prepared.evaluator, prepared.model, prepared.data
            if warm is not None:
                warm.validate(ws.space)
            if measure:
                _own_scale(ws, model, config.target, phase)
            phase("scoring each choice's sensitivity (once per study)")
            if config.max_drop is not None:
                search, study = _bounded(ws, evaluator, config, make_storage(storage, out), study_name, callback)
            else:
                search = OptunaDriver(ws, evaluator, config, storage=make_storage(storage, out), study_name=study_name,
                                      warm_start=warm, callback=callback,
                                      worker=f"{socket.gethostname()}:{out.resolve()}")
                study = search.study
            phase("measuring the baseline")
            base_acc = evaluator.baseline()
            phase("searching")
            searching = True
            found = search.run()
            phase("writing the output folder")
            extra = {"max_drop": config.max_drop, "minimise": config.minimise} if config.max_drop is not None else None
            result = write_search_outputs(found, evaluator, base_acc, out, study=study, model=model,
                                          data=data, measure=measure, extra=extra)
    except BaseException:
        if not searching and not (shared and before is not None):  # refused before any trial: leave nothing
            undo(out, before)
        raise
    if keep is not None:
        keep.append(found)
    return result


def _own_scale(ws: Any, label: str, target: str, phase: Callable[[str], None]) -> None:
    """The target's latency scale for the searched network, timed from a few of its variants the first time
    it is searched (``hwmodels.calibrate.ensure_network_scale``): on `local` in ONNX Runtime here, on a device
    target calibrated through a measure command through that command; a fixed target is left as it is."""
    from autocompress.hwmodels import get_target
    from autocompress.hwmodels.calibrate import ensure_network_scale
    from autocompress.hwmodels.device import timer_for

    t = get_target(target)
    timer = timer_for(t)
    if timer is None:  # nothing here can time it
        return
    try:
        # `local`: the calibration's own protocol (every variant timed together) rather than one file at a time
        measure = timer.timer if t.measure_cmd else None
        ensure_network_scale(target, ws.model, ws.space, label, measure=measure, progress=phase)
    except Exception as exc:  # a refinement of the predictions: without it the search goes on, unscaled
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        phase(f"could not time variants of {label} on `{target}` ({reason}); its predictions stay unscaled")


def _bounded(ws: Any, evaluator: Any, config: SearchConfig, storage: Any, study_name: str | None,
             callback: Callable[[TrialEvent], None] | None) -> tuple[Any, Any]:
    """The accuracy-bounded search (``--max-drop``) and its study."""
    import optuna

    from autocompress.search.bounded import BoundedSearch
    from autocompress.search.core import study_name_for

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage, study_name=study_name or study_name_for(ws.space.fingerprint, config),
                                direction="maximize", load_if_exists=True)
    return BoundedSearch(ws, evaluator, config, study=study, callback=callback), study


_CONFIG_FIELDS = tuple(f.name for f in fields(SearchConfig) if f.name not in ("target", "budget"))
_RUN_OPTIONS = ("weights", "storage", "study_name", "warm_start", "leaf", "measure", "callback", "on_phase", "data",
                "force")


@dataclass(frozen=True)
class SearchOutcome:
    """What ``autocompress.search(...)`` returns: the chosen policy and model, its costs, the written files."""

    policy: Policy
    model: nn.Module
    metric: str
    baseline: dict[str, Any]
    best: dict[str, Any]
    feasible: bool
    paths: dict[str, Path]
    result: dict[str, Any]  # result.json's content


def search(model: str | nn.Module, task: str | Task | None = None, *, target: str = "mobile", budget: str = "5ms",
           out: str | os.PathLike = "autocompress-out", **options: Any) -> SearchOutcome:
    """The Python API's one call: the most accurate compressed ``model`` for ``task`` within ``budget`` on ``target``.

    ``model`` is an ``nn.Module`` or a model spec; ``task`` a :class:`~autocompress.Task` (or its
    ``file.py:factory`` spec; None with a spec searches its built-in data, or ``data=``). ``options``
    are SearchConfig fields (trials, sampler, seed, low_epochs, full_epochs, finalists, objectives,
    space, kinds, ...) and run options (weights, storage, study_name, warm_start, leaf, measure, data).
    """
    unknown = sorted(set(options) - set(_CONFIG_FIELDS) - set(_RUN_OPTIONS))
    if unknown:
        raise UserInputError(f"unknown search option(s) {', '.join(unknown)}; valid: "
                             f"{', '.join(sorted((*_CONFIG_FIELDS, *_RUN_OPTIONS)))}")
    config = SearchConfig(target=target, budget=str(budget), **{k: v for k, v in options.items() if k in _CONFIG_FIELDS})
    run_kwargs = {k: v for k, v in options.items() if k in _RUN_OPTIONS}
    found: list[Any] = []
    module = model if isinstance(model, nn.Module) else None
    result = run_search(config, model=None if module is not None else model, out=out, task=task, module=module,
                        keep=found, **run_kwargs)
    folder = Path(out)
    names = ("policy.json", "result.json", "report.md", "model.onnx", "model.int8.onnx", "model.fp16.onnx", "model.pt2",
             "model.state.pt", "trials.csv", "pareto.png", "sensitivity.png")
    return SearchOutcome(found[0].best_policy, found[0].best_model, result.get("metric", "accuracy"),
                         result["baseline"], result["best"], bool(result["feasible"]),
                         {n: folder / n for n in names if (folder / n).exists()}, result)
