"""Time applying every rank decision of ResNet-18 (fraction 0.25) with a full SVD and with the
Gram-matrix eigendecomposition that ``compress.lowrank`` uses, interleaved, 3 runs each (BENCHMARKS.md,
"Low-rank factorisation: time to apply").

    .venv/bin/python benchmarks/lowrank_speed.py
"""

from __future__ import annotations

import statistics
import time

import torch

import autocompress.compress.lowrank as lowrank
from autocompress.api import open_model
from autocompress.compress import apply
from autocompress.space.policy import Policy


def svd_factor(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The factorisation before the Gram-matrix one: a full SVD in float64, the reference timed against."""
    mat = weight.detach().double().flatten(1)
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    root = s[:r].sqrt()
    return (root[:, None] * vh[:r]).to(weight.dtype), (u[:, :r] * root[None, :]).to(weight.dtype)


def main(runs: int = 3) -> None:
    ws = open_model("torchvision:resnet18")
    policy = Policy(ws.space.model, ws.space.fingerprint,
                    {d.id: 0.25 for d in ws.space.of_kind("rank") if 0.25 in d.choices})
    ways = {"svd": svd_factor, "gram": lowrank._factor}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    try:
        for _ in range(runs):  # interleaved, so a slow stretch of a shared machine falls on both
            for name, factor in ways.items():
                lowrank._factor = factor  # the one function that differs; no public switch for it
                started = time.perf_counter()
                apply(ws.model, policy, ws.space)
                seconds[name].append(time.perf_counter() - started)
    finally:
        lowrank._factor = ways["gram"]
    print(f"{len(policy.decisions)} rank decisions, {torch.get_num_threads()} threads")
    for name, v in seconds.items():
        print(f"{name}: {statistics.mean(v):.2f} ± {statistics.stdev(v):.2f} s {[round(x, 2) for x in v]}")


if __name__ == "__main__":
    main()
