"""Fine-tuning a compressed student with knowledge distillation from the uncompressed teacher.

loss = alpha * T^2 * KL(softmax(student / T) || softmax(teacher / T)) + (1 - alpha) * CE(student, labels)
(Hinton et al. 2015). ``epochs`` may be fractional: it is the fidelity knob a
multi-fidelity search turns. Layers an earlier primitive created or changed
(``boosted``) train at ``lr * boost``; fake-quantised layers train their float
weights through the straight-through estimator.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from autocompress.errors import TrialFailed
from autocompress.evaluators.accuracy import predict_logits
from autocompress.evaluators.data import DataBundle, as_tensors
from autocompress.evaluators.train import batches, recalibrate_bn

BATCH_SIZE = 64


def is_boosted(param_name: str, boosted: Iterable[str]) -> bool:
    """True when the parameter's module path is one of ``boosted`` or lies under one."""
    module = param_name.rpartition(".")[0]
    return any(module == b or module.startswith(b + ".") for b in boosted if b)


def make_optimizer(model: nn.Module, lr: float, boosted: Iterable[str] = (), boost: float = 10.0,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW with two parameter groups: the rest at ``lr``, boosted modules at ``lr * boost``."""
    boosted = tuple(boosted)
    normal, fast = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (fast if is_boosted(name, boosted) else normal).append(p)
    groups = [{"params": normal, "lr": lr, "name": "base"}]
    if fast:
        groups.append({"params": fast, "lr": lr * boost, "name": "boosted"})
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor,
                      temperature: float = 4.0, alpha: float = 0.7) -> torch.Tensor:
    ce = F.cross_entropy(student, labels)
    if teacher is None or alpha <= 0:
        return ce
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True,
                  reduction="batchmean")
    return alpha * t * t * kl + (1 - alpha) * ce


def warmup_cosine(steps: int, warmup: float = 0.1):
    """LR factor per step: linear warm-up over ``warmup`` of the steps, then cosine decay to 0."""
    warm = max(1, int(steps * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    return factor


def train_step(student: nn.Module, opt: torch.optim.Optimizer, sched: Any, loss: torch.Tensor, where: str,
               history: list[float] | None = None) -> None:
    """One optimiser step on ``loss``; a NaN or infinite loss fails the trial (TrialFailed) instead."""
    if not torch.isfinite(loss):
        student.eval()
        raise TrialFailed(f"fine-tuning diverged: loss {loss.item()} at {where}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    if history is not None:
        history.append(loss.item())


def finetune(student: nn.Module, teacher: nn.Module | None, bundle: DataBundle, *, epochs: float = 1.0,
             lr: float = 1e-3, boosted: Iterable[str] = (), boost: float = 10.0, temperature: float = 4.0,
             alpha: float = 0.7, seed: int = 0, teacher_logits: torch.Tensor | None = None,
             batch_size: int = BATCH_SIZE, history: list[float] | None = None) -> nn.Module:
    """Train ``student`` in place for ``epochs`` (may be fractional) passes; return it in eval mode.

    ``teacher_logits`` (one row per train sample, from :func:`predict_logits`)
    saves the teacher's forward passes when many students share one teacher.
    Per-step losses are appended to ``history`` when given. Raises TrialFailed
    when the loss becomes NaN or infinite.
    """
    x, y = as_tensors(bundle.train)
    steps = math.ceil(max(0.0, float(epochs)) * len(x) / batch_size)
    if steps == 0:
        return student.eval()
    if teacher_logits is None and teacher is not None and alpha > 0:
        teacher_logits = predict_logits(teacher, x)
    if teacher_logits is not None and len(teacher_logits) != len(x):
        raise ValueError(f"teacher_logits has {len(teacher_logits)} rows for {len(x)} train samples")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = make_optimizer(student, lr, boosted, boost)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps))
    student.train()
    done = 0
    while done < steps:
        for idx in batches(len(x), batch_size, gen, limit=steps - done):
            t = teacher_logits[idx] if teacher_logits is not None else None
            loss = distillation_loss(student(x[idx]), t, y[idx], temperature, alpha)
            train_step(student, opt, sched, loss, f"step {done + 1} of {steps} (lr={lr}, boost={boost})", history)
            done += 1
    recalibrate_bn(student, x)
    return student.eval()
