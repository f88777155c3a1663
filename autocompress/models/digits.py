"""``builtin:digits-net``: a small GoogLeNet-style CNN for 32x32 sklearn digits.

It is built so that every decision kind of the search space has a place on it:
inception blocks (parallel branches, concatenation), a residual block (coupled
channels through an add), conv -> BN -> ReLU -> pool chains (BN folding, pool
folding) and a two-layer linear head without a non-linearity between the
layers (linear collapse). About 110 M MACs at 1x1x32x32.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn_relu(cin: int, cout: int, k: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class Inception(nn.Module):
    """Four parallel branches on one input, concatenated: 1x1 | 1x1-3x3 | 1x1-5x5 | pool-1x1."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, cp: int) -> None:
        super().__init__()
        self.branch1 = conv_bn_relu(cin, c1, 1)
        self.branch2 = nn.Sequential(conv_bn_relu(cin, c3r, 1), conv_bn_relu(c3r, c3, 3))
        self.branch3 = nn.Sequential(conv_bn_relu(cin, c5r, 1), conv_bn_relu(c5r, c5, 5))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), conv_bn_relu(cin, cp, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class Residual(nn.Module):
    """A basic residual block: two 3x3 convs and an identity shortcut."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(hidden, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class DigitsNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn_relu(in_channels, 32, 3), conv_bn_relu(32, 64, 3))
        self.pool1 = nn.MaxPool2d(2, 2)
        self.inception1 = Inception(64, 32, 48, 64, 16, 32, 32)  # -> 160 @ 16x16
        self.inception2 = Inception(160, 64, 96, 128, 16, 32, 32)  # -> 256 @ 16x16
        self.pool2 = nn.MaxPool2d(2, 2)
        self.res = Residual(256, 128)  # @ 8x8
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.fc1 = nn.Linear(256, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.stem(x))
        x = self.inception2(self.inception1(x))
        x = self.res(self.pool2(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc2(self.dropout(self.fc1(x)))
