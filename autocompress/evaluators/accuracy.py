"""Accuracy and logits of a model on a dataset, batched, in eval mode, without gradients."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from autocompress.evaluators.data import as_tensors


def predict_logits(model: nn.Module, dataset: Dataset | torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits of ``model`` for every sample (``dataset`` may also be an input tensor)."""
    x = dataset if isinstance(dataset, torch.Tensor) else as_tensors(dataset)[0]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outs = [model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0)


def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``dataset``, in [0, 1]."""
    x, y = as_tensors(dataset)
    if len(y) == 0:
        return 0.0
    logits = predict_logits(model, x, batch_size)
    return float((logits.argmax(1) == y).float().mean())
