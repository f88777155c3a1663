"""From what the user gave (a model spec or module; built-in data or a Task) to a workspace and its evaluator.

Every driver (the Optuna run, each Ray worker, the Python API) prepares a
search through :func:`prepare`, so a task file is re-imported the same way on
every node and checked before any search starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from autocompress.compress import build_space
from autocompress.errors import UserInputError
from autocompress.evaluators.data import check_data_spec, load_data
from autocompress.evaluators.task import Task, check_task, load_task
from autocompress.evaluators.train import BUNDLED_DATA
from autocompress.hwmodels.targets import get_target
from autocompress.search.core import SearchConfig, model_and_data
from autocompress.search.evaluate import CandidateEvaluator, TaskEvaluator
from autocompress.models import load_model
from autocompress.workspace import Workspace, open_model


@dataclass(frozen=True)
class Prepared:
    """A search's workspace and evaluator, and how result.json names the model and the data."""

    ws: Workspace
    evaluator: Any  # CandidateEvaluator or TaskEvaluator
    model: str
    data: str


def space_options(config: SearchConfig, warm_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The search space's options: a warm start's, with pruned widths rounded to ``--prune-round-to`` or
    else to the target's multiple (measured by calibration for ``local``), so that pruning turns into speed."""
    options = dict(warm_options or {})
    if config.prune_round_to is not None:
        options["prune_round_to"] = config.prune_round_to
    else:
        options.setdefault("prune_round_to", get_target(config.target).prune_round_to)
    return options


def _with_kinds(ws: Workspace, kinds: tuple[str, ...]) -> Workspace:
    """``ws``, refused with the kinds the model has where ``kinds`` leaves it no decision."""
    if kinds and not ws.space.decisions:
        has = sorted({d.kind for d in build_space(ws.graph, ws.space.model, options=ws.space.options).decisions})
        raise UserInputError(f"--kinds {','.join(kinds)} leaves no decision to search on {ws.space.model}; its "
                             f"decision kinds are: {', '.join(has) or 'none'}")
    return ws


def task_label(task: str | Task) -> str:
    return f"task:{task}" if isinstance(task, str) else f"task:{task.metric}"


def check_task_args(model: str | nn.Module | None, data: str | None, task: Any,
                    input_shape: tuple[int, ...] | None) -> None:
    """Options that cannot go with a task, and a --data spec that names nothing, said before any work (a built-in
    model is trained before its data is loaded: minutes on first use)."""
    if task is None:
        if data:
            check_data_spec(data)
        return
    if data:
        raise UserInputError("--task and --data both given: a task brings its own data; drop --data")
    if input_shape:
        raise UserInputError("--task and --input-shape both given: the task's example_input is the model's input; "
                             "drop --input-shape")
    if model is None:
        raise UserInputError("--task needs the model it scores: add --model (e.g. --model path/model.py:factory)")


def prepare(model: str | nn.Module | None, *, data: str | None = None, task: str | Task | None = None,
            weights: str | os.PathLike | None = None, input_shape: tuple[int, ...] | None = None,
            leaf: tuple[str, ...] = (), options: dict[str, Any] | None = None, seed: int = 0,
            kinds: tuple[str, ...] = ()) -> Prepared:
    """Open the model for a search on built-in data (``data``) or on a user ``task`` (a Task or its file spec),
    its space restricted to the decision ``kinds`` where given."""
    module = model if isinstance(model, nn.Module) else None
    spec = f"python:{type(model).__name__}" if module is not None else model
    if task is None:
        if module is not None:
            raise UserInputError("searching an in-memory model needs a task: autocompress.search(model, task, ...)")
        spec, data = model_and_data(spec, data)
        early, early_shape = None, None
        if weights is None and spec.startswith("builtin:"):
            # A built-in model trains on first use (minutes): its data is read, and refused if bad, before that.
            early_shape = tuple(load_model(spec, input_shape=input_shape).input_shape)
            early = load_data(data, early_shape)
        # A built-in model searched on another bundled set is trained on that set: it is the teacher.
        ws = _with_kinds(open_model(spec, weights=weights, input_shape=input_shape, leaf=leaf, options=options,
                                    pretrained=True, kinds=kinds,
                                    pretrained_on=data if data in BUNDLED_DATA else None), kinds)
        shape = tuple(ws.space.input_shape)
        bundle = early if early is not None and early_shape == shape else load_data(data, shape)
        torch.manual_seed(seed)
        return Prepared(ws, CandidateEvaluator(ws, bundle, seed=seed), spec, data)
    check_task_args(spec, data, task, input_shape)
    loaded_task = load_task(task) if isinstance(task, str) else task
    if not isinstance(loaded_task, Task):
        raise UserInputError(f"task must be an autocompress.Task or a path/file.py:factory spec, "
                             f"got {type(task).__name__}")
    ws = _with_kinds(open_model(spec, weights=weights, leaf=leaf, options=options, pretrained=True,
                                example_input=loaded_task.example_input, module=module, kinds=kinds), kinds)
    check_task(loaded_task, ws.model)  # a broken metric or input is said before any search starts
    torch.manual_seed(seed)
    return Prepared(ws, TaskEvaluator(ws, loaded_task, seed=seed), spec, task_label(task))
