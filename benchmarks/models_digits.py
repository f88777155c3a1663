"""Model factories for the search-quality benchmark: torchvision architectures on 32x32 sklearn digits.

``benchmarks/models_digits.py:resnet18_digits`` is a model spec the library
loads like any ``file.py:factory`` (random initialisation; the benchmark
trains it once on ``sklearn:digits`` and passes the state dict as weights).
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

INPUT_SHAPE = (1, 3, 32, 32)
NUM_CLASSES = 10
TRAIN_EPOCHS = 4
TRAIN_LR = 3e-3


def resnet18_digits() -> nn.Module:
    """torchvision ResNet-18 with a 10-class head (unchanged stem: 32x32 in, 1x1 before the pool)."""
    import torchvision

    return torchvision.models.resnet18(weights=None, num_classes=NUM_CLASSES)


def mobilenet_v2_digits() -> nn.Module:
    """torchvision MobileNetV2 with a 10-class head."""
    import torchvision

    return torchvision.models.mobilenet_v2(weights=None, num_classes=NUM_CLASSES)


FACTORIES = {"resnet18_digits": resnet18_digits, "mobilenet_v2_digits": mobilenet_v2_digits}


def trained_weights(name: str, cache: str | os.PathLike | None = None, epochs: int = TRAIN_EPOCHS,
                    lr: float = TRAIN_LR, seed: int = 0, data: str = "sklearn:digits") -> Path:
    """Path of ``name``'s state dict trained on the train split of ``data`` (a bundled set); trained once,
    then cached."""
    import torch

    from autocompress.evaluators.data import load_data
    from autocompress.evaluators.train import _save_atomic, cache_dir, data_tag, train

    folder = Path(cache) if cache else cache_dir()
    path = folder / f"bench-{name}{data_tag(data, 'sklearn:digits')}-e{epochs}-s{seed}.pt"
    if path.is_file():
        return path
    torch.manual_seed(seed)
    model = FACTORIES[name]()
    train(model, load_data(data, INPUT_SHAPE), epochs=epochs, lr=lr, seed=seed)
    _save_atomic(model.state_dict(), path)
    return path


if __name__ == "__main__":
    import sys
    import time

    import torch

    torch.set_num_threads(1)
    t = time.time()
    p = trained_weights(sys.argv[1] if len(sys.argv) > 1 else "resnet18_digits")
    print(p, f"{time.time() - t:.0f}s")
