"""The fault sweep's model and data files, and the stand-in for digits-net's trained weights."""

from __future__ import annotations

import importlib
from pathlib import Path

TINY = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset

INPUT_SHAPE = (1, 1, 16, 16)

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

def model():
    torch.manual_seed(0)
    return Tiny()

def data(channels=1):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (320,), generator=g)
    x = torch.randn(320, channels, 16, 16, generator=g) * 0.5
    x[:, :, :8, :8] += (y == 0).float()[:, None, None, None]
    x[:, :, 8:, 8:] += (y == 1).float()[:, None, None, None]
    x[:, :, :8, 8:] += (y == 2).float()[:, None, None, None]
    return TensorDataset(x[:256], y[:256]), TensorDataset(x[256:], y[256:])

def bad_shape():
    return data(channels=3)

def bad_type():
    return [1, 2, 3]
'''

MODELS = '''
import torch
from torch import nn

INPUT_SHAPE = (1, 3, 16, 16)

def not_a_module():
    return 42

def raises():
    raise RuntimeError("cannot build this model")

class RoundSTE(torch.autograd.Function):
    """Rounding with a straight-through gradient, reading a weight as numpy (fine in a Function's forward)."""

    @staticmethod
    def forward(ctx, x, w):
        return torch.round(x * float(w.numpy().std() > 0) * 4) / 4

    @staticmethod
    def backward(ctx, g):
        return g, None

class Quantised(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(RoundSTE.apply(self.conv(x), self.conv.weight).mean((2, 3)))

class ReadsValues(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        y = self.conv(x)
        return y * 2 if y.sum() > 0 else -y

class Spectrum(nn.Module):
    """torch.fft.rfft has no ONNX export at opset 17."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(torch.fft.rfft(self.conv(x)).abs().mean((2, 3)))

def quantised():
    torch.manual_seed(0)
    return Quantised()

def reads_values():
    return ReadsValues()

def spectrum():
    return Spectrum()
'''

SYNTAX = "def model(:\n    pass\n"
IMPORTS = "import not_a_real_package_xyz\n\ndef model():\n    return None\n"
NO_DRIVER = "raise ModuleNotFoundError(\"No module named 'psycopg2'\", name='psycopg2')\n"


def digits_weights(cache: Path) -> Path:
    """Where the cache keeps digits-net's trained weights."""
    train = importlib.import_module("autocompress.evaluators.train")  # the package re-exports a function of that name
    return cache / f"digits-net-v{train.CACHE_VERSION}-e{train.DIGITS_EPOCHS}-s0.pt"


def seed_digits(cache: Path) -> Path:
    """A seeded, untrained digits-net where the trained one is looked for (as the test suite seeds it)."""
    import torch

    from autocompress.models import BUILTIN_MODELS

    torch.manual_seed(1234)
    state = BUILTIN_MODELS.get("digits-net").factory().state_dict()
    for key in state:  # marked as having seen data, so the cache accepts it as a trained model
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1)
    path = digits_weights(cache)
    torch.save(state, path)
    return path
