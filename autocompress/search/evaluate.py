"""Candidate evaluation: build the compressed model, fine-tune it with distillation, score it.

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

    def __call__(self, policy: Policy, epochs: float) -> Scored:
        from autocompress.evaluators.finetune import finetune

        model, ctx = self.build(policy)
        finetune(model, self.teacher, self.finetune_bundle, epochs=epochs, lr=self.lr, boosted=ctx.boosted,
                 seed=self.seed, teacher_logits=self.teacher_logits)
        return Scored(model.eval(), evaluate(model, self.select), sorted(ctx.boosted), list(ctx.notes))

    def held_out(self, model: nn.Module) -> float:
        return evaluate(model, self.val)
