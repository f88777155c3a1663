"""Candidate evaluation: build the compressed model, fine-tune it with distillation, score it.

Two evaluators share one interface: :class:`CandidateEvaluator` for the
built-in classification data (top-1 accuracy), :class:`TaskEvaluator` for a
user's :class:`~autocompress.evaluators.task.Task` (their metric, batches and loss).

The train split is cut once into a fine-tuning part and a small selection
part: trials are ranked on the selection part, so the held-out split that
the result reports stays untouched by the search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from autocompress.workspace import Workspace
from autocompress.compress import ApplyContext, apply
from autocompress.evaluators.accuracy import evaluate, predict_logits
from autocompress.evaluators.data import DataBundle, as_tensors
from autocompress.evaluators.task import Task, run_metric
from autocompress.space.inputs import as_tuple
from autocompress.space.policy import Policy


@dataclass
class Scored:
    model: nn.Module
    accuracy: float  # on the selection split
    boosted: list[str]
    notes: list[str]


class CandidateEvaluator:
    """Fine-tunes candidates of one workspace on one data bundle, deterministically."""

    def __init__(self, ws: Workspace, bundle: DataBundle, *, seed: int = 0, select_fraction: float = 0.15,
                 lr: float = 1e-3) -> None:
        self.ws, self.seed, self.lr = ws, seed, lr
        x, y = as_tensors(bundle.train)
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(x), generator=gen)
        n_sel = max(1, int(len(x) * select_fraction))
        sel, ft = perm[:n_sel], perm[n_sel:]
        self.finetune_bundle = DataBundle(TensorDataset(x[ft], y[ft]), bundle.val, bundle.num_classes, bundle.name)
        self.select = TensorDataset(x[sel], y[sel])
        self.val = bundle.val
        self.teacher = ws.model.eval()
        self.teacher_logits = predict_logits(self.teacher, x[ft])
        self.calibration = x[ft][:64]
        self.example = x[:1].clone()

    def baseline(self) -> dict[str, float]:
        return {"accuracy_select": evaluate(self.teacher, self.select), "accuracy": evaluate(self.teacher, self.val)}

    def build(self, policy: Policy) -> tuple[nn.Module, ApplyContext]:
        ctx = ApplyContext(self.ws.space, self.example, calibration=self.calibration)
        model = apply(self.teacher, policy, self.ws.space, calibration=self.calibration, ctx=ctx)
        return model, ctx

    metric = "accuracy"

    def finetune_chunk(self, model: nn.Module, ctx: ApplyContext, epochs: float, seed: int) -> nn.Module:
        """Fine-tune ``model`` (built by :meth:`build`) in place for ``epochs``."""
        from autocompress.evaluators.finetune import finetune

        return finetune(model, self.teacher, self.finetune_bundle, epochs=epochs, lr=self.lr, boosted=ctx.boosted,
                        seed=seed, teacher_logits=self.teacher_logits)

    def score(self, model: nn.Module) -> float:
        """The metric on the selection split: what trials are ranked by."""
        return evaluate(model, self.select)

    def __call__(self, policy: Policy, epochs: float) -> Scored:
        model, ctx = self.build(policy)
        self.finetune_chunk(model, ctx, epochs, self.seed)
        return Scored(model.eval(), self.score(model), sorted(ctx.boosted), list(ctx.notes))

    def held_out(self, model: nn.Module) -> float:
        return evaluate(model, self.val)


class TaskEvaluator:
    """Fine-tunes candidates on a user :class:`Task` and scores them with the task's metric.

    The same interface as :class:`CandidateEvaluator`. Trials are ranked by the
    task's ``select`` metric (default: its ``evaluate``).
    """

    def __init__(self, ws: Workspace, task: Task, *, seed: int = 0, lr: float | None = None) -> None:
        from autocompress.evaluators.task_finetune import calibration_inputs

        self.ws, self.task, self.seed = ws, task, seed
        self.lr = lr if lr is not None else task.lr
        self.teacher = ws.model.eval()
        self.metric = task.metric
        self.example = tuple(t[:1].clone() for t in as_tuple(task.example_input))
        self.calibration = calibration_inputs(task)

    def baseline(self) -> dict[str, float]:
        held_out = self.held_out(self.teacher)
        select = self.score(self.teacher) if self.task.select is not None else held_out
        return {"accuracy_select": select, "accuracy": held_out}

    def build(self, policy: Policy) -> tuple[nn.Module, ApplyContext]:
        ctx = ApplyContext(self.ws.space, self.example, calibration=self.calibration)
        model = apply(self.teacher, policy, self.ws.space, calibration=self.calibration, ctx=ctx)
        return model, ctx

    def finetune_chunk(self, model: nn.Module, ctx: ApplyContext, epochs: float, seed: int) -> nn.Module:
        from autocompress.evaluators.task_finetune import task_finetune

        return task_finetune(model, self.teacher, self.task, epochs=epochs, lr=self.lr, boosted=ctx.boosted,
                             seed=seed)

    def score(self, model: nn.Module) -> float:
        fn = self.task.select or self.task.evaluate
        return run_metric(fn, model, f"the task's {'select' if self.task.select else 'evaluate'} ({self.metric})")

    def __call__(self, policy: Policy, epochs: float) -> Scored:
        model, ctx = self.build(policy)
        self.finetune_chunk(model, ctx, epochs, self.seed)
        return Scored(model.eval(), self.score(model), sorted(ctx.boosted), list(ctx.notes))

    def held_out(self, model: nn.Module) -> float:
        return run_metric(self.task.evaluate, model, f"the task's evaluate ({self.metric})")
