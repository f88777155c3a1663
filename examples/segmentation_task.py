"""A segmentation model with a dict output, searched with your own metric (mean IoU).

The model returns ``{"out": logits}`` like torchvision's segmentation models;
the data is generated (noisy 48x48 images with a few bright shapes to segment),
so the example runs offline.

    python examples/segmentation_task.py seg_model.pt    # train the model (about 30 s on 2 cores)
    autocompress search --model examples/segmentation_task.py:make_model --weights seg_model.pt \\
        --task examples/segmentation_task.py:make_task --target mobile --budget 0.3x --out seg-out
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

import autocompress

SIZE, CLASSES = 48, 2


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class TinySeg(nn.Module):
    """Encoder (two stride-2 stages), a context block and a bilinear-upsampled 1x1 classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _block(3, 16)
        self.down1 = nn.Sequential(_block(16, 32, 2), _block(32, 32))
        self.down2 = nn.Sequential(_block(32, 64, 2), _block(64, 64))
        self.context = _block(64, 64)
        self.head = nn.Conv2d(64 + 16, CLASSES, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        skip = self.stem(x)
        y = self.context(self.down2(self.down1(skip)))
        y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return {"out": self.head(torch.cat([y, skip], 1))}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return TinySeg().eval()


def shapes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` noisy images with 1-3 bright discs or boxes each, and their 0/1 masks."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    images = torch.randn(n, 3, SIZE, SIZE, generator=g) * 0.6
    masks = torch.zeros(n, SIZE, SIZE, dtype=torch.long)
    for i in range(n):
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            cy, cx, r = (int(v) for v in torch.randint(8, SIZE - 8, (3,), generator=g))
            r = 3 + r % 7
            inside = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) if torch.rand(1, generator=g) < 0.5 \
                else ((yy - cy).abs() <= r) & ((xx - cx).abs() <= r)
            masks[i][inside] = 1
    colour = torch.rand(n, 3, 1, 1, generator=g) + 0.5
    images = images + masks.unsqueeze(1) * colour
    return images, masks


def mean_iou(pred: torch.Tensor, target: torch.Tensor) -> float:
    ious = []
    for c in range(CLASSES):
        inter = int(((pred == c) & (target == c)).sum())
        union = int(((pred == c) | (target == c)).sum())
        ious.append(inter / union if union else 1.0)
    return sum(ious) / CLASSES


def make_task() -> autocompress.Task:
    train_x, train_y = shapes(512, seed=1)
    test_x, test_y = shapes(256, seed=2)

    def evaluate(model: nn.Module) -> float:
        return mean_iou(model(test_x)["out"].argmax(1), test_y)

    train = [(train_x[i:i + 32], train_y[i:i + 32]) for i in range(0, len(train_x), 32)]
    return autocompress.Task(evaluate=evaluate, train=train, example_input=test_x[:1], metric="mean_iou", lr=1e-3)


def train(path: str, epochs: int = 5) -> float:
    model = make_model().train()
    x, y = shapes(1024, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for i in range(0, len(x), 32):
            loss = F.cross_entropy(model(x[i:i + 32])["out"], y[i:i + 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    torch.save(model.state_dict(), path)
    with torch.no_grad():
        return make_task().evaluate(model)


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "seg_model.pt"
    print(f"mean IoU on the test images: {train(out):.3f}; weights in {out}")
