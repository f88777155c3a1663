"""Distillation fine-tuning over a user task's batches: any inputs, any outputs, the task's loss or ours."""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from autocompress.errors import TrialFailed
from autocompress.evaluators.finetune import distillation_loss, make_optimizer, train_step, warmup_cosine
from autocompress.evaluators.task import Task
from autocompress.evaluators.train import recalibrate_bn
from autocompress.space.inputs import as_tuple, primary_output


def default_loss(student_out: Any, teacher_out: Any, targets: Any) -> torch.Tensor:
    """KD (+ cross-entropy) where the primary output is logits over classes and targets are labels
    (per sample or per token), else the relative squared error to the teacher's output."""
    s, t = primary_output(student_out), primary_output(teacher_out)
    labels = isinstance(targets, torch.Tensor) and not targets.is_floating_point() and s.dim() >= 2 \
        and s.shape[-1] > 1 and tuple(targets.shape) == tuple(s.shape[:-1])
    if labels:
        return distillation_loss(s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]), targets.reshape(-1))
    return F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-8)


def count_batches(train: Iterable[Any]) -> int:
    try:
        return len(train)  # type: ignore[arg-type]
    except TypeError:
        return sum(1 for _ in train)


def calibration_inputs(task: Task, limit: int = 64) -> tuple[torch.Tensor, ...]:
    """Up to ``limit`` samples of model inputs: the task's calibration batches, else its train inputs."""
    source = task.calibration if task.calibration is not None else (b[0] for b in task.train)
    parts: list[list[torch.Tensor]] = []
    seen = 0
    for batch in source:
        tensors = as_tuple(batch)
        if not parts:
            parts = [[] for _ in tensors]
        for acc, t in zip(parts, tensors):
            acc.append(t[:limit - seen])
        seen += len(tensors[0][:limit - seen])
        if seen >= limit:
            break
    return tuple(torch.cat(p) for p in parts)


def task_finetune(student: nn.Module, teacher: nn.Module, task: Task, *, epochs: float, lr: float | None = None,
                  boosted: Iterable[str] = (), seed: int = 0, history: list[float] | None = None) -> nn.Module:
    """Train ``student`` for ``epochs`` (may be fractional) passes over ``task.train``; return it in eval mode."""
    if task.finetune is not None:
        try:
            out = task.finetune(student, teacher, epochs)
        except Exception as exc:
            raise TrialFailed(f"the task's finetune raised {type(exc).__name__}: {exc}".splitlines()[0]) from exc
        return (out if isinstance(out, nn.Module) else student).eval()
    steps = math.ceil(max(0.0, float(epochs)) * count_batches(task.train))
    if steps == 0:
        return student.eval()
    torch.manual_seed(seed)
    loss_fn = task.loss or default_loss
    opt = make_optimizer(student, lr or task.lr, boosted)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps))
    teacher.eval()
    student.train()
    done = 0
    while done < steps:
        for inputs, targets in task.train:
            args = as_tuple(inputs)
            with torch.no_grad():
                teacher_out = teacher(*args)
            train_step(student, opt, sched, loss_fn(student(*args), teacher_out, targets),
                       f"step {done + 1} of {steps}", history)
            done += 1
            if done >= steps:
                break
    recalibrate_bn(student, calibration_inputs(task, 512))
    return student.eval()
