"""``search``: from a model spec and a budget to the output folder."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Callable

import torch

from autocompress.errors import UserInputError
from autocompress.search.core import Search, SearchConfig, TrialEvent, make_storage
from autocompress.space.policy import Policy

DEFAULT_MODEL = "builtin:digits-net"
DEFAULT_DATA = {"builtin:digits-net": "sklearn:digits"}


def run_search(config: SearchConfig, *, model: str | None = None, data: str | None = None,
               weights: str | os.PathLike | None = None, out: str | os.PathLike = "autocompress-out",
               storage: str | None = None, study_name: str | None = None, warm_start: str | os.PathLike | None = None,
               input_shape: tuple[int, ...] | None = None, leaf: tuple[str, ...] = (), measure: bool = True,
               callback: Callable[[TrialEvent], None] | None = None,
               on_phase: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run a search and write ``out``; return the result.json content."""
    from autocompress.workspace import open_model
    from autocompress.evaluators.data import load_data
    from autocompress.hwmodels import get_target, parse_budget
    from autocompress.search.evaluate import CandidateEvaluator

    phase = on_phase or (lambda s: None)
    from autocompress.export.artifacts import check_out

    get_target(config.target)
    parse_budget(config.budget)  # bad budget strings and a bad --out fail before any work
    check_out(out)
    model = model or DEFAULT_MODEL
    data = data or DEFAULT_DATA.get(model)
    if data is None:
        raise UserInputError(f"--data is needed to search {model}: give imagefolder:PATH, sklearn:digits or file.py:factory")
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
    search = Search(ws, evaluator, config, storage=make_storage(storage, out), study_name=study_name,
                    warm_start=warm, callback=callback, worker=f"{socket.gethostname()}:{out.resolve()}")
    phase("measuring the baseline")
    base_acc = evaluator.baseline()
    phase("searching")
    search.run()
    phase("writing the output folder")
    from autocompress.search.report import write_search_outputs

    return write_search_outputs(search, evaluator, base_acc, out, model=model, data=data, measure=measure)
