"""``search``: from a model spec and a budget to the output folder, with the Optuna driver."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Callable

import torch

from autocompress.search.core import SearchConfig, TrialEvent, check_target_and_budget, model_and_data
from autocompress.space.policy import Policy


def run_search(config: SearchConfig, *, model: str | None = None, data: str | None = None,
               weights: str | os.PathLike | None = None, out: str | os.PathLike = "autocompress-out",
               storage: str | None = None, study_name: str | None = None, warm_start: str | os.PathLike | None = None,
               input_shape: tuple[int, ...] | None = None, leaf: tuple[str, ...] = (), measure: bool = True,
               callback: Callable[[TrialEvent], None] | None = None,
               on_phase: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run a search and write ``out``; return the result.json content."""
    from autocompress.evaluators.data import load_data
    from autocompress.export.artifacts import check_out
    from autocompress.search.evaluate import CandidateEvaluator
    from autocompress.search.optuna_driver import OptunaDriver, make_storage
    from autocompress.search.report import write_search_outputs
    from autocompress.workspace import open_model

    phase = on_phase or (lambda s: None)
    check_target_and_budget(config)  # bad budget strings and a bad --out fail before any work
    check_out(out)
    model, data = model_and_data(model, data)
    warm = Policy.load(warm_start) if warm_start else None
    phase("preparing the model (a built-in model is trained once and cached)")
    ws = open_model(model, weights=weights, input_shape=input_shape, leaf=leaf,
                    options=dict(warm.options) if warm else None, pretrained=True)
    if warm is not None:
        warm.validate(ws.space)
    bundle = load_data(data, ws.space.input_shape)
    torch.manual_seed(config.seed)
    evaluator = CandidateEvaluator(ws, bundle, seed=config.seed)
    out = Path(out)
    if config.space == "tradeoff":
        phase("scoring each choice's sensitivity (once per study)")
    driver = OptunaDriver(ws, evaluator, config, storage=make_storage(storage, out), study_name=study_name,
                          warm_start=warm, callback=callback, worker=f"{socket.gethostname()}:{out.resolve()}")
    phase("measuring the baseline")
    base_acc = evaluator.baseline()
    phase("searching")
    found = driver.run()
    phase("writing the output folder")
    return write_search_outputs(found, evaluator, base_acc, out, study=driver.study, model=model, data=data,
                                measure=measure)
