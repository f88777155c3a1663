"""A user task: the user's metric, training batches, example input and (optionally) loss or fine-tune loop.

``autocompress search --task path/file.py:factory`` and ``autocompress.search(model, task)``
take a :class:`Task`; the built-in classification data (``--data``) is the same
thing with top-1 accuracy as the metric. See docs/tasks.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from autocompress.errors import TrialFailed, UserInputError
from autocompress.space.inputs import as_tuple
from autocompress.userfile import call_factory, import_function


class TaskError(UserInputError):
    """A task that cannot be used: its factory, metric or example input is wrong."""


@dataclass(frozen=True)
class Task:
    """What the search needs to know about the user's problem.

    ``evaluate(model) -> float``: the metric on held-out data, higher is better
    (return the negative of a loss). ``train``: a re-iterable of ``(inputs,
    targets)`` batches for the distillation fine-tune (``inputs`` a tensor or a
    tuple of tensors, passed positionally). ``example_input``: a tensor or tuple
    of tensors the model accepts (any dtype: int64 token ids included).
    Optional: ``metric`` (its name in report.md and result.json), ``loss(student_out,
    teacher_out, targets)`` (default: KD on logits with cross-entropy when
    targets are class labels, else MSE to the teacher's output), ``finetune(student,
    teacher, epochs)`` replacing the fine-tune loop entirely, ``calibration``
    (input batches for activation ranges and int8; default: the train inputs),
    ``select(model) -> float`` (the metric on a split kept apart from the
    held-out one, to rank trials; default: ``evaluate``), ``lr``.
    """

    evaluate: Callable[[nn.Module], float]
    train: Iterable[tuple[Any, Any]]
    example_input: Any
    metric: str = "metric"
    loss: Callable[[Any, Any, Any], torch.Tensor] | None = None
    finetune: Callable[[nn.Module, nn.Module, float], Any] | None = None
    calibration: Iterable[Any] | None = None
    select: Callable[[nn.Module], float] | None = None
    lr: float = 1e-4


def load_task(spec: str) -> Task:
    """``path/to/file.py:factory`` -> the Task the factory returns (one-line errors otherwise)."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path.endswith(".py") or not name:
        raise TaskError(f"bad task spec {spec!r}: expected path/to/file.py:factory")
    fn, _ = import_function(path, name, TaskError, "task")
    task = call_factory(fn, spec, TaskError)
    if not isinstance(task, Task):
        raise TaskError(f"{spec} returned {type(task).__name__}, not an autocompress.Task; "
                        "return autocompress.Task(evaluate=..., train=..., example_input=...)")
    return task


def run_metric(fn: Callable[[nn.Module], float], model: nn.Module, what: str) -> float:
    """Call a metric in eval mode without gradients; a metric that raises or is not a finite number fails."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            value = fn(model)
    except Exception as exc:
        raise TrialFailed(f"{what} raised {type(exc).__name__}: {exc}".splitlines()[0]) from exc
    finally:
        model.train(was)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TrialFailed(f"{what} returned {type(value).__name__}, not a number") from None
    if not math.isfinite(value):
        raise TrialFailed(f"{what} returned {value}")
    return value


def check_task(task: Task, model: nn.Module) -> float:
    """Before any search: the example input runs, the metric is a finite number on the original model,
    and the train batches are non-empty. Returns the original model's metric."""
    try:
        with torch.no_grad():
            model.eval()(*as_tuple(task.example_input))
    except Exception as exc:
        raise TaskError(f"the model rejects the task's example_input: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}; give an example_input its forward "
                        "accepts (a tensor or a tuple of tensors, passed positionally)") from exc
    try:
        value = run_metric(task.evaluate, model, f"the task's evaluate ({task.metric}) on the original model")
    except TrialFailed as exc:
        raise TaskError(f"{exc}; fix evaluate(model) so it returns a finite number") from None
    try:
        first = next(iter(task.train))
    except StopIteration:
        raise TaskError("the task's train batches are empty; give at least one (inputs, targets) batch") from None
    except Exception as exc:
        raise TaskError(f"reading the task's train batches failed: {type(exc).__name__}: {exc}".splitlines()[0]) \
            from exc
    if not (isinstance(first, (tuple, list)) and len(first) == 2):
        raise TaskError(f"a train batch must be an (inputs, targets) pair, got {type(first).__name__}")
    return value
